"""How many requests each model's worker holds at once: an adaptive in-flight window.

A worker runs its requests in arrival order, so every request sent ahead of a newcomer is
one it must wait for: the fair queue (:mod:`bastion.quotas.fair`) can only be fair about
the requests it still holds. With one request at the worker at a time, though, the worker
sits idle for a whole round trip (reply to the gateway, next request to the worker)
between two requests, and a model that answers in 50 µs spends most of its time waiting.

The window is the fewest requests in flight that keep the worker busy: one being served,
plus enough queued at the worker to cover the round trip, ``1 + ceil(O / S - 0.1)``,
where ``S`` is the model's time per request (the compute seconds its worker reports) and
``O`` the round trip's overhead (the time a request spent in flight, less its compute and
its wait in the worker's queue); both are moving averages. The ``- 0.1`` accepts a worker
idle up to 10 % of the time rather than send a request ahead: a model taking 20 ms behind
a 0.3 ms round trip keeps a window of 1, the fairest. The window never goes below the
model's batch size (a batch needs its requests at the worker) nor above the ceiling
(``BASTION_MODEL_WINDOW_MAX``, or twice the batch size): so a newcomer waits for at most
``ceiling - 1`` requests of other tenants, whatever the load.
"""

from __future__ import annotations

import math

# Weight of a new sample in the moving averages.
_ALPHA = 0.05
# Samples before the window first moves from its floor.
_WARM_UP = 8
# The worker may be idle this share of the time rather than hold one more request.
_IDLE_ALLOWANCE = 0.1


class DispatchWindow:
    """The in-flight window of one model's worker (see the module docstring)."""

    def __init__(self, floor: int = 1, ceiling: int = 8, fixed: int | None = None) -> None:
        self.floor = max(1, floor)
        self.ceiling = max(self.floor, ceiling)
        self.fixed = fixed
        self.size = fixed if fixed is not None else self.floor
        self._samples = 0
        self._service = 0.0
        self._overhead = 0.0

    @property
    def service_s(self) -> float:
        """The model's mean time per request, as measured."""
        return self._service

    @property
    def overhead_s(self) -> float:
        """The mean round-trip overhead, as measured."""
        return self._overhead

    def observe(self, in_flight_s: float, compute_s: float, queued_s: float) -> int:
        """Account one answered request: its time in flight (sent to answered), the model's
        compute for it, and its wait in the worker's queue; returns the window now."""
        if self.fixed is not None or compute_s <= 0 or in_flight_s <= 0:
            return self.size
        overhead = max(0.0, in_flight_s - compute_s - max(0.0, queued_s))
        if self._samples == 0:
            self._service, self._overhead = compute_s, overhead
        else:
            self._service += _ALPHA * (compute_s - self._service)
            self._overhead += _ALPHA * (overhead - self._overhead)
        self._samples += 1
        if self._samples >= _WARM_UP:
            self.size = self._target()
        return self.size

    def _target(self) -> int:
        ratio = self._overhead / max(self._service, 1e-9)
        wanted = 1 + max(0, math.ceil(ratio - _IDLE_ALLOWANCE))
        return min(self.ceiling, max(self.floor, wanted))
