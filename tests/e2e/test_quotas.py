"""Quotas, rate-limit headers, fair queuing and metering against a real server.

Each test uses tenants of its own, so the limiter state of one cannot leak into another.
Clients are the `openai` SDK (with retries off) and plain httpx for the admin API.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bastion.wire import bhttp
from bastion_testing import (
    BastionServer,
    add_echo_model,
    cli_json,
    ohttp_config,
    post_sealed,
    run_cli,
    seal_request,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("quotas") / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    srv = BastionServer(home, env={"BASTION_USAGE_FLUSH_INTERVAL_S": "0.5"})
    try:
        srv.wait_ready(["echo"])
        yield srv
    finally:
        srv.stop()


def tenant_key(server: BastionServer, tenant: str, role: str = "consumer") -> tuple[str, str]:
    """Create `tenant` (if needed) and a key of it; returns (token, key id)."""
    with server.client() as admin:
        admin.post("/admin/v1/tenants", json={"name": tenant})
        created = admin.post("/admin/v1/keys", json={"tenant": tenant, "role": role})
        assert created.status_code == 201, created.text
        return created.json()["key"], created.json()["id"]


def set_quota(server: BastionServer, kind: str, subject: str, **limits: Any) -> dict[str, Any]:
    with server.client() as admin:
        answer = admin.patch(f"/admin/v1/quotas/{kind}/{subject}", json=limits)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result


def sdk(server: BastionServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def chat(client: openai.OpenAI, text: str = "a b c", **kwargs: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": text}], **kwargs
    )


def test_requests_per_minute_with_openai_headers(server: BastionServer) -> None:
    key, _ = tenant_key(server, "rpm")
    set_quota(server, "tenants", "rpm", requests_per_minute=3)
    client = sdk(server, key)
    remaining = []
    for _ in range(3):
        raw = chat(client)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert re.fullmatch(r"\d+(\.\d+)?m?s|\d+m\d+s", raw.headers["x-ratelimit-reset-requests"])
        assert raw.parse().choices[0].message.content == "a b c"
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client)
    response = refused.value.response
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(response.headers["retry-after"]) <= 20
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    # Another tenant is not affected.
    other, _ = tenant_key(server, "rpm-other")
    assert chat(sdk(server, other)).parse().choices[0].message.content == "a b c"


def test_tokens_are_reserved_then_settled_to_what_was_used(server: BastionServer) -> None:
    key, _ = tenant_key(server, "tpm")
    set_quota(server, "tenants", "tpm", tokens_per_minute=1000)
    client = sdk(server, key)
    first = chat(client, max_tokens=500)
    second = chat(client, max_tokens=500)
    assert first.parse().usage.total_tokens == 6
    # Each admission reserved its estimate (prompt + max_tokens)...
    remaining = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in (first, second)]
    assert remaining[0] <= 1000 - 500
    # ...and the first was settled to the 6 tokens it used before the second came.
    assert -10 <= remaining[0] - remaining[1] <= 6
    # A request that could never fit in a minute's tokens is refused for good.
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client, max_tokens=2000)
    assert refused.value.response.json()["error"]["code"] == "tokens_limit_exceeded"
    assert "retry-after" not in refused.value.response.headers


def test_concurrent_requests_are_limited(server: BastionServer) -> None:
    key, _ = tenant_key(server, "conc")
    set_quota(server, "tenants", "conc", concurrent_requests=1)
    client = sdk(server, key)
    results: list[str] = []

    def slow() -> None:
        results.append(chat(client, "__sleep__:3 slow").parse().choices[0].message.content)

    thread = threading.Thread(target=slow)
    thread.start()
    # The slow request holds the tenant's one slot for three seconds.
    time.sleep(1.0)
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client)
    assert refused.value.response.json()["error"]["code"] == "concurrency_limit_exceeded"
    thread.join(30)
    assert results == ["__sleep__:3 slow"]
    # The slot is free again once the answer has been sent.
    assert chat(client).parse().choices[0].message.content == "a b c"


def test_daily_budget(server: BastionServer) -> None:
    key, _ = tenant_key(server, "daily")
    set_quota(server, "tenants", "daily", tokens_per_day=10)
    client = sdk(server, key)
    assert chat(client, "a b c d", max_tokens=4).parse().usage.total_tokens == 8
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client, "a b c d", max_tokens=4)
    assert refused.value.response.json()["error"]["code"] == "daily_budget_exceeded"
    # Retry after midnight UTC, not in a few seconds.
    midnight = 86400 - int(time.time()) % 86400
    assert abs(int(refused.value.response.headers["retry-after"]) - midnight) <= 5


def test_key_and_tenant_limits_both_apply(server: BastionServer) -> None:
    limited, limited_id = tenant_key(server, "keyed")
    free, _ = tenant_key(server, "keyed")
    set_quota(server, "tenants", "keyed", requests_per_minute=100)
    set_quota(server, "keys", limited_id, requests_per_minute=1, max_request_bytes=400)
    assert chat(sdk(server, limited)).headers["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(openai.RateLimitError):
        chat(sdk(server, limited))
    # The tenant's other key still has the tenant's allowance.
    assert chat(sdk(server, free)).headers["x-ratelimit-limit-requests"] == "100"
    set_quota(server, "keys", limited_id, requests_per_minute=None)
    with pytest.raises(openai.APIStatusError) as too_big:
        chat(sdk(server, limited), "x" * 500)
    assert too_big.value.status_code == 413


def test_sealed_requests_are_settled_from_the_workers_usage(server: BastionServer) -> None:
    key, _ = tenant_key(server, "sealed")
    set_quota(server, "tenants", "sealed", tokens_per_minute=100_000)
    config = ohttp_config(server)
    body = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}]}
    remaining = []
    for _ in range(2):
        data, context = seal_request(config, body)
        response = post_sealed(server, key, data)
        assert response.status_code == 200
        assert json.loads(bhttp.decode_response(context.open(response.content)).content)[
            "usage"
        ] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
        remaining.append(int(response.headers["x-ratelimit-remaining-tokens"]))
    # The gateway could not read the requests: each reserved what the tenant had left
    # (the worker holds the inner request to that), and was settled to the 6 it used.
    assert all(r < 100 for r in remaining), remaining
    after = chat(sdk(server, key), "one two three")
    left = int(after.headers["x-ratelimit-remaining-tokens"])
    # Both were settled: all but the 12 they used (refilled since) is left again, less
    # this one's own reservation (its prompt and 256 by default).
    assert 100_000 - 12 - 256 - 10 <= left <= 100_000 - 256


def test_sealed_requests_cannot_overshoot_their_budget(server: BastionServer) -> None:
    # The finding: a sealed request reserved its size/4 + 256 tokens, but its inner request
    # asked for 16 prompts x n=4 x max_tokens: 4 of them were served 22,922 tokens against
    # a 5,000 tokens/day budget.
    key, _ = tenant_key(server, "sealed-budget")
    set_quota(server, "tenants", "sealed-budget", tokens_per_day=5000)
    config = ohttp_config(server)
    greedy = {"model": "echo", "prompt": ["a b c d"] * 16, "n": 4, "max_tokens": 500}
    for _ in range(4):
        data, context = seal_request(config, greedy, path="/v1/completions")
        response = post_sealed(server, key, data)
        assert response.status_code == 200
        inner = bhttp.decode_response(context.open(response.content))
        assert inner.status == 429, inner.content
        assert json.loads(inner.content)["error"]["code"] == "tokens_limit_exceeded"
    # A request within what is left is served, and settled to what it used.
    modest = {"model": "echo", "prompt": "a b c d", "max_tokens": 16}
    data, context = seal_request(config, modest, path="/v1/completions")
    response = post_sealed(server, key, data)
    assert bhttp.decode_response(context.open(response.content)).status == 200
    with server.client() as admin:
        deadline = time.monotonic() + 10
        while True:
            rows = admin.get("/admin/v1/usage", params={"tenant": "sealed-budget"}).json()["data"]
            if rows or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert sum(r["total_tokens"] for r in rows) == 8


def test_a_quota_set_from_the_cli_reaches_the_running_server(server: BastionServer) -> None:
    key, _ = tenant_key(server, "cli")
    run_cli(server.home, "quotas", "set", "--tenant", "cli", "--rpm", "1")
    shown = cli_json(server.home, "quotas", "show", "--tenant", "cli")
    assert shown[0]["requests_per_minute"] == 1
    client = sdk(server, key)
    deadline = time.monotonic() + 10
    while True:
        try:
            chat(client)
        except openai.RateLimitError:
            break
        assert time.monotonic() < deadline, "the server never applied the CLI's quota"
        time.sleep(0.2)
    bad = run_cli(server.home, "quotas", "set", "--tenant", "cli", "--rpm", "-1", check=False)
    assert bad.returncode != 0 and "between 0" in bad.stderr


def test_usage_is_metered_per_tenant_and_model(server: BastionServer) -> None:
    key, _ = tenant_key(server, "metered")
    set_quota(server, "tenants", "metered", requests_per_minute=3)
    client = sdk(server, key)
    chat(client, "__sleep__:0.3 x y")
    chat(client, "a b c d e")
    client.embeddings.create(model="echo", input=["p q r"])
    with pytest.raises(openai.RateLimitError):
        chat(client)
    with server.client() as admin:
        answer = admin.get("/admin/v1/usage", params={"tenant": "metered", "since": "1h"})
    assert answer.status_code == 200
    [row] = answer.json()["data"]
    assert row["tenant"] == "metered" and row["model"] == "echo"
    assert row["requests"] == 4 and row["refused"] == 1
    # Prompts: 3 + 5 words, embeddings 3; completions: 3 + 5 words.
    assert row["prompt_tokens"] == 11 and row["completion_tokens"] == 8
    assert row["compute_seconds"] >= 0.3
    # The CLI reads what the gateway wrote.
    [cli_row] = cli_json(server.home, "usage", "--tenant", "metered", "--since", "1h")
    assert {k: cli_row[k] for k in ("requests", "refused", "prompt_tokens")} == {
        "requests": 4,
        "refused": 1,
        "prompt_tokens": 11,
    }
    with server.client() as admin:
        metrics = admin.get("/metrics").text
    compute = re.search(
        r'^bastion_worker_compute_seconds_total\{model="echo",tenant="metered"\} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    assert compute is not None and float(compute.group(1)) >= 0.3
    assert re.search(
        r'^bastion_requests_refused_total\{code="rate_limit_exceeded",model="echo",'
        r'tenant="metered"\} 1\.0$',
        metrics,
        re.MULTILINE,
    )
    assert key not in metrics and key.split("_")[1][:8] not in metrics


def test_who_may_manage_and_read(server: BastionServer) -> None:
    tenant_admin, _ = tenant_key(server, "owners", role="tenant-admin")
    consumer, _ = tenant_key(server, "owners")
    set_quota(server, "tenants", "owners", requests_per_minute=50)
    with server.client(tenant_admin) as client:
        denied = client.patch("/admin/v1/quotas/tenants/owners", json={"requests_per_minute": 9})
        assert denied.status_code == 403
        own = client.get("/admin/v1/quotas/tenants/owners")
        assert own.status_code == 200 and own.json()["requests_per_minute"] == 50
        # Another tenant is "not found", exactly like a tenant that does not exist.
        for name in ("rpm", "no-such-tenant"):
            other = client.get(f"/admin/v1/quotas/tenants/{name}")
            assert other.status_code == 404
            assert other.json()["error"]["message"] == "No tenant has this name."
            usage = client.get("/admin/v1/usage", params={"tenant": name})
            assert usage.status_code == 404
            assert usage.json()["error"]["message"] == "No tenant has this name."
        assert client.get("/admin/v1/usage").status_code == 200
    with server.client(consumer) as client:
        assert client.get("/admin/v1/quotas").status_code == 403


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/admin/v1/quotas/tenants/rpm", {"bogus": 1}, 400, "invalid_request"),
        ("/admin/v1/quotas/tenants/rpm", {"requests_per_minute": -5}, 400, "invalid_request"),
        ("/admin/v1/quotas/tenants/rpm", {"requests_per_minute": "ten"}, 400, "invalid_request"),
        ("/admin/v1/quotas/tenants/rpm", {"weight": 0}, 400, "invalid_request"),
        ("/admin/v1/quotas/planets/rpm", {"requests_per_minute": 1}, 404, "not_found"),
        ("/admin/v1/quotas/tenants/nobody", {"requests_per_minute": 1}, 404, "not_found"),
        ("/admin/v1/quotas/keys/bk_nope", {"requests_per_minute": 1}, 404, "not_found"),
    ],
)
def test_bad_quota_requests_are_4xx(
    server: BastionServer, path: str, body: dict[str, Any], status: int, code: str
) -> None:
    tenant_key(server, "rpm")
    with server.client() as admin:
        answer = admin.patch(path, json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code


def test_bad_usage_queries_are_400(server: BastionServer) -> None:
    with server.client() as admin:
        assert admin.get("/admin/v1/usage", params={"since": "soon"}).status_code == 400
        assert admin.get("/admin/v1/usage", params={"group": "week"}).status_code == 400


# ---------------------------------------------------------------- fair queuing


def test_a_flooding_tenant_does_not_starve_a_quiet_one(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    srv = BastionServer(home, env={"BASTION_MODEL_CONCURRENCY": "1", "BASTION_QUEUE_SIZE": "6"})
    try:
        srv.wait_ready(["echo"])
        flood_key, _ = tenant_key(srv, "flood")
        quiet_key, _ = tenant_key(srv, "quiet")
        stop = threading.Event()
        completed: list[float] = []
        refused: list[httpx.Response] = []
        lock = threading.Lock()

        def flood() -> None:
            with srv.client(flood_key) as client:
                while not stop.is_set():
                    answer = client.post(
                        "/v1/completions", json={"model": "echo", "prompt": "__sleep__:0.1 f"}
                    )
                    with lock:
                        if answer.status_code == 200:
                            completed.append(time.monotonic())
                        else:
                            refused.append(answer)
                            time.sleep(0.05)

        threads = [threading.Thread(target=flood) for _ in range(12)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        waits = []
        try:
            with srv.client(quiet_key) as quiet:
                for _ in range(5):
                    sent = time.monotonic()
                    answer = quiet.post(
                        "/v1/completions", json={"model": "echo", "prompt": "__sleep__:0.1 q"}
                    )
                    # Every quiet request is served: the flood fills the queue, but gives way.
                    assert answer.status_code == 200, answer.text
                    done = time.monotonic()
                    with lock:
                        waits.append(sum(1 for t in completed if sent < t < done))
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        # The queue was full of the flood's requests (six waiting) the whole time: in
        # arrival order each quiet request would wait for all of them. In fair order it
        # waits for the one being served and at most the flood's next.
        assert refused and all(r.status_code == 503 for r in refused)
        assert refused[0].json()["error"]["code"] == "queue_full"
        assert refused[0].headers["retry-after"] == "1"
        assert max(waits) <= 3, waits
    finally:
        srv.stop()


def test_a_worker_crash_under_load_leaves_no_request_hanging(server: BastionServer) -> None:
    """Requests queued in the fair queue when the worker dies: every one gets an answer
    (200 before the crash, 503 after), none hangs, and the model serves again."""
    key, _ = tenant_key(server, "crashload")
    statuses: list[int] = []
    lock = threading.Lock()

    def send(prompt: str) -> None:
        with server.client(key) as client:
            answer = client.post("/v1/completions", json={"model": "echo", "prompt": prompt})
        with lock:
            statuses.append(answer.status_code)

    prompts = ["__sleep__:0.05 x"] * 10 + ["__crash__"] + ["__sleep__:0.05 y"] * 10
    threads = [threading.Thread(target=send, args=(prompt,)) for prompt in prompts]
    for thread in threads:
        thread.start()
        time.sleep(0.01)
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    assert len(statuses) == len(prompts)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
    server.wait_model("echo", "ready", timeout=60)
    with server.client(key) as client:
        again = client.post("/v1/completions", json={"model": "echo", "prompt": "back"})
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == "back"


# Every route that reaches a model, with a request it would otherwise serve.
INFERENCE_CALLS = [
    ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": "echo", "prompt": "hi"}),
    ("/v1/embeddings", {"model": "echo", "input": "hi"}),
    (
        "/v2/models/echo/infer",
        {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
    ),
    (
        "/v2/models/echo/versions/1/infer",
        {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
    ),
]


@pytest.mark.parametrize(("path", "body"), INFERENCE_CALLS, ids=[p for p, _ in INFERENCE_CALLS])
def test_every_inference_route_goes_through_admission(
    server: BastionServer, path: str, body: dict[str, Any]
) -> None:
    tenant = "admit-" + re.sub(r"\W", "", path)[:30]
    key, _ = tenant_key(server, tenant)
    set_quota(server, "tenants", tenant, requests_per_minute=1)
    headers = {"authorization": f"Bearer {key}"}
    first = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30)
    assert first.status_code == 200, first.text
    # Its answer carries the quota headers; the next request in the minute is refused.
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    second = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30)
    assert second.status_code == 429, second.text
    assert second.headers["x-ratelimit-limit-requests"] == "1"


def test_the_encrypted_route_goes_through_admission(server: BastionServer) -> None:
    key, _ = tenant_key(server, "admit-sealed")
    set_quota(server, "tenants", "admit-sealed", requests_per_minute=1)
    config = ohttp_config(server)
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    first = post_sealed(server, key, seal_request(config, body)[0])
    assert first.status_code == 200, first.text
    second = post_sealed(server, key, seal_request(config, body)[0])
    assert second.status_code == 429, second.text


def test_a_request_failing_after_admission_gives_its_place_back(server: BastionServer) -> None:
    # One concurrent request allowed: if a request that fails after admission (the model
    # raises) kept its place, the next one would get 429.
    key, _ = tenant_key(server, "admit-fail")
    set_quota(server, "tenants", "admit-fail", concurrent_requests=1, requests_per_minute=100)
    headers = {"authorization": f"Bearer {key}"}

    def ask(content: str) -> httpx.Response:
        body = {"model": "echo", "messages": [{"role": "user", "content": content}]}
        return httpx.post(
            f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30
        )

    for _ in range(3):
        failed = ask("__fail__")
        assert failed.status_code >= 400 and failed.status_code != 429, failed.text
        # An error answer after admission still carries the quota headers.
        assert failed.headers["x-ratelimit-limit-requests"] == "100"
    fine = ask("a b")
    assert fine.status_code == 200, fine.text
    assert fine.json()["choices"][0]["message"]["content"] == "a b"
