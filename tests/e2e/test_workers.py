"""Worker failures, deadlines, model load/unload and graceful shutdown, on a small server."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion.client import OHTTPTransport
from bastion_testing import BastionServer, add_echo_model, cli_json, ohttp_fingerprints, run_cli


def _chat(
    client: httpx.Client, text: str, model: str = "echo", *, stream: bool = False
) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}], "stream": stream},
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("workers") / "home"
    run_cli(home, "init", "--no-demo-models")
    for name in ("echo", "echo-b"):
        add_echo_model(home, name)
    srv = BastionServer(home, env={"BASTION_REQUEST_TIMEOUT_S": "3"})
    try:
        srv.wait_ready(["echo", "echo-b"], timeout=120)
        yield srv
    finally:
        srv.stop()


def test_worker_crash_gives_503_and_the_model_comes_back(small: BastionServer) -> None:
    with small.client() as client:
        before = small.wait_model("echo", "ready")
        crashed = _chat(client, "__crash__")
        assert crashed.status_code == 503
        assert int(crashed.headers["retry-after"]) >= 1
        assert crashed.json()["error"]["type"] == "server_error"
        # The other model is unaffected.
        assert _chat(client, "still here", "echo-b").status_code == 200
        after = small.wait_model("echo", "ready", timeout=60)
        assert after["restarts"] > before["restarts"]
        assert _chat(client, "hello again").json()["choices"][0]["message"]["content"] == (
            "hello again"
        )
    assert "worker.crashed" in small.logs()


def test_deadline_gives_504_and_the_worker_moves_on(small: BastionServer) -> None:
    with small.client() as client:
        slow = _chat(client, "__sleep__:30")
        assert slow.status_code == 504
        start = time.monotonic()
        assert _chat(client, "next").status_code == 200
        # The cancelled job did not keep the worker busy for its full 30 s.
        assert time.monotonic() - start < 20


def test_a_request_cut_off_at_the_deadline_is_still_charged(small: BastionServer) -> None:
    before = small.tokens("echo", "prompt")
    with small.client() as client:
        for stream in (False, True):
            assert _chat(client, "__sleep__:30 two words", stream=stream).status_code == 504
    # The worker reports the work the cancelled jobs did; the gateway charges it.
    assert small.wait_tokens("echo", "prompt", before + 2 * 3) == before + 2 * 3
    # Encrypted too, whole and streamed (chunked OHTTP): the cancellation carries the usage.
    with _sealed_client(small) as sealed:
        for stream in (False, True):
            assert _chat(sealed, "__sleep__:30 two words", stream=stream).status_code == 504
    assert small.wait_tokens("echo", "prompt", before + 4 * 3) == before + 4 * 3


def _sealed_client(server: BastionServer) -> httpx.Client:
    """A client whose requests are end-to-end encrypted (OHTTP)."""
    transport = OHTTPTransport(fingerprints=ohttp_fingerprints(server.home))
    return httpx.Client(
        base_url=server.url,
        headers={"authorization": f"Bearer {server.admin_key}"},
        transport=transport,
        timeout=60,
    )


def test_encrypted_requests_crash_deadline_and_cancel(small: BastionServer) -> None:
    with _sealed_client(small) as sealed:
        small.wait_model("echo-b", "ready")
        # Past the deadline: 504 (unencrypted, from the gateway), and the job is cancelled
        # inside the worker, which answers the next request at once. Whole answers are
        # served on the runtime thread, streamed ones on the sealed event loop: both.
        for stream in (False, True):
            assert _chat(sealed, "__sleep__:30", "echo-b", stream=stream).status_code == 504
            start = time.monotonic()
            answer = _chat(sealed, "after the deadline", "echo-b")
            assert answer.status_code == 200
            assert answer.json()["choices"][0]["message"]["content"] == "after the deadline"
            assert time.monotonic() - start < 20
        # A worker that dies while holding an encrypted request: 503, then it comes back.
        assert _chat(sealed, "__crash__", "echo-b").status_code == 503
        small.wait_model("echo-b", "ready", timeout=60)
        assert _chat(sealed, "back", "echo-b").status_code == 200


def test_cli_unload_and_load_reach_the_server(small: BastionServer) -> None:
    run_cli(small.home, "models", "unload", "echo-b")
    small.wait_model("echo-b", "unloaded", timeout=5)
    with small.client() as client:
        assert _chat(client, "hi", "echo-b").status_code == 503
        listed = cli_json(small.home, "models", "list")
        assert {m["name"]: m["desired_state"] for m in listed}["echo-b"] == "unloaded"
        with small.client() as admin:
            assert admin.post("/admin/v1/models/echo-b/load").status_code == 202
        small.wait_model("echo-b", "ready", timeout=60)
        assert _chat(client, "hi", "echo-b").status_code == 200


def _worker_pids(server_pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == server_pid:
                children.append(int(entry.name))
    return children


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    srv = BastionServer(home)
    try:
        srv.wait_ready(["echo"], timeout=120)
        first_key = srv.admin_key
        workers = _worker_pids(srv.proc.pid)
        assert workers
        with (
            srv.client() as client,
            _sealed_client(srv) as sealed,
            concurrent.futures.ThreadPoolExecutor(3) as pool,
        ):
            pending = pool.submit(_chat, client, "__sleep__:2 done")
            # Encrypted requests in flight are drained too: the worker stops only after them.
            pending_sealed = pool.submit(_chat, sealed, "__sleep__:2 sealed")
            pending_stream = pool.submit(_chat, sealed, "__sleep__:2 streamed", stream=True)
            time.sleep(0.7)
            srv.proc.send_signal(signal.SIGTERM)
            answer = pending.result(timeout=30)
            sealed_answer = pending_sealed.result(timeout=30)
            streamed = pending_stream.result(timeout=30)
        assert answer.status_code == 200
        assert sealed_answer.status_code == 200
        assert sealed_answer.json()["choices"][0]["message"]["content"] == "__sleep__:2 sealed"
        assert streamed.status_code == 200
        assert "__sleep__:2 streamed" in "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in streamed.text.splitlines()
            if line.startswith("data: {") and '"choices":[{' in line
        )
        # uvicorn re-raises the signal once its graceful shutdown is complete.
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
        assert "server.stopped" in srv.logs()
        for pid in workers:
            assert (
                not os.path.exists(f"/proc/{pid}")
                or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
            )
    finally:
        srv.stop()
    # A second start reuses the home: same admin key, none printed again.
    again = BastionServer(home)
    try:
        again.wait_ready(["echo"], timeout=120)
        assert again.admin_key == first_key
    finally:
        again.stop()
    assert first_key not in again.stdout_path.read_text()
