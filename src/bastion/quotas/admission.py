"""One admitted request's hold on its quotas, and the `x-ratelimit-*` headers it reports.

A :class:`Ticket` is what admission hands back: it holds the reservation made against the
caller's tenant and key until the request ends (:meth:`Ticket.close`, called once the
response is sent), counting the tokens the worker reports meanwhile. Usage reported after
the end (a client that left mid-stream) is still charged.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from bastion.identity.principal import Principal
from bastion.quotas.limiter import Limiter, LimitState, Reservation

Headers = list[tuple[bytes, bytes]]


class Ticket:
    """An admitted request: who sent it, to which model, and what it reserved."""

    __slots__ = (
        "_limiter",
        "_lock",
        "_reservation",
        "closed",
        "deadline",
        "headers",
        "model",
        "principal",
        "used",
    )

    def __init__(
        self,
        principal: Principal,
        model: str,
        *,
        limiter: Limiter | None = None,
        reservation: Reservation | None = None,
        headers: Headers | None = None,
        deadline: float | None = None,
    ) -> None:
        self.principal = principal
        self.model = model
        #: When the whole request must be answered (event loop time), every call it makes
        #: to the model included: a completion of 16 prompts gets one deadline, not 16.
        self.deadline = deadline
        self.headers: Headers = headers or []
        self.used = 0
        self.closed = False
        self._limiter = limiter
        self._reservation = reservation
        self._lock = threading.Lock()

    @property
    def allowance(self) -> int | None:
        """Tokens reserved for a request whose size the gateway could not see (an encrypted
        one), which its worker must hold it to; None when no token limit applies."""
        reservation = self._reservation
        if reservation is None or not reservation.token_limited:
            return None
        return reservation.tokens

    def report(self, tokens: int) -> None:
        """The worker reported `tokens` used by one of this request's jobs."""
        with self._lock:
            if not self.closed:
                self.used += tokens
                return
        if self._limiter is not None and self._reservation is not None:
            self._limiter.charge(self._reservation, tokens)

    def close(self) -> None:
        """The request is over: settle its reservation with what was used. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            used = self.used
        if self._limiter is not None and self._reservation is not None:
            self._limiter.settle(self._reservation, used)


def limit_headers(states: Sequence[LimitState]) -> Headers:
    """OpenAI's rate-limit headers for the most constrained of `states` (per kind)."""
    headers: Headers = []
    requests = [s for s in states if s.limit_requests is not None]
    if requests:
        tight = min(requests, key=lambda s: (s.remaining_requests or 0, -(s.reset_requests_s or 0)))
        headers += [
            (b"x-ratelimit-limit-requests", str(tight.limit_requests).encode()),
            (b"x-ratelimit-remaining-requests", str(tight.remaining_requests).encode()),
            (b"x-ratelimit-reset-requests", reset_text(tight.reset_requests_s or 0.0).encode()),
        ]
    tokens = [s for s in states if s.limit_tokens is not None]
    if tokens:
        tight = min(tokens, key=lambda s: (s.remaining_tokens or 0, -(s.reset_tokens_s or 0)))
        headers += [
            (b"x-ratelimit-limit-tokens", str(tight.limit_tokens).encode()),
            (b"x-ratelimit-remaining-tokens", str(tight.remaining_tokens).encode()),
            (b"x-ratelimit-reset-tokens", reset_text(tight.reset_tokens_s or 0.0).encode()),
        ]
    return headers


def reset_text(seconds: float) -> str:
    """A duration as OpenAI writes it: `20ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"
