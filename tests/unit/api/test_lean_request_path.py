"""The parts of the leaner request path beside api/fast.py, each held to what it replaced:
one write per whole answer (api/transport.py), the usage journal's records written by the
end of the event loop's turn and before any answer they precede (quotas/journal.py), the
packing of JSON float tensors (api/tensors.py), cached metric children and the in-flight
gauge (observability/metrics.py), and the two deadlines without asyncio.timeout (the
body's, api/body.py, and the model call's, gateway/gateway.py)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bastion.api.body import read_body
from bastion.api.schemas import OipInputTensor
from bastion.api.tensors import _numeric_array, to_tensor_data
from bastion.api.transport import HeldWrites
from bastion.errors import InvalidRequest, RequestTimeout
from bastion.gateway.gateway import _Deadline
from bastion.observability.metrics import Metrics
from bastion.quotas.journal import UsageJournal, _read
from bastion.wire.protocol import TensorSpec

pytestmark = pytest.mark.unit


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def test_a_held_head_leaves_with_its_body() -> None:
    transport = Transport()
    writes = HeldWrites(transport)  # type: ignore[arg-type]
    writes.write(b"unheld")
    writes.hold()
    writes.write(b"head;")
    assert transport.writes == [b"unheld"]
    writes.write(b"body")
    writes.release()
    writes.write(b"next")
    assert transport.writes == [b"unheld", b"head;body", b"next"]


def test_a_big_body_is_not_copied_to_join_its_head() -> None:
    transport = Transport()
    writes = HeldWrites(transport)  # type: ignore[arg-type]
    big = b"x" * (1024 * 1024)
    writes.hold()
    writes.write(b"head;")
    writes.write(memoryview(big))
    assert transport.writes == [b"head;", big]


def test_what_is_held_goes_out_on_release_and_close_and_not_on_abort() -> None:
    transport = Transport()
    writes = HeldWrites(transport)  # type: ignore[arg-type]
    writes.hold()
    writes.write(b"head")
    writes.release()
    assert transport.writes == [b"head"]
    writes.hold()
    writes.write(b"again")
    writes.close()
    assert transport.writes == [b"head", b"again"] and transport.closed
    aborted = Transport()
    writes = HeldWrites(aborted)  # type: ignore[arg-type]
    writes.hold()
    writes.write(b"dropped")
    writes.abort()
    assert aborted.writes == [] and aborted.aborted


RECORD = ("acme", "echo", 1_700_000_000, 1, 0, 5, 7, 0.25)


def _lines(journal: UsageJournal) -> list[tuple[Any, ...]]:
    return list(_read(journal.current))


def test_outside_an_event_loop_a_record_is_written_at_once(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    journal.append(RECORD)
    assert _lines(journal) == [RECORD]
    journal.close()


def test_the_records_of_a_turn_are_written_as_it_ends(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)

    async def run() -> None:
        journal.append(RECORD)
        journal.append(RECORD)
        assert _lines(journal) == []
        await asyncio.sleep(0)
        assert _lines(journal) == [RECORD, RECORD]

    asyncio.run(run())
    journal.close()


def test_a_record_is_on_disk_before_the_task_it_wakes_runs(tmp_path: Path) -> None:
    # The worker's reply: settled (recorded), then the waiting request woken, in one
    # callback. The request answers as soon as it runs: its record must be written by then.
    journal = UsageJournal(tmp_path)
    seen: list[list[tuple[Any, ...]]] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        reply = loop.create_future()

        async def request() -> None:
            await reply
            seen.append(_lines(journal))

        task = asyncio.create_task(request())
        await asyncio.sleep(0)

        def reply_arrives() -> None:
            journal.append(RECORD)
            reply.set_result(None)

        loop.call_soon(reply_arrives)
        await task

    asyncio.run(run())
    assert seen == [[RECORD]]
    journal.close()


def test_sync_writes_the_turn_so_far_and_rotation_keeps_it(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)

    async def run() -> None:
        journal.append(RECORD)
        journal.sync()  # an answer about to leave in this turn (a refusal)
        assert _lines(journal) == [RECORD]
        journal.append(RECORD)
        pending = journal.rotate()
        assert list(_read(pending)) == [RECORD, RECORD]
        journal.append(RECORD)
        await asyncio.sleep(0)
        assert _lines(journal) == [RECORD]

    asyncio.run(run())
    journal.close()


def _fp(datatype: str, data: list[Any], shape: list[int] | None = None) -> OipInputTensor:
    shape = shape or [len(data)]
    return OipInputTensor(name="x", shape=shape, datatype=datatype, data=data)  # type: ignore[arg-type]


def _spec(datatype: str, shape: list[int]) -> TensorSpec:
    return TensorSpec(name="x", datatype=datatype, shape=[-1] * len(shape))


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize(
    "values",
    [
        [0.1, -2.5, 3, 0, -0.0, 1e-45, 5e-324, 16777217, 2**60, -(2**63), 0.30000000000000004],
        [3.4028235e38, -3.4028234e38, 1.7976931348623157e308],
        [3.5e38],
        [1e39, 1.0],
        [10**400],
        [1.0, True],
        [1.0, "2"],
        [1.0, None],
        [float("inf")],
        [],
    ],
)
def test_float_tensors_pack_as_numpy_packs_them(datatype: str, values: list[Any]) -> None:
    tensor = _fp(datatype, values)
    spec = _spec(datatype, tensor.shape)
    try:
        expected: bytes | str = _numeric_array("x", datatype, values).tobytes()
    except InvalidRequest as exc:
        expected = exc.message
    try:
        got: bytes | str = to_tensor_data(tensor, spec).raw
    except InvalidRequest as exc:
        got = exc.message
    assert got == expected


def test_nested_float_data_is_flattened_first() -> None:
    tensor = _fp("FP32", [[1.5, 2], [3, 4.25]], shape=[2, 2])
    packed = to_tensor_data(tensor, _spec("FP32", [2, 2])).raw
    assert np.frombuffer(packed, "<f4").tolist() == [1.5, 2.0, 3.0, 4.25]
    short = _fp("FP32", [[1.5, 2], [3]], shape=[2, 2])
    with pytest.raises(InvalidRequest, match="has 3 values"):
        to_tensor_data(short, _spec("FP32", [2, 2]))


def test_a_sum_of_float32_values_in_double_cannot_overflow() -> None:
    # Why the FP32 check may sum: the most elements, each the largest float32.
    assert math.isfinite(16 * 1024 * 1024 * 3.4028234663852886e38)


def test_cached_children_are_the_metric_s_own_and_in_flight_is_read_when_rendered() -> None:
    metrics = Metrics()
    child = metrics.requests_of("/r", "m", "t", "200")
    assert child is metrics.requests_of("/r", "m", "t", "200")
    child.inc()
    metrics.requests.labels("/r", "m", "t", "200").inc()
    text = metrics.render().decode()
    assert 'bastion_requests_total{model="m",route="/r",status="200",tenant="t"} 2.0' in text
    assert "bastion_in_flight_requests 0.0" in text
    metrics.serving += 2
    assert "bastion_in_flight_requests 2.0" in metrics.render().decode()


class _Request:
    """What read_body uses of a Starlette request."""

    def __init__(self, receive: Any, timeout: float | None) -> None:
        from types import SimpleNamespace

        self.app = SimpleNamespace(state=SimpleNamespace(body_timeout_s=timeout))
        self.headers: dict[str, str] = {}
        self.receive = receive
        self.scope: dict[str, Any] = {"state": {}}


def test_a_body_that_does_not_come_in_time_is_a_408_and_one_that_does_is_read() -> None:
    async def never() -> dict[str, Any]:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    async def parts() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"type": "http.request", "body": b"abc", "more_body": False}

    async def run() -> None:
        with pytest.raises(RequestTimeout):
            await read_body(_Request(never, 0.05), 100)  # type: ignore[arg-type]
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        request = _Request(parts, 0.05)
        assert await read_body(request, 100) == b"abc"  # type: ignore[arg-type]
        assert request.scope["state"]["body_bytes"] == 3

    asyncio.run(run())


def test_a_request_cancelled_while_reading_its_body_is_no_timeout() -> None:
    async def never() -> dict[str, Any]:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    async def run() -> None:
        reading = asyncio.create_task(read_body(_Request(never, 5.0), 100))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        reading.cancel()  # the client left
        with pytest.raises(asyncio.CancelledError):
            await reading

    asyncio.run(run())


def test_the_model_call_deadline_is_a_timeout_and_a_cancel_is_not() -> None:
    async def waits(when: float) -> None:
        loop = asyncio.get_running_loop()
        with _Deadline(loop, loop.time() + when):
            await asyncio.sleep(10)

    async def run() -> None:
        with pytest.raises(TimeoutError):
            await waits(0.02)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        waiting = asyncio.create_task(waits(5.0))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        loop = asyncio.get_running_loop()
        with _Deadline(loop, loop.time() + 5.0):
            await asyncio.sleep(0)  # done in time: nothing raised, no cancel left behind

    asyncio.run(run())


@pytest.mark.parametrize("status", [200, 400, 404, 503, 204, 101])
def test_a_json_answer_has_the_headers_starlette_would_give_it(status: int) -> None:
    from starlette.responses import Response

    from bastion.api.context import JSONAnswer

    body = b'{"a":1}'
    ours = JSONAnswer(body, status)
    theirs = Response(body, status, media_type="application/json")
    assert ours.raw_headers == theirs.raw_headers
    assert (ours.status_code, ours.body, ours.background) == (status, body, None)


def test_a_body_already_in_hand_is_read_without_a_deadline() -> None:
    from bastion.api.body import BODY_RECEIVED

    async def late() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"abc", "more_body": False}

    async def run() -> None:
        request = _Request(late, 0.001)
        with pytest.raises(RequestTimeout):
            await read_body(request, 100)  # type: ignore[arg-type]
        # The server says the whole body is in: no deadline (none could pass).
        request = _Request(late, 0.001)
        request.scope["state"][BODY_RECEIVED] = True
        assert await read_body(request, 100) == b"abc"  # type: ignore[arg-type]

    asyncio.run(run())
