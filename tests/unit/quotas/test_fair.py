"""The fair queue: weighted fair order across tenants, bounded size, nobody locked out."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.errors import ConfigurationError
from bastion.quotas.fair import FairQueue, Hold, QueueFull


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


async def _serve_all(queue: FairQueue, arrivals: list[str]) -> list[str]:
    """Queue `arrivals` (tenants, in order) behind one held slot; the order they get it."""
    served: list[str] = []

    async def one(tenant: str) -> None:
        hold = await queue.acquire(tenant)
        served.append(tenant)
        hold.release()

    holder = await queue.acquire("holder")
    tasks = []
    for tenant in arrivals:
        tasks.append(asyncio.create_task(one(tenant)))
        await asyncio.sleep(0)
    assert queue.queued == len(arrivals)
    holder.release()
    await asyncio.gather(*tasks)
    return served


@run_async
async def test_a_quiet_tenant_overtakes_a_flood() -> None:
    queue = FairQueue(slots=1, size=100)
    served = await _serve_all(queue, ["flood"] * 20 + ["quiet"] * 2)
    # Arrived last, behind twenty: served among the first, alternating with the flood.
    assert served[:4].count("quiet") == 2


@run_async
async def test_weights_set_the_shares() -> None:
    weights = {"gold": 3.0, "basic": 1.0}
    queue = FairQueue(slots=1, size=100, weight_of=lambda tenant: weights.get(tenant, 1.0))
    served = await _serve_all(queue, ["basic"] * 12 + ["gold"] * 12)
    first = served[:12]
    # While both have requests waiting, gold gets three of every four turns.
    assert first.count("gold") == 9 and first.count("basic") == 3


@run_async
async def test_an_idle_tenant_banks_nothing() -> None:
    queue = FairQueue(slots=1, size=100)
    # "early" used the model alone for a long time; "late" was idle meanwhile.
    for _ in range(50):
        (await queue.acquire("early")).release()
    served = await _serve_all(queue, ["late"] * 6 + ["early"] * 6)
    # "late" gets no burst of fifty turns for having been idle: the two alternate.
    assert served[:4].count("early") >= 1


@run_async
async def test_free_slots_admit_at_once_and_the_rest_wait() -> None:
    queue = FairQueue(slots=2, size=10)
    first = await queue.acquire("a")
    await queue.acquire("a")
    waiter = asyncio.create_task(queue.acquire("b"))
    await asyncio.sleep(0)
    assert not waiter.done() and queue.queued == 1
    first.release()
    await asyncio.wait_for(waiter, 1)
    assert queue.queued == 0


@run_async
async def test_a_full_queue_refuses_the_tenant_that_fills_it() -> None:
    queue = FairQueue(slots=1, size=3, retry_after_s=2)
    held = await queue.acquire("flood")
    waiting = [asyncio.create_task(queue.acquire("flood")) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as refused:
        await queue.acquire("flood")
    assert refused.value.status == 503 and refused.value.headers["retry-after"] == "2"
    # Another tenant is not locked out: the flood's newest waiting request gives way.
    quiet = asyncio.create_task(queue.acquire("quiet"))
    await asyncio.wait([waiting[-1]], timeout=1)
    assert waiting[-1].done() and isinstance(waiting[-1].exception(), QueueFull)
    assert queue.queued == 3
    held.release()
    await asyncio.wait_for(quiet, 1)
    for task in waiting[:-1]:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert queue.queued == 0


@run_async
async def test_a_request_that_gives_up_leaves_the_queue() -> None:
    queue = FairQueue(slots=1, size=10)
    held = await queue.acquire("a")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await queue.acquire("b")
    assert queue.queued == 0
    held.release()
    # The slot is free again: nothing was lost to the request that left.
    async with asyncio.timeout(1):
        await queue.acquire("c")


@run_async
async def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    queue = FairQueue(slots=1, size=10)
    held = await queue.acquire("a")
    first = asyncio.create_task(queue.acquire("b"))
    second = asyncio.create_task(queue.acquire("c"))
    await asyncio.sleep(0)
    held.release()  # hands the slot to "b"...
    first.cancel()  # ...which gives up before it runs
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert queue.free + queue.held == 1


@run_async
async def test_a_release_while_the_next_waiter_is_being_cancelled_loses_no_slot() -> None:
    # The finding: the deadline cancels a waiter, and before it wakes to leave the queue,
    # the holder releases. The slot went to the cancelled waiter (InvalidStateError), and
    # with one slot the model then served no one until restarted.
    queue = FairQueue(slots=1, size=10)
    held = await queue.acquire("a")
    waiter = asyncio.create_task(queue.acquire("b"))
    await asyncio.sleep(0)
    waiter.cancel()  # the deadline...
    held.release()  # ...and a release in the same turn
    await asyncio.gather(waiter, return_exceptions=True)
    assert waiter.cancelled()
    assert (queue.free, queue.held, queue.queued) == (1, 0, 0)
    async with asyncio.timeout(1):
        (await queue.acquire("c")).release()


@run_async
async def test_a_full_queue_whose_newest_waiter_just_gave_up_still_makes_room() -> None:
    queue = FairQueue(slots=1, size=2)
    held = await queue.acquire("flood")
    waiting = [asyncio.create_task(queue.acquire("flood")) for _ in range(2)]
    await asyncio.sleep(0)
    waiting[-1].cancel()  # gave up, not yet out of the queue
    quiet = asyncio.create_task(queue.acquire("quiet"))
    await asyncio.sleep(0)
    held.release()
    await asyncio.gather(waiting[-1], return_exceptions=True)
    # The quiet tenant got in, and both it and the flood's first waiter are served in turn.
    pending = {quiet, waiting[0]}
    async with asyncio.timeout(1):
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result().release()
    assert (queue.free, queue.held, queue.queued) == (1, 0, 0)


@run_async
async def test_a_hold_kept_past_the_deadline_is_found_and_reclaimed() -> None:
    now = [0.0]
    queue = FairQueue(slots=1, size=10, clock=lambda: now[0])
    leaked = await queue.acquire("a")
    waiter = asyncio.create_task(queue.acquire("b"))
    await asyncio.sleep(0)
    now[0] = 30.0
    assert not queue.stalled(60.0) and queue.overdue(60.0) == []
    now[0] = 61.0
    assert queue.stalled(60.0) and queue.overdue(60.0) == [leaked]
    queue.reclaim(leaked)
    hold = await asyncio.wait_for(waiter, 1)
    # The leaked hold's late release changes nothing: still one slot, held by "b".
    leaked.release()
    assert (queue.free, queue.held) == (0, 1)
    hold.release()
    assert (queue.free, queue.held) == (1, 0)


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        FairQueue(slots=0, size=1)
    with pytest.raises(ConfigurationError):
        FairQueue(slots=1, size=-1)


# ---------------------------------------------------------------- slot accounting, by property

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.sampled_from("abc")),
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
        st.tuples(st.just("timeout"), st.sampled_from("abc")),
        st.tuples(st.just("release_and_cancel"), st.integers(0, 20)),
        st.tuples(st.just("tick"), st.just("")),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slots=st.integers(1, 3), size=st.integers(0, 6), ops=_OPS)
def test_free_and_held_slots_always_add_up_and_no_waiter_is_lost(
    slots: int, size: int, ops: list[tuple[str, Any]]
) -> None:
    """Random acquires, releases, cancellations and timeouts, interleaved in one event
    loop turn or across turns: free + held == slots after every step, and once every
    holder lets go, every waiter that did not give up got a slot."""

    async def scenario() -> None:
        queue = FairQueue(slots=slots, size=size)
        tasks: list[asyncio.Task[Hold]] = []
        holds: list[Hold] = []

        def collect() -> None:
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is None:
                    hold = task.result()
                    if hold not in holds:
                        holds.append(hold)

        async def settle() -> None:
            for _ in range(3):
                await asyncio.sleep(0)
            collect()
            live = [h for h in holds if not h.released]
            assert queue.free + queue.held == slots
            assert queue.held == len(live)
            assert 0 <= queue.queued <= max(size, 0) + 1

        for op, arg in ops:
            if op == "acquire":
                tasks.append(asyncio.create_task(queue.acquire(arg)))
            elif op == "timeout":
                tasks.append(asyncio.create_task(_with_timeout(queue, arg)))
            elif op in ("release", "release_and_cancel"):
                live = [h for h in holds if not h.released]
                if live:
                    live[arg % len(live)].release()
                if op == "release_and_cancel":
                    # In the same turn: the next waiter is cancelled as it is handed the slot.
                    pending = [t for t in tasks if not t.done()]
                    if pending:
                        pending[arg % len(pending)].cancel()
            elif op == "cancel":
                pending = [t for t in tasks if not t.done()]
                if pending:
                    pending[arg % len(pending)].cancel()
            if op == "tick" or len(tasks) % 3 == 0:
                await settle()
        await settle()
        # Everyone lets go: every waiter still waiting gets a slot in turn, none is lost.
        for _ in range(len(tasks) + slots + 5):
            for hold in holds:
                hold.release()
            await settle()
        for task in tasks:
            assert task.done(), "a waiter was lost"
            if not task.cancelled() and task.exception() is None:
                task.result().release()
        await settle()
        assert queue.free == slots and queue.held == 0 and queue.queued == 0

    asyncio.run(scenario())


async def _with_timeout(queue: FairQueue, tenant: str) -> Hold:
    async with asyncio.timeout(0):
        return await queue.acquire(tenant)
