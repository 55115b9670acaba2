"""The fair queue: weighted fair order across tenants, bounded size, nobody locked out."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from bastion.errors import ConfigurationError
from bastion.quotas.fair import FairQueue, QueueFull


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


async def _serve_all(queue: FairQueue, arrivals: list[str]) -> list[str]:
    """Queue `arrivals` (tenants, in order) behind one held slot; the order they get it."""
    served: list[str] = []

    async def one(tenant: str) -> None:
        await queue.acquire(tenant)
        served.append(tenant)
        queue.release()

    await queue.acquire("holder")
    tasks = []
    for tenant in arrivals:
        tasks.append(asyncio.create_task(one(tenant)))
        await asyncio.sleep(0)
    assert queue.queued == len(arrivals)
    queue.release()
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
        await queue.acquire("early")
        queue.release()
    served = await _serve_all(queue, ["late"] * 6 + ["early"] * 6)
    # "late" gets no burst of fifty turns for having been idle: the two alternate.
    assert served[:4].count("early") >= 1


@run_async
async def test_free_slots_admit_at_once_and_the_rest_wait() -> None:
    queue = FairQueue(slots=2, size=10)
    await queue.acquire("a")
    await queue.acquire("a")
    waiter = asyncio.create_task(queue.acquire("b"))
    await asyncio.sleep(0)
    assert not waiter.done() and queue.queued == 1
    queue.release()
    await asyncio.wait_for(waiter, 1)
    assert queue.queued == 0


@run_async
async def test_a_full_queue_refuses_the_tenant_that_fills_it() -> None:
    queue = FairQueue(slots=1, size=3, retry_after_s=2)
    await queue.acquire("flood")
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
    queue.release()
    await asyncio.wait_for(quiet, 1)
    for task in waiting[:-1]:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert queue.queued == 0


@run_async
async def test_a_request_that_gives_up_leaves_the_queue() -> None:
    queue = FairQueue(slots=1, size=10)
    await queue.acquire("a")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await queue.acquire("b")
    assert queue.queued == 0
    queue.release()
    # The slot is free again: nothing was lost to the request that left.
    async with asyncio.timeout(1):
        await queue.acquire("c")


@run_async
async def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    queue = FairQueue(slots=1, size=10)
    await queue.acquire("a")
    first = asyncio.create_task(queue.acquire("b"))
    second = asyncio.create_task(queue.acquire("c"))
    await asyncio.sleep(0)
    queue.release()  # hands the slot to "b"...
    first.cancel()  # ...which gives up before it runs
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        FairQueue(slots=0, size=1)
    with pytest.raises(ConfigurationError):
        FairQueue(slots=1, size=-1)
