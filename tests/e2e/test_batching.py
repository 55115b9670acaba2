"""Dynamic batching against a real server: requests of several tenants share one runtime
call, each gets its own answer, errors and usage; the window lets a batch form."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime
import pytest

from bastion.client import OHTTPTransport
from bastion.models.demo import digits_onnx, digits_split
from bastion_testing import (
    BastionServer,
    add_echo_model,
    batched_requests,
    ohttp_fingerprints,
    run_cli,
)

pytestmark = pytest.mark.e2e

# Long enough that concurrent requests always meet in one batch, short enough for a test.
DELAY_US = 150_000
MAX_SIZE = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    base = tmp_path_factory.mktemp("batching")
    model = base / "digits"
    model.mkdir()
    (model / "model.onnx").write_bytes(digits_onnx())
    home = base / "home"
    run_cli(home, "init", "--no-demo-models")
    run_cli(
        home, "models", "add", "digits", "--runtime", "onnx", "--path", str(model),
        "--option", f"batch.max_size={MAX_SIZE}",
        "--option", f"batch.max_queue_delay_us={DELAY_US}",
        # Whole scores, no watermark: answers compare with the model's own, row by row.
        "--protect", "output=full", "--protect", "monitor=off",
        "--option", "protect.watermark=off",
    )  # fmt: skip
    add_echo_model(home)
    srv = BastionServer(home)
    try:
        srv.wait_ready(["digits", "echo"])
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def keys(server: BastionServer) -> dict[str, str]:
    # Through the admin API, which applies at once (the CLI's changes within a refresh).
    found = {}
    with server.client() as admin:
        for tenant in ("alpha", "beta"):
            assert admin.post("/admin/v1/tenants", json={"name": tenant}).status_code == 201
            created = admin.post("/admin/v1/keys", json={"tenant": tenant, "role": "consumer"})
            assert created.status_code == 201, created.text
            found[tenant] = created.json()["key"]
    return found


def _body(rows: np.ndarray[Any, Any], columns: int = 64) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": [len(rows), columns],
                "datatype": "FP32",
                "data": rows.astype(np.float32).reshape(-1).tolist(),
            }
        ]
    }


def _expected(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    session = onnxruntime.InferenceSession(digits_onnx(), providers=["CPUExecutionProvider"])
    probabilities: np.ndarray[Any, Any] = session.run(["probabilities"], {"input": rows})[0]
    return probabilities


def _batch_metrics(server: BastionServer) -> tuple[float, float]:
    return batched_requests(server, "digits")


async def _send_all(
    url: str, jobs: list[tuple[str, dict[str, Any], float]]
) -> list[httpx.Response | None]:
    """Send every (key, body, timeout) at once; None for a request that timed out."""
    async with httpx.AsyncClient(base_url=url) as client:

        async def one(key: str, body: dict[str, Any], timeout: float) -> httpx.Response | None:
            try:
                return await client.post(
                    "/v2/models/digits/infer",
                    json=body,
                    headers={"authorization": f"Bearer {key}"},
                    timeout=timeout,
                )
            except httpx.TimeoutException:
                return None

        return await asyncio.gather(*(one(*job) for job in jobs))


def test_metadata_declares_the_batching(server: BastionServer, keys: dict[str, str]) -> None:
    with server.client(keys["alpha"]) as client:
        metadata = client.get("/v2/models/digits").json()
    assert metadata["batching"] == {
        "max_batch_size": MAX_SIZE,
        "max_queue_delay_microseconds": DELAY_US,
        "preferred_batch_size": [],
    }


def test_two_tenants_share_a_batch_and_each_gets_only_its_own_answers(
    server: BastionServer, keys: dict[str, str]
) -> None:
    images = digits_split()[1][:40]
    # Requests of one to three rows, alternating tenants; one with the wrong width and
    # one with the wrong datatype, which fail alone.
    jobs: list[tuple[str, dict[str, Any], float]] = []
    spans: list[tuple[int, int] | None] = []
    start = 0
    for index in range(12):
        size = 1 + index % 3
        jobs.append(
            (keys["alpha" if index % 2 else "beta"], _body(images[start : start + size]), 30)
        )
        spans.append((start, start + size))
        start += size
    jobs.append((keys["alpha"], _body(images[:1, :60], columns=60), 30))
    spans.append(None)
    wrong_type = _body(images[:1])
    wrong_type["inputs"][0]["datatype"] = "INT32"
    wrong_type["inputs"][0]["data"] = [int(v) for v in wrong_type["inputs"][0]["data"]]
    jobs.append((keys["beta"], wrong_type, 30))
    spans.append(None)
    before = _batch_metrics(server)
    answers = asyncio.run(_send_all(server.url, jobs))
    expected = _expected(images[:start])
    for answer, span in zip(answers, spans, strict=True):
        assert answer is not None
        if span is None:
            assert answer.status_code == 400, answer.text
            assert "error" in answer.json()
            continue
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        got = np.asarray(outputs["probabilities"]["data"], dtype=np.float32)
        lo, hi = span
        # Its own rows, and only them: the answer of the model on exactly these rows.
        assert outputs["probabilities"]["shape"] == [hi - lo, 10]
        np.testing.assert_allclose(got.reshape(hi - lo, 10), expected[lo:hi], rtol=1e-5, atol=1e-7)
        assert outputs["label"]["data"] == expected[lo:hi].argmax(axis=1).tolist()
    batched, total = _batch_metrics(server)
    assert total - before[1] >= 12
    # Most requests met others in a batch (the delay holds the first for the rest).
    assert batched - before[0] >= 8


def test_a_request_cancelled_inside_a_batch_leaves_its_mates_unharmed(
    server: BastionServer, keys: dict[str, str]
) -> None:
    images = digits_split()[1][:6]
    # The first client gives up long before the batch's delay is over.
    jobs = [(keys["alpha"], _body(images[0:1]), 0.02)]
    jobs += [(keys["beta"], _body(images[i : i + 1]), 30) for i in range(1, 6)]
    answers = asyncio.run(_send_all(server.url, jobs))
    assert answers[0] is None
    expected = _expected(images)
    for i, answer in enumerate(answers[1:], start=1):
        assert answer is not None and answer.status_code == 200, answer
        got = answer.json()["outputs"]
        probabilities = next(o for o in got if o["name"] == "probabilities")["data"]
        np.testing.assert_allclose(probabilities, expected[i], rtol=1e-5, atol=1e-7)
    # The worker goes on serving.
    with server.client(keys["alpha"]) as client:
        assert client.post("/v2/models/digits/infer", json=_body(images[:1])).status_code == 200


def test_the_window_lets_a_batch_form_and_shows_in_metrics(
    server: BastionServer, keys: dict[str, str]
) -> None:
    with server.client() as admin:
        text = admin.get("/metrics").text
    # The window of a batching model is at least its batch size.
    window = re.search(r'^bastion_dispatch_window\{model="digits"\} (\S+)$', text, re.M)
    queue_delay = re.search(
        r'^bastion_worker_queue_seconds_count\{model="digits"\} (\S+)$', text, re.M
    )
    assert queue_delay is not None and float(queue_delay.group(1)) > 0
    assert window is not None and float(window.group(1)) >= MAX_SIZE


def test_invalid_batch_options_are_refused_by_the_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    proc = run_cli(
        home, "models", "add", "broken", "--runtime", "onnx", "--path", str(tmp_path),
        "--option", "batch.max_size=0", check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "batch.max_size" in proc.stderr + proc.stdout


def test_a_fast_models_window_grows_to_hide_the_round_trip(
    server: BastionServer, keys: dict[str, str]
) -> None:
    """The echo model answers in microseconds, far less than a round trip: the gateway
    soon keeps several of its requests at the worker at once."""
    body = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
    }

    async def load() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            headers = {"authorization": f"Bearer {keys['alpha']}"}

            async def worker() -> None:
                for _ in range(40):
                    answer = await client.post("/v2/models/echo/infer", json=body, headers=headers)
                    assert answer.status_code == 200, answer.text

            await asyncio.gather(*(worker() for _ in range(8)))

    asyncio.run(load())
    with server.client() as admin:
        text = admin.get("/metrics").text
    window = re.search(r'^bastion_dispatch_window\{model="echo"\} (\S+)$', text, re.M)
    assert window is not None and float(window.group(1)) > 1


def test_encrypted_requests_join_batches_after_decryption(
    server: BastionServer, keys: dict[str, str]
) -> None:
    """OHTTP requests are opened in the worker; their inner requests join the same batches
    as plaintext ones, and each still gets its own (encrypted) answer."""
    images = digits_split()[1][:8]
    fingerprints = ohttp_fingerprints(server.home)

    async def scenario() -> list[httpx.Response]:
        headers = {"authorization": f"Bearer {keys['alpha']}"}
        async with (
            httpx.AsyncClient(
                base_url=server.url,
                headers=headers,
                transport=OHTTPTransport(fingerprints=fingerprints),
                timeout=30,
            ) as sealed,
            httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as plain,
        ):
            return await asyncio.gather(
                *(
                    (sealed if i % 2 else plain).post(
                        "/v2/models/digits/infer", json=_body(images[i : i + 1])
                    )
                    for i in range(len(images))
                )
            )

    before = _batch_metrics(server)
    answers = asyncio.run(scenario())
    after = _batch_metrics(server)
    expected = _expected(images)
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        got = next(o for o in answer.json()["outputs"] if o["name"] == "probabilities")
        np.testing.assert_allclose(got["data"], expected[i], rtol=1e-5, atol=1e-7)
    # All eight ran with others, the encrypted ones included (each reports its batch).
    assert after[1] - before[1] == len(images)
    assert after[0] - before[0] == len(images)
