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
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from bastion.errors import ConfigurationError, ModelUnavailable


class QueueFull(ModelUnavailable):
    """The model's queue is full: 503 with Retry-After."""

    code = "queue_full"


@dataclass(slots=True)
class _Waiter:
    tenant: str
    tag: float
    seq: int
    future: asyncio.Future[None] = field(repr=False)


class FairQueue:
    """Admission of one model's requests to its worker (one event loop; not thread-safe)."""

    def __init__(
        self,
        slots: int,
        size: int,
        weight_of: Callable[[str], float] = lambda tenant: 1.0,
        *,
        retry_after_s: int = 1,
    ) -> None:
        if slots < 1:
            raise ConfigurationError("BASTION_MODEL_CONCURRENCY must be at least 1.")
        if size < 0:
            raise ConfigurationError("BASTION_QUEUE_SIZE cannot be negative.")
        self._free = slots
        self._size = size
        self._weight_of = weight_of
        self._retry_after_s = retry_after_s
        self._virtual = 0.0
        self._last_tag: dict[str, float] = {}
        self._waiting: dict[str, collections.deque[_Waiter]] = {}
        self._queued = 0
        self._seq = itertools.count()

    @property
    def queued(self) -> int:
        """Requests waiting now."""
        return self._queued

    async def acquire(self, tenant: str) -> None:
        """Wait for a slot at the worker; raises QueueFull if the queue is full."""
        tag = self._tag(tenant)
        if self._free > 0 and not self._queued:
            self._free -= 1
            self._virtual = max(self._virtual, tag - 1.0 / self._weight(tenant))
            return
        if self._queued >= self._size:
            self._make_room(tenant)
        waiter = _Waiter(tenant, tag, next(self._seq), asyncio.get_running_loop().create_future())
        self._waiting.setdefault(tenant, collections.deque()).append(waiter)
        self._queued += 1
        try:
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                if waiter.future.exception() is None:
                    # Given the slot just as it gave up: pass the slot on.
                    self.release()
            else:
                self._remove(waiter)
            raise

    def release(self) -> None:
        """A request that held a slot is done with the worker."""
        waiter = self._next()
        if waiter is None:
            self._free += 1
            return
        self._virtual = max(self._virtual, waiter.tag - 1.0 / self._weight(waiter.tenant))
        waiter.future.set_result(None)

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
        # The tenant holding the most of the queue gives up its newest request.
        victim = longest[-1]
        self._remove(victim)
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
