"""The inference routes' fast path (api/fast.py) in a real server: what it answers, logs and
counts is what the Starlette app answers, logs and counts.

The gateway serves the inference routes (POST /v2/models/{name}/infer, /v1/chat/completions,
/v1/embeddings, ...) itself and everything else through Starlette; the same error must look
the same on both sides, 413 must come before the body is read, the access log and the
metrics must name route templates (never a client's path), and a client that leaves must
cancel its request, whose usage is still settled.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bastion_testing import BastionServer, add_echo_model, run_cli

pytestmark = pytest.mark.e2e

INFER = "/v2/models/echo/infer"
TENSOR = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("fast-path") / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    srv = BastionServer(
        home,
        env={"BASTION_USAGE_FLUSH_INTERVAL_S": "0.5", "BASTION_MAX_BODY_BYTES": str(MAX_BODY)},
    )
    try:
        srv.wait_ready(["echo"])
        yield srv
    finally:
        srv.stop()


def _key(server: BastionServer, tenant: str) -> str:
    with server.client() as admin:
        admin.post("/admin/v1/tenants", json={"name": tenant})
        created = admin.post("/admin/v1/keys", json={"tenant": tenant})
        assert created.status_code == 201, created.text
        key: str = created.json()["key"]
        return key


def _comparable(answer: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {k: v for k, v in answer.headers.items() if k not in ("date", "content-length")}
    return answer.status_code, headers, answer.json()


def test_an_error_looks_the_same_on_both_sides(server: BastionServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        # No key: the OIP shape on /v2, OpenAI's on /v1, whichever side serves the route.
        fast = anonymous.post(INFER, json=TENSOR)
        slow = anonymous.get("/v2/models/echo")
        assert _comparable(fast) == _comparable(slow)
        assert fast.status_code == 401 and fast.json() == {"error": "Invalid or missing API key."}
        assert fast.headers["www-authenticate"] == 'Bearer realm="bastion"'
        fast = anonymous.post("/v1/embeddings", json={"model": "echo", "input": "a"})
        slow = anonymous.get("/v1/models")
        assert _comparable(fast) == _comparable(slow)
        assert fast.json()["error"]["type"] == "authentication_error"
    with server.client(_key(server, "shapes")) as client:
        # A model that does not exist.
        fast = client.post("/v2/models/nope/infer", json=TENSOR)
        slow = client.get("/v2/models/nope")
        assert _comparable(fast) == _comparable(slow)
        assert fast.status_code == 404
        # A body that is not JSON, a media type that is not JSON.
        bad = client.post(INFER, content=b"{nope", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json() == {
            "error": "The request body is not valid JSON."
        }
        text = client.post(
            "/v1/chat/completions", content=b"hi", headers={"content-type": "text/plain"}
        )
        assert text.status_code == 415 and text.json()["error"]["code"] == "unsupported_media_type"
        # Answered by Starlette: a method the route does not take.
        assert client.get(INFER).status_code == 405


def _head_only(server: BastionServer, path: str, key: str, length: int) -> bytes:
    """Send a request's head announcing `length` bytes of body, and none of them."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: bastion\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_a_body_over_the_limit_is_refused_before_it_is_read(server: BastionServer) -> None:
    key = _key(server, "big")
    for path in (INFER, "/v1/chat/completions", "/v1/embeddings"):
        started = time.monotonic()
        answer = _head_only(server, path, key, 10 * MAX_BODY)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # At once: not after the body timeout, which a body never sent would run into.
        assert time.monotonic() - started < 2


def _metrics(server: BastionServer) -> str:
    with server.client() as admin:
        return admin.get("/metrics").text


def test_metrics_and_the_access_log_name_route_templates(server: BastionServer) -> None:
    key = _key(server, "templates")
    with server.client(key) as client:
        assert client.post(INFER, json=TENSOR).status_code == 200
        assert client.post("/v2/models/echo/versions/1/infer", json=TENSOR).status_code == 200
        chat = {"model": "echo", "messages": [{"role": "user", "content": "a b"}]}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert (
            client.post("/v1/embeddings", json={"model": "echo", "input": "a"}).status_code == 200
        )
        assert client.post("/v2/models/client-chosen-x9/infer", json=TENSOR).status_code == 404
    metrics = _metrics(server)
    for route in (
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
        "/v1/chat/completions",
        "/v1/embeddings",
    ):
        labels = f'model="echo",route="{route}",status="200",tenant="templates"'
        assert f"bastion_requests_total{{{labels}}} 1.0" in metrics, route
        assert f'bastion_request_duration_seconds_count{{route="{route}"}}' in metrics
    # A model that does not exist is counted without its (client-chosen) name.
    unknown = 'model="",route="/v2/models/{name}/infer",status="404",tenant="templates"'
    assert f"bastion_requests_total{{{unknown}}} 1.0" in metrics
    deadline = time.monotonic() + 5
    while '"tenant":"templates"' not in server.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [
        json.loads(line) for line in server.logs().splitlines() if '"tenant":"templates"' in line
    ]
    requests = [line for line in lines if line.get("logger") == "bastion.access"]
    assert {(r["route"], r["status"], r["model"]) for r in requests} >= {
        ("/v2/models/{name}/infer", 200, "echo"),
        ("/v1/chat/completions", 200, "echo"),
        ("/v2/models/{name}/infer", 404, ""),
    }
    assert "client-chosen-x9" not in server.logs() and "client-chosen-x9" not in metrics
    assert "bastion_in_flight_requests 1.0" in metrics  # the /metrics request itself


def test_a_client_that_leaves_is_cancelled_and_its_usage_settled(server: BastionServer) -> None:
    key = _key(server, "leaver")
    body = json.dumps({"model": "echo", "prompt": "__sleep__:30 x"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: bastion\r\n"
            + f"Authorization: Bearer {key}\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(1.5)
    # The job was cancelled at the worker: the next request is served at once.
    with server.client(key) as client:
        started = time.monotonic()
        answer = client.post("/v1/completions", json={"model": "echo", "prompt": "next"})
        assert answer.status_code == 200 and time.monotonic() - started < 10
    deadline = time.monotonic() + 10
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with server.client() as admin:
            rows = admin.get("/admin/v1/usage", params={"tenant": "leaver", "since": "1h"})
        row = (rows.json()["data"] or [{}])[0]
        # Both requests counted, and the work the abandoned one did (its worker's report).
        if row.get("requests") == 2 and row.get("compute_seconds", 0) >= 1.0:
            break
        time.sleep(0.2)
    assert row.get("requests") == 2 and row.get("compute_seconds", 0) >= 1.0, row
    metrics = _metrics(server)
    left = 'model="echo",route="/v1/completions",status="499",tenant="leaver"'
    assert f"bastion_requests_total{{{left}}} 1.0" in metrics
    assert re.search(r'"status":499[^\n]*"tenant":"leaver"|"tenant":"leaver"[^\n]*"status":499',
                     server.logs())  # fmt: skip
