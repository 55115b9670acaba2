"""The adaptive in-flight window: as many requests at a worker as hide the round trip."""

from __future__ import annotations

import asyncio

from bastion.quotas.fair import FairQueue
from bastion.quotas.window import DispatchWindow


def _feed(window: DispatchWindow, *, compute: float, overhead: float, n: int = 50) -> int:
    size = window.size
    for _ in range(n):
        size = window.observe(compute + overhead, compute, 0.0)
    return size


def test_a_fast_model_gets_a_window_that_covers_the_round_trip() -> None:
    # 50 µs of model work behind a 300 µs round trip: 1 + ceil(6 - 0.1) = 7 in flight.
    assert _feed(DispatchWindow(1, 16), compute=50e-6, overhead=300e-6) == 7


def test_a_slow_model_keeps_one_request_in_flight() -> None:
    # 20 ms of work, 0.3 ms round trip: pipelining would gain 1.5 %; fairness wins.
    assert _feed(DispatchWindow(1, 8), compute=0.02, overhead=0.0003) == 1


def test_the_window_stays_within_its_bounds() -> None:
    assert _feed(DispatchWindow(1, 4), compute=1e-6, overhead=1e-3) == 4
    assert _feed(DispatchWindow(32, 64), compute=0.02, overhead=0.0003) == 32


def test_waiting_in_the_worker_queue_is_not_round_trip() -> None:
    # Requests that queued at the worker behind others took longer in flight; that wait
    # must not grow the window (it would feed on itself).
    window = DispatchWindow(1, 8)
    for _ in range(50):
        window.observe(in_flight_s=0.0403, compute_s=0.02, queued_s=0.02)
    assert window.size == 1


def test_a_fixed_window_never_moves() -> None:
    window = DispatchWindow(1, 8, fixed=3)
    assert _feed(window, compute=1e-6, overhead=1e-3) == 3
    assert _feed(window, compute=1.0, overhead=1e-3) == 3


def test_it_adapts_when_the_model_changes_speed() -> None:
    window = DispatchWindow(1, 8)
    assert _feed(window, compute=50e-6, overhead=300e-6) == 7
    assert _feed(window, compute=0.01, overhead=300e-6, n=200) == 1


def test_answers_without_compute_are_ignored() -> None:
    window = DispatchWindow(1, 8)
    for _ in range(50):
        window.observe(0.001, 0.0, 0.0)
    assert window.size == 1 and window.service_s == 0.0


def test_growing_the_queue_lets_waiters_in_and_shrinking_takes_places_back() -> None:
    async def scenario() -> None:
        queue = FairQueue(slots=1, size=10)
        first = await queue.acquire("a")
        waiters = [asyncio.create_task(queue.acquire(t)) for t in ("a", "b", "c")]
        await asyncio.sleep(0)
        assert queue.queued == 3
        queue.resize(3)
        await asyncio.sleep(0)
        # Two new places: two waiters in, in fair order (b and c before a's second).
        assert queue.queued == 1 and queue.held == 3
        got = {w.result().tenant for w in waiters if w.done()}
        assert got == {"b", "c"}
        queue.resize(1)
        # Three held, one place: releases take places back until one is held.
        first.release()
        await asyncio.sleep(0)
        assert queue.queued == 1 and queue.held == 2
        for w in waiters:
            if w.done():
                w.result().release()
        await asyncio.sleep(0)
        assert queue.held == 1 and queue.queued == 0
        (await waiters[0]).release()
        assert queue.free == 1 and queue.held == 0

    asyncio.run(scenario())
