"""Two gateways on two hosts, one state: what is changed through one is seen by the
other within 2 s, one tenant limit holds across both, an OHTTP request is accepted once
by the pair, and both ride out an outage of Redis or PostgreSQL.

The cluster (tests/cluster/conftest.py): gateway 1 on host a, gateway 2 on host b, sharing
PostgreSQL, Redis and the master key; their echo replicas run on Ray nodes.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import Counter

import httpx
import pytest
from clusterlib import Cluster, Gateway, complete, eventually, set_quota, tenant_key

from bastion.wire import bhttp
from bastion_testing import ohttp_config, post_sealed, seal_request

pytestmark = pytest.mark.timeout(300)

PROPAGATION_S = 2.0


def _serves(gateway: Gateway, key: str) -> bool:
    return complete(gateway, key).status_code == 200


def test_a_key_made_on_one_gateway_works_on_the_other_and_its_revocation_too(
    healthy: Cluster,
) -> None:
    gw1, gw2 = healthy.gw1, healthy.gw2
    key, key_id = tenant_key(gw1, "cross-keys")
    eventually(
        lambda: complete(gw2, key).status_code == 200,
        PROPAGATION_S,
        "a key created on gateway 1 works on gateway 2",
    )
    with gw1.admin_client() as admin:
        assert admin.post(f"/admin/v1/keys/{key_id}/revoke").status_code == 200
    eventually(
        lambda: complete(gw2, key).status_code == 401,
        PROPAGATION_S,
        "a key revoked on gateway 1 is refused by gateway 2",
    )
    assert complete(gw1, key).status_code == 401


def test_a_quota_set_on_one_gateway_is_enforced_by_the_other(healthy: Cluster) -> None:
    gw1, gw2 = healthy.gw1, healthy.gw2
    key, _ = tenant_key(gw1, "cross-quota")
    eventually(lambda: complete(gw2, key).status_code == 200, PROPAGATION_S, "the key works")
    set_quota(gw1, "tenants", "cross-quota", requests_per_minute=3)
    limited: list[httpx.Response] = []

    def limit_seen() -> bool:
        answer = complete(gw2, key)
        limited.append(answer)
        limit: str | None = answer.headers.get("x-ratelimit-limit-requests")
        return limit == "3"

    eventually(limit_seen, PROPAGATION_S, "gateway 2 applies the quota set on gateway 1")
    # The tenant has 3 requests a minute on both gateways together, one of them used
    # by the request that saw the limit (a minute refills 3: none in this time).
    statuses = [complete(gw, key).status_code for gw in (gw1, gw2, gw1, gw2)]
    assert statuses == [200, 200, 429, 429], statuses
    refused = complete(gw2, key)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert complete(gw1, key).status_code == 429


def test_a_model_loaded_and_unloaded_on_one_gateway_follows_on_the_other(
    healthy: Cluster,
) -> None:
    gw1, gw2 = healthy.gw1, healthy.gw2
    key, _ = tenant_key(gw1, "cross-models")
    eventually(lambda: complete(gw2, key).status_code == 200, PROPAGATION_S, "the key works")

    def view(gateway: Gateway) -> dict[str, str]:
        with gateway.admin_client() as admin:
            answer = admin.get("/admin/v1/models/echo2")
            assert answer.status_code == 200, answer.text
            found: dict[str, str] = answer.json()
            return found

    assert view(gw2)["state"] == "unloaded"
    assert complete(gw2, key, model="echo2").status_code != 200
    try:
        with gw1.admin_client() as admin:
            assert admin.post("/admin/v1/models/echo2/load").status_code == 202
        eventually(
            lambda: view(gw2)["desired_state"] == "loaded" and view(gw2)["state"] != "unloaded",
            PROPAGATION_S,
            "gateway 2 starts loading a model loaded on gateway 1",
        )
        gw2.wait_model("echo2", "ready", timeout=150)
        assert complete(gw2, key, model="echo2").status_code == 200
        with gw1.admin_client() as admin:
            assert admin.post("/admin/v1/models/echo2/unload").status_code == 202
        eventually(
            lambda: (
                view(gw2)["desired_state"] == "unloaded"
                and complete(gw2, key, model="echo2").status_code != 200
            ),
            PROPAGATION_S,
            "gateway 2 stops serving a model unloaded on gateway 1",
        )
    finally:
        with gw1.admin_client() as admin:
            admin.post("/admin/v1/models/echo2/unload")


def test_a_tenant_limit_holds_across_both_gateways_under_a_flood(healthy: Cluster) -> None:
    """600 requests a minute, flooded through both gateways at once: the tenant's one
    bucket (in Redis) admits 600, plus what refills while the flood lasts (10/s)."""
    gw1, gw2 = healthy.gw1, healthy.gw2
    key, _ = tenant_key(gw1, "flood")
    set_quota(gw1, "tenants", "flood", requests_per_minute=600)
    # Both gateways know the limit before the flood (their first request counts too).
    time.sleep(PROPAGATION_S)
    started = time.monotonic()
    outcomes: dict[str, Counter[str]] = {gw1.name: Counter(), gw2.name: Counter()}
    lock = threading.Lock()
    stop = threading.Event()
    ended = [started]

    def flood(gateway: Gateway) -> None:
        headers = {"authorization": f"Bearer {key}"}
        body = {"model": "echo", "prompt": "a", "max_tokens": 1}
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as client:
            while not stop.is_set():
                try:
                    answer = client.post("/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                else:
                    outcome = str(answer.status_code)
                    if answer.status_code == 200:
                        assert answer.headers["x-ratelimit-limit-requests"] == "600"
                    elif answer.status_code == 429:
                        outcome += ":" + answer.json()["error"]["code"]
                with lock:
                    outcomes[gateway.name][outcome] += 1
                    ended[0] = time.monotonic()
                    refused = sum(c["429:rate_limit_exceeded"] for c in outcomes.values())
                    # The bucket has been empty for a while: enough.
                    if refused >= 300 or time.monotonic() - started > 60:
                        stop.set()

    threads = [threading.Thread(target=flood, args=(gw,)) for gw in (gw1, gw2) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(t.is_alive() for t in threads)
    elapsed = ended[0] - started
    admitted = {name: counts["200"] for name, counts in outcomes.items()}
    total = sum(admitted.values())
    expected = 600 + 10 * elapsed
    print(f"flood: {outcomes} in {elapsed:.1f} s; admitted {total}, expected {expected:.0f}")
    for counts in outcomes.values():
        assert set(counts) <= {"200", "429:rate_limit_exceeded"}, outcomes
    # Both gateways served, and from one bucket: not 600 each.
    assert min(admitted.values()) > 0, admitted
    assert abs(total - expected) <= 0.01 * 600, (total, expected, outcomes)


def test_an_ohttp_request_replayed_to_the_other_gateway_is_refused(healthy: Cluster) -> None:
    gw1, gw2 = healthy.gw1, healthy.gw2
    key, _ = tenant_key(gw1, "replay")
    eventually(lambda: complete(gw2, key).status_code == 200, PROPAGATION_S, "the key works")
    config = ohttp_config(gw1)
    # The gateways publish the same key (it lives in the shared database).
    assert ohttp_config(gw2) == config
    body: dict[str, object] = {
        "model": "echo",
        "messages": [{"role": "user", "content": "one two"}],
    }
    for first, second in ((gw1, gw2), (gw2, gw1)):
        data, context = seal_request(config, body)
        answer = post_sealed(first, key, data)
        assert answer.status_code == 200, answer.text
        inner = bhttp.decode_response(context.open(answer.content))
        assert inner.status == 200
        assert json.loads(inner.content)["choices"][0]["message"]["content"] == "one two"
        replay = post_sealed(second, key, data)
        assert replay.status_code == 400, replay.text
        assert replay.json()["error"]["code"] == "ohttp_replay"


def test_without_redis_requests_under_a_quota_are_refused_then_served_again(
    healthy: Cluster,
) -> None:
    gw1, gw2 = healthy.gw1, healthy.gw2
    key, _ = tenant_key(gw1, "redis-down")
    set_quota(gw1, "tenants", "redis-down", requests_per_minute=1000)
    eventually(
        lambda: complete(gw2, key).headers.get("x-ratelimit-limit-requests") == "1000",
        PROPAGATION_S,
        "the quota is applied",
    )
    healthy.redis.stop()
    try:
        for gateway in (gw1, gw2):
            started = time.monotonic()
            answer = complete(gateway, key)
            # fail_closed, the default policy: refused at once, with a hint to retry.
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "limiter_unavailable"
            assert int(answer.headers["retry-after"]) >= 1
            assert time.monotonic() - started < 5
    finally:
        healthy.redis.start()
    for gateway in (gw1, gw2):
        eventually(
            functools.partial(_serves, gateway, key),
            15,
            f"{gateway.name} serves again once Redis is back",
            interval=0.25,
        )


def test_gateways_recover_from_a_postgresql_restart(healthy: Cluster) -> None:
    gw1, gw2 = healthy.gw1, healthy.gw2
    key, _ = tenant_key(gw1, "pg-restart")
    eventually(lambda: complete(gw2, key).status_code == 200, PROPAGATION_S, "the key works")
    # A crash (immediate shutdown: connections cut), then a start on the same port.
    healthy.postgres.stop(kill=True)
    try:
        with gw1.admin_client() as admin:
            started = time.monotonic()
            down = admin.get("/admin/v1/tenants", timeout=30)
            # What needs the database is refused while it is down, and does not hang.
            assert down.status_code == 503, down.text
            assert time.monotonic() - started < 15
        # A key already known keeps working meanwhile.
        assert complete(gw2, key).status_code == 200
    finally:
        healthy.postgres.start()
    fresh: list[str] = []

    def key_created() -> bool:
        with gw1.admin_client() as admin:
            created = admin.post("/admin/v1/keys", json={"tenant": "pg-restart"}, timeout=30)
        if created.status_code == 201:
            fresh.append(created.json()["key"])
        return bool(fresh)

    eventually(key_created, 30, "gateway 1 writes to the database again", interval=0.5)
    # Gateway 2 hears of it (its LISTEN connection, or its revision polling, is back).
    eventually(
        lambda: complete(gw2, fresh[0]).status_code == 200,
        10,
        "gateway 2 sees a key created after the restart",
        interval=0.1,
    )
    with gw2.admin_client() as admin:
        assert admin.get("/admin/v1/tenants").status_code == 200
