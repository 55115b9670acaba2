"""The fair queue in front of each model's worker: weighted fair queuing across tenants.

A worker runs one request at a time, so whoever fills its queue first would be served
first. Instead, the gateway lets only `slots` requests of a model reach its worker at once;
the others wait here, at most `size` of them, and the next to go is chosen by start-time
fair queuing: each request gets a virtual finish tag ``max(V, tenant's last tag) +
1 / weight``, where ``V`` is the tag of the request last sent to the worker, and the
smallest tag goes first. A tenant that floods the queue only lengthens its own wait; a
tenant with weight 2 gets twice the share of one with weight 1 while both have requests
waiting; an idle tenant banks nothing.

When the queue is full, the newcomer is refused (503 ``queue_full`` with ``Retry-After``)
unless another tenant holds more waiting requests than the newcomer's tenant: then that
tenant's newest waiting request is refused instead, so a flood cannot lock others out.
A request that gives up while waiting (its deadline passed, its client left) leaves the
queue at once.

The number of places is the model's in-flight window (:mod:`bastion.quotas.window`),
which :meth:`FairQueue.resize` changes as the gateway measures the worker.

A request that gets a place holds a :class:`Hold` until it gives it back
(:meth:`Hold.release`, idempotent), so the accounting holds whatever the interleaving:
free places + held places == slots, always (free places go negative for a while when
the window shrinks under load: releases then take places back instead of passing them
on). A hold kept past the request deadline means a place leaked: :meth:`FairQueue.overdue`
finds it, and :meth:`FairQueue.reclaim` takes it back (the gateway reports it).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bastion.errors import ConfigurationError, ModelUnavailable


class QueueFull(ModelUnavailable):
    """The model's queue is full: 503 with Retry-After."""

    code = "queue_full"


@dataclass(slots=True, eq=False)
class Hold:
    """A request's place at the worker, from the moment it is given until released."""

    queue: FairQueue = field(repr=False)
    tenant: str
    since: float
    released: bool = False

    def release(self) -> None:
        """Give the place back (to the next waiter in fair order); idempotent."""
        self.queue._release(self)


@dataclass(slots=True)
class _Waiter:
    tenant: str
    tag: float
    seq: int
    future: asyncio.Future[Hold] = field(repr=False)


class FairQueue:
    """Admission of one model's requests to its worker (one event loop; not thread-safe)."""

    def __init__(
        self,
        slots: int,
        size: int,
        weight_of: Callable[[str], float] = lambda tenant: 1.0,
        *,
        retry_after_s: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1:
            raise ConfigurationError("BASTION_MODEL_CONCURRENCY must be at least 1.")
        if size < 0:
            raise ConfigurationError("BASTION_QUEUE_SIZE cannot be negative.")
        self.slots = slots
        self._free = slots
        self._size = size
        self._weight_of = weight_of
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._virtual = 0.0
        self._last_tag: dict[str, float] = {}
        self._waiting: dict[str, collections.deque[_Waiter]] = {}
        self._queued = 0
        self._seq = itertools.count()
        self._held: set[Hold] = set()

    @property
    def queued(self) -> int:
        """Requests waiting now."""
        return self._queued

    @property
    def free(self) -> int:
        """Places at the worker nobody holds."""
        return self._free

    @property
    def held(self) -> int:
        """Places held now."""
        return len(self._held)

    async def acquire(self, tenant: str) -> Hold:
        """Wait for a place at the worker; raises QueueFull if the queue is full. The
        caller gives the place back with :meth:`Hold.release`."""
        tag = self._tag(tenant)
        if self._free > 0 and not self._queued:
            self._free -= 1
            self._virtual = max(self._virtual, tag - 1.0 / self._weight(tenant))
            return self._hold(tenant)
        if self._queued >= self._size:
            self._make_room(tenant)
        waiter = _Waiter(tenant, tag, next(self._seq), asyncio.get_running_loop().create_future())
        self._waiting.setdefault(tenant, collections.deque()).append(waiter)
        self._queued += 1
        try:
            return await waiter.future
        except BaseException:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Given the place just as it gave up: pass it on.
                future.result().release()
            else:
                self._remove(waiter)
            raise

    def overdue(self, limit_s: float) -> list[Hold]:
        """Places held for longer than `limit_s` (a request's deadline bounds a hold)."""
        now = self._clock()
        return [hold for hold in self._held if now - hold.since > limit_s]

    def stalled(self, limit_s: float) -> bool:
        """Every place held, and one of them for longer than `limit_s`: nothing moves."""
        return self._free <= 0 and bool(self.overdue(limit_s))

    def reclaim(self, hold: Hold) -> None:
        """Take back a leaked place; a later release of it does nothing."""
        self._release(hold)

    def _hold(self, tenant: str) -> Hold:
        hold = Hold(self, tenant, self._clock())
        self._held.add(hold)
        return hold

    def resize(self, slots: int) -> None:
        """Let `slots` requests reach the worker at once from now on. Growing hands the new
        places to waiters at once; shrinking takes places back as holds are released."""
        slots = max(1, slots)
        if slots == self.slots:
            return
        self._free += slots - self.slots
        self.slots = slots
        self._dispatch()

    def _release(self, hold: Hold) -> None:
        if hold.released:
            return
        hold.released = True
        self._held.discard(hold)
        self._free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Give free places to waiters, in fair order."""
        while self._free > 0 and (waiter := self._next()) is not None:
            # A waiter whose deadline cancelled it, not yet woken to leave the queue:
            # it cannot take the place; the next one does.
            if waiter.future.done():
                continue
            self._free -= 1
            self._virtual = max(self._virtual, waiter.tag - 1.0 / self._weight(waiter.tenant))
            waiter.future.set_result(self._hold(waiter.tenant))

    # ------------------------------------------------------------------ internals

    def _weight(self, tenant: str) -> float:
        weight = self._weight_of(tenant)
        return weight if weight > 0 else 1.0

    def _tag(self, tenant: str) -> float:
        start = max(self._virtual, self._last_tag.get(tenant, 0.0))
        tag = start + 1.0 / self._weight(tenant)
        self._last_tag[tenant] = tag
        if len(self._last_tag) > 4 * (len(self._waiting) + 64):
            # Tenants whose tags fell behind the clock carry nothing; forget them.
            self._last_tag = {
                t: v for t, v in self._last_tag.items() if v > self._virtual or t in self._waiting
            }
        return tag

    def _next(self) -> _Waiter | None:
        best: collections.deque[_Waiter] | None = None
        for queue in self._waiting.values():
            if best is None or (queue[0].tag, queue[0].seq) < (best[0].tag, best[0].seq):
                best = queue
        if best is None:
            return None
        waiter = best.popleft()
        if not best:
            del self._waiting[waiter.tenant]
        self._queued -= 1
        return waiter

    def _make_room(self, tenant: str) -> None:
        mine = len(self._waiting.get(tenant, ()))
        longest = max(self._waiting.values(), key=len, default=None)
        if longest is None or len(longest) <= mine + 1:
            raise self._full()
        # The tenant holding the most of the queue gives up its newest request (one that
        # already gave up only needs to leave).
        victim = longest[-1]
        self._remove(victim)
        if not victim.future.done():
            victim.future.set_exception(self._full())

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.tenant)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            return
        self._queued -= 1
        if not queue:
            del self._waiting[waiter.tenant]

    def _full(self) -> QueueFull:
        return QueueFull(
            "The model's queue is full; retry shortly.", retry_after_s=self._retry_after_s
        )
