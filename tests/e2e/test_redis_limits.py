"""Two real `bastion serve` gateways sharing one Redis (BASTION_REDIS_URL): one tenant's
limits are counted once for both, and when Redis goes away each follows its policy
(fail_closed: 503 limiter_unavailable; fail_open: its own limits)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bastion_testing import (
    BastionServer,
    add_echo_model,
    ohttp_config,
    post_sealed,
    run_cli,
    seal_request,
)
from services import RedisServer

pytestmark = pytest.mark.e2e

CLOSED, OPEN = "fail_closed", "fail_open"


@pytest.fixture(scope="module")
def gateways(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[dict[str, BastionServer]]:
    """A fail_closed and a fail_open gateway, each with its home (tenants of the same names
    are the same quota subjects in Redis), started together."""
    prefix = f"e2e{secrets.token_hex(4)}:"
    servers: dict[str, BastionServer] = {}
    try:
        for policy in (CLOSED, OPEN):
            home = tmp_path_factory.mktemp(f"redis-{policy}") / "home"
            run_cli(home, "init", "--no-demo-models")
            add_echo_model(home)
            servers[policy] = BastionServer(
                home,
                env={
                    "BASTION_REDIS_URL": redis_server.url(),
                    "BASTION_REDIS_FAILURE_POLICY": policy,
                    "BASTION_REDIS_KEY_PREFIX": prefix,
                },
            )
        for server in servers.values():
            server.wait_ready(["echo"])
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def consumer(server: BastionServer, tenant: str, **limits: Any) -> str:
    """A key of `tenant` (created, with these limits, if need be) on `server`."""
    with server.client() as admin:
        admin.post("/admin/v1/tenants", json={"name": tenant})
        if limits:
            answer = admin.patch(f"/admin/v1/quotas/tenants/{tenant}", json=limits)
            assert answer.status_code == 200, answer.text
        created = admin.post("/admin/v1/keys", json={"tenant": tenant, "role": "consumer"})
        assert created.status_code == 201, created.text
        key: str = created.json()["key"]
        return key


def chat(server: BastionServer, key: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "a b c"}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_one_tenant_limit_counts_requests_through_both_gateways(
    gateways: dict[str, BastionServer],
) -> None:
    keys = {
        policy: consumer(server, "shared", requests_per_minute=4)
        for policy, server in gateways.items()
    }
    remaining = []
    for policy in (CLOSED, OPEN, CLOSED, OPEN):
        answer = chat(gateways[policy], keys[policy])
        assert answer.status_code == 200, answer.text
        remaining.append(answer.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["3", "2", "1", "0"]
    for policy, server in gateways.items():
        refused = chat(server, keys[policy])
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_without_redis_each_gateway_follows_its_policy(
    gateways: dict[str, BastionServer], redis_server: RedisServer
) -> None:
    keys = {
        policy: consumer(server, "outage", requests_per_minute=100)
        for policy, server in gateways.items()
    }
    free = consumer(gateways[CLOSED], "no-quota")
    for policy, server in gateways.items():
        assert chat(server, keys[policy]).status_code == 200
    redis_server.stop()
    try:
        closed = chat(gateways[CLOSED], keys[CLOSED])
        assert closed.status_code == 503
        assert closed.json()["error"]["code"] == "limiter_unavailable"
        assert closed.json()["error"]["type"] == "server_error"
        assert int(closed.headers["retry-after"]) >= 1
        # A tenant without quotas does not need Redis; its encrypted requests do (their
        # replay check).
        assert chat(gateways[CLOSED], free).status_code == 200
        sealed, _ = seal_request(
            ohttp_config(gateways[CLOSED]),
            {"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
        )
        refused = post_sealed(gateways[CLOSED], free, sealed)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "limiter_unavailable"
        # fail_open serves on, by this gateway's own limits.
        for _ in range(3):
            opened = chat(gateways[OPEN], keys[OPEN])
            assert opened.status_code == 200, opened.text
            assert opened.headers["x-ratelimit-limit-requests"] == "100"
        with gateways[CLOSED].client() as admin:
            metrics = admin.get("/metrics").text
        assert "bastion_redis_available 0.0" in metrics
        assert 'code="limiter_unavailable"' in metrics
    finally:
        redis_server.start()
    # Both use Redis again once it answers (it restarted empty here).
    deadline = time.monotonic() + 30
    while (answer := chat(gateways[CLOSED], keys[CLOSED])).status_code == 503:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-remaining-requests"] == "99"
    for server in gateways.values():
        logs = server.logs()
        assert "Redis does not answer" in logs
        assert redis_server.password not in logs
