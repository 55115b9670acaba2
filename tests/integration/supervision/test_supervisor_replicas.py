"""A model with several replicas: one real worker each, requests to the least busy one.

Requests are held open in the workers with the echo runtime's `__sleep__:S` hook, so which
replica holds what is read from each replica's count of requests in flight, not from timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

import pytest
from test_supervisor import (
    WAIT_S,
    echo_spec,
    generate,
    load,
    process_exists,
    run,
    supervisor,
    wait_until,
)

from bastion.audit.events import MODEL_FAILED, MODEL_UNLOADED, WORKER_CRASHED
from bastion.errors import ModelUnavailable, WorkerCrashed
from bastion.supervision.channel import Reply
from bastion.supervision.supervisor import ModelSpec, ModelState, ModelStatus, Supervisor
from bastion.wire.protocol import GenerateResult

pytestmark = pytest.mark.integration

NAME = "echo-r"


async def load_replicas(sup: Supervisor, count: int) -> list[ModelStatus]:
    """Load NAME with `count` replicas and wait until every one is ready."""
    await load(sup, echo_spec(NAME, replicas=count))
    async with asyncio.timeout(WAIT_S):
        while not all(s.state is ModelState.READY for s in sup.replica_statuses(NAME)):
            await asyncio.sleep(0.05)
    replicas = sup.replica_statuses(NAME)
    assert len(replicas) == count
    return replicas


def hold(sup: Supervisor, seconds: float = 60) -> asyncio.Future[Reply]:
    """A request that keeps its worker busy for `seconds` (cancelling it cancels the work)."""
    return asyncio.ensure_future(sup.call(NAME, generate(f"__sleep__:{seconds:g} done")))


async def until_in_flight(sup: Supervisor, expected: list[int]) -> None:
    async with asyncio.timeout(WAIT_S):
        while sup.replica_in_flight(NAME) != expected:
            await asyncio.sleep(0.01)


async def cancel(*requests: asyncio.Future[Any]) -> None:
    for request in requests:
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request


def test_replicas_are_distinct_workers_and_requests_go_to_the_least_busy() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, _):
            replicas = await load_replicas(sup, 3)
            pids = [s.pid for s in replicas]
            assert None not in pids and len(set(pids)) == 3
            assert all(process_exists(pid) for pid in pids if pid is not None)
            status = sup.status(NAME)
            assert status.state is ModelState.READY
            assert status.pid == pids[0]
            assert status.detail is None and status.restarts == 0
            assert status.metadata is not None and sup.ready_metadata(NAME) == status.metadata

            # Idle replicas take turns; each busy one is passed over for an idle one.
            first, second, third = hold(sup), hold(sup), hold(sup)
            await until_in_flight(sup, [1, 1, 1])
            assert sup.in_flight(NAME) == 3
            await cancel(second)
            assert sup.replica_in_flight(NAME) == [1, 0, 1]
            # The next turn would be the first replica's; the idle second one wins.
            fourth = hold(sup)
            await until_in_flight(sup, [1, 1, 1])
            await cancel(first, third, fourth)
            assert sup.replica_in_flight(NAME) == [0, 0, 0]

            # Streams pick their worker when opened, before any is sent: the turns alone
            # spread them.
            streams = [sup.stream(NAME, generate("__sleep__:60", stream=True)) for _ in range(3)]
            reading = [asyncio.ensure_future(anext(s)) for s in streams]
            await until_in_flight(sup, [1, 1, 1])
            await cancel(*reading)
            for stream in streams:
                await stream.aclose()
            assert sup.in_flight(NAME) == 0

            answers = await asyncio.gather(
                *(sup.call(NAME, generate(f"word {i}")) for i in range(9))
            )
            assert [a.choices[0].text for a in answers if isinstance(a, GenerateResult)] == [
                f"word {i}" for i in range(9)
            ]
            assert [s.pid for s in sup.replica_statuses(NAME)] == pids
        assert not any(process_exists(pid) for pid in pids if pid is not None)

    run(scenario())


def test_a_killed_replica_fails_only_its_requests_and_comes_back() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, events):
            replicas = await load_replicas(sup, 3)
            pids = [s.pid for s in replicas]
            held = [hold(sup), hold(sup), hold(sup)]
            await until_in_flight(sup, [1, 1, 1])

            victim = pids[1]
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(WorkerCrashed) as caught:
                await held[1]
            assert caught.value.status == 503
            assert int(caught.value.headers["retry-after"]) >= 1
            assert not held[0].done() and not held[2].done()

            # The others serve while it restarts.
            status = sup.status(NAME)
            assert status.state is ModelState.READY
            assert status.detail is not None
            assert status.detail.startswith("2 of 3 replicas ready; one is restarting")
            assert sup.replica_statuses(NAME)[1].state is ModelState.RESTARTING
            await cancel(held[0], held[2])
            answers = await asyncio.gather(
                *(sup.call(NAME, generate("meanwhile")) for _ in range(4))
            )
            assert all(isinstance(a, GenerateResult) for a in answers)

            async with asyncio.timeout(WAIT_S):
                while True:
                    back = sup.replica_statuses(NAME)[1]
                    if back.state is ModelState.READY and back.restarts >= 1:
                        break
                    await asyncio.sleep(0.05)
            assert back.pid is not None and back.pid not in pids
            assert not process_exists(victim)
            now = sup.replica_statuses(NAME)
            assert [now[0].pid, now[2].pid] == [pids[0], pids[2]]
            assert [s.restarts for s in now] == [0, 1, 0]
            assert sup.status(NAME).restarts == 1
            assert sup.status(NAME).detail is None

            crashes = [e for e in events.events if e.kind == WORKER_CRASHED]
            assert [e.detail["pid"] for e in crashes] == [victim]
            # The new worker takes its share again.
            again = [hold(sup), hold(sup), hold(sup)]
            await until_in_flight(sup, [1, 1, 1])
            await cancel(*again)

    run(scenario())


def test_unload_drains_and_stops_every_replica() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, events):
            replicas = await load_replicas(sup, 2)
            pids = [s.pid for s in replicas]
            held = [hold(sup, 1), hold(sup, 1)]
            await until_in_flight(sup, [1, 1])

            unloading = asyncio.ensure_future(sup.unload(NAME))
            await asyncio.sleep(0.1)
            with pytest.raises(ModelUnavailable):
                sup.stream(NAME, generate("refused"))
            assert all(s.state is ModelState.STOPPING for s in sup.replica_statuses(NAME))
            for request in held:
                result = await request
                assert isinstance(result, GenerateResult)
                assert result.choices[0].text == "__sleep__:1 done"
            await unloading

            assert sup.status(NAME).state is ModelState.UNLOADED
            assert sup.statuses() == {} and sup.replica_statuses(NAME) == []
            assert not any(process_exists(pid) for pid in pids if pid is not None)
            assert events.kinds().count(MODEL_UNLOADED) == 1
            assert WORKER_CRASHED not in events.kinds()

    run(scenario())


def test_changing_the_replicas_replaces_every_worker() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, _):
            two = [s.pid for s in await load_replicas(sup, 2)]
            await sup.ensure(echo_spec(NAME, replicas=2))
            assert [s.pid for s in sup.replica_statuses(NAME)] == two

            three = [s.pid for s in await load_replicas(sup, 3)]
            assert not set(two) & set(three)
            assert not any(process_exists(pid) for pid in two if pid is not None)

            one = await load(sup, echo_spec(NAME, replicas=1))
            assert [s.pid for s in sup.replica_statuses(NAME)] == [one.pid]
            assert one.pid not in three
            # With one replica the model's status is that replica's.
            default = await load(sup, echo_spec(NAME))
            (only,) = sup.replica_statuses(NAME)
            assert only.pid == default.pid and sup.status(NAME) == only

    run(scenario())


@pytest.mark.parametrize("value", [0, -1, 65, 2.0, True, "2", [2]])
def test_a_bad_replicas_option_fails_the_model_with_a_reason(value: object) -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, events):
            first = await load(sup, echo_spec(NAME))
            await sup.ensure(echo_spec(NAME, replicas=value))
            status = await sup.wait_ready(NAME, WAIT_S)
            assert status.state is ModelState.FAILED
            assert status.detail is not None
            assert status.detail.startswith("The replicas option must be an integer from 1 to 64")
            assert first.pid is not None and not process_exists(first.pid)
            with pytest.raises(ModelUnavailable) as caught:
                sup.stream(NAME, generate("hello"))
            assert "failed" in caught.value.message
            failures = [e for e in events.events if e.kind == MODEL_FAILED]
            assert [e.detail["reason"] for e in failures] == ["ConfigurationError"]

            # Fixed, it loads.
            await load(sup, echo_spec(NAME, replicas=2))
            await sup.unload(NAME)
            assert sup.statuses() == {}

    run(scenario())


def test_a_model_no_replica_can_load_says_why() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, _):
            spec = ModelSpec("broken", "no-such-runtime", echo_spec().path, {"replicas": 2})
            await sup.ensure(spec)
            status = await sup.wait_ready("broken", WAIT_S)
            assert status.state is ModelState.FAILED
            assert status.detail is not None
            assert status.detail.startswith("ValueError: unknown runtime")
            assert len(sup.replica_statuses("broken")) == 2
            with pytest.raises(ModelUnavailable) as caught:
                sup.stream("broken", generate("hello"))
            assert "failed" in caught.value.message
            # Each replica retries on its own; the model counts them all.
            await wait_until(sup, "broken", lambda s: s.restarts >= 2)

    run(scenario())
