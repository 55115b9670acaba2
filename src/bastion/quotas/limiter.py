"""Rate limits and budgets per tenant and per key: reserve on admission, settle at the end.

A request is admitted against every subject it belongs to (its tenant and its key), each
with its own :class:`QuotaLimits`. Admission *reserves* an estimate — one request, the
prompt's tokens plus ``max_tokens``, one concurrent slot — and refuses with
:class:`QuotaExceeded` (a 429 with ``Retry-After``) if any limit would be passed. When the
answer ends, :meth:`Limiter.settle` replaces the estimate with the tokens actually used
(refunding or charging the difference) and frees the slot.

Per-minute limits are token buckets refilled continuously (a full bucket holds one
minute's allowance), as OpenAI's are; the daily token budget resets at midnight UTC. The
:class:`Limiter` protocol is what callers use, so a shared implementation (Redis) can
replace :class:`InMemoryLimiter` without touching them.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bastion.errors import PayloadTooLarge, RateLimited

_DAY_S = 86_400.0
_MINUTE_S = 60.0


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """One subject's limits; None: no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    tokens_per_day: int | None = None
    max_request_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a limit applies to: ("tenant", name) or ("key", key id)."""

    kind: str
    id: str


@dataclass(frozen=True, slots=True)
class LimitState:
    """What the `x-ratelimit-*` headers report for one subject (None: no such limit)."""

    limit_requests: int | None
    remaining_requests: int | None
    reset_requests_s: float | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_tokens_s: float | None


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds until it is settled.

    `tokens` is what was reserved; `token_limited` says whether any subject limits tokens
    (if not, the reservation bounds nothing).
    """

    id: int
    subjects: tuple[tuple[Subject, QuotaLimits], ...]
    tokens: int
    settled: bool = False
    token_limited: bool = False


class QuotaExceeded(RateLimited):
    """A limit would be passed: 429, with `Retry-After` when waiting will help."""

    def __init__(self, message: str, *, code: str, retry_after_s: int | None) -> None:
        super().__init__(message, code=code)
        if retry_after_s is not None:
            self.headers["retry-after"] = str(retry_after_s)


class RequestTooLarge(PayloadTooLarge):
    """The request is over its subject's size limit (413; waiting will not help)."""


class Limiter(Protocol):
    def reserve(
        self,
        subjects: Sequence[tuple[Subject, QuotaLimits]],
        *,
        tokens: int,
        request_bytes: int = 0,
        up_to: int | None = None,
    ) -> Reservation:
        """Admit one request of about `tokens` tokens, or raise QuotaExceeded (429) or
        RequestTooLarge (413). With `up_to`, reserve as many more tokens as the subjects
        have left, up to `up_to` (for a request whose size the gateway cannot see)."""
        ...

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """The request ended having used `tokens`; frees its concurrent slot. Idempotent."""
        ...

    def charge(self, reservation: Reservation, tokens: int) -> None:
        """Usage reported after the request was settled (a client that left before the
        model's last word): `tokens` more are taken from its subjects' buckets."""
        ...

    def state(self, subject: Subject, limits: QuotaLimits) -> LimitState: ...


@dataclass(slots=True)
class _Bucket:
    """A token bucket holding `capacity`, refilled at `capacity` per minute."""

    capacity: int
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / _MINUTE_S)
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * _MINUTE_S / self.capacity

    def until_full_s(self) -> float:
        return (self.capacity - self.level) * _MINUTE_S / self.capacity


@dataclass(slots=True)
class _Usage:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    day: int = -1
    day_tokens: int = 0
    concurrent: int = 0
    limits: QuotaLimits = field(default_factory=QuotaLimits)


class InMemoryLimiter:
    """The :class:`Limiter` of one gateway process (thread-safe; injectable clock)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._usage: dict[Subject, _Usage] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def reserve(
        self,
        subjects: Sequence[tuple[Subject, QuotaLimits]],
        *,
        tokens: int,
        request_bytes: int = 0,
        up_to: int | None = None,
    ) -> Reservation:
        tokens = max(0, tokens)
        with self._lock:
            now = self._clock()
            usages = [
                (subject, limits, self._current(subject, limits, now))
                for subject, limits in subjects
            ]
            # Check every subject first: a refusal takes nothing from anyone.
            for subject, limits, usage in usages:
                self._check(subject, limits, usage, tokens, request_bytes, now)
            left = [_tokens_left(limits, usage) for _, limits, usage in usages]
            limited = [n for n in left if n is not None]
            if up_to is not None:
                # What every subject has left (at least `tokens`: the checks passed).
                tokens = max(tokens, min([up_to, *limited]))
            for _, _, usage in usages:
                if usage.requests is not None:
                    usage.requests.level -= 1
                if usage.tokens is not None:
                    usage.tokens.level -= tokens
                usage.day_tokens += tokens
                usage.concurrent += 1
            return Reservation(
                next(self._ids), tuple(subjects), tokens, token_limited=bool(limited)
            )

    def settle(self, reservation: Reservation, tokens: int) -> None:
        with self._lock:
            if reservation.settled:
                return
            reservation.settled = True
            now = self._clock()
            difference = max(0, tokens) - reservation.tokens
            for subject, limits in reservation.subjects:
                usage = self._current(subject, limits, now)
                usage.concurrent = max(0, usage.concurrent - 1)
                if usage.tokens is not None:
                    # May go below zero: a request that used more than it reserved makes
                    # the next ones wait for the refill.
                    usage.tokens.level -= difference
                usage.day_tokens = max(0, usage.day_tokens + difference)

    def charge(self, reservation: Reservation, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            now = self._clock()
            for subject, limits in reservation.subjects:
                usage = self._current(subject, limits, now)
                if usage.tokens is not None:
                    usage.tokens.level -= tokens
                usage.day_tokens += tokens

    def state(self, subject: Subject, limits: QuotaLimits) -> LimitState:
        with self._lock:
            usage = self._current(subject, limits, self._clock())
            requests, tokens = usage.requests, usage.tokens
            return LimitState(
                limit_requests=limits.requests_per_minute,
                remaining_requests=max(0, math.floor(requests.level)) if requests else None,
                reset_requests_s=requests.until_full_s() if requests else None,
                limit_tokens=limits.tokens_per_minute,
                remaining_tokens=max(0, math.floor(tokens.level)) if tokens else None,
                reset_tokens_s=tokens.until_full_s() if tokens else None,
            )

    def _current(self, subject: Subject, limits: QuotaLimits, now: float) -> _Usage:
        """The subject's usage, refilled to `now` and following changed limits."""
        usage = self._usage.get(subject)
        if usage is None:
            usage = self._usage[subject] = _Usage()
        if usage.limits != limits:
            usage.requests = _resized(usage.requests, limits.requests_per_minute, now)
            usage.tokens = _resized(usage.tokens, limits.tokens_per_minute, now)
            usage.limits = limits
        for bucket in (usage.requests, usage.tokens):
            if bucket is not None:
                bucket.refill(now)
        day = int(now // _DAY_S)
        if day != usage.day:
            usage.day, usage.day_tokens = day, 0
        return usage

    def _check(
        self,
        subject: Subject,
        limits: QuotaLimits,
        usage: _Usage,
        tokens: int,
        request_bytes: int,
        now: float,
    ) -> None:
        who = f"{subject.kind} {subject.id}"
        if limits.max_request_bytes is not None and request_bytes > limits.max_request_bytes:
            raise RequestTooLarge(
                f"The request is larger than the {who}'s limit of {limits.max_request_bytes} bytes."
            )
        if (
            limits.concurrent_requests is not None
            and usage.concurrent >= limits.concurrent_requests
        ):
            raise QuotaExceeded(
                f"The {who} has {limits.concurrent_requests} requests in progress, its limit.",
                code="concurrency_limit_exceeded",
                retry_after_s=1,
            )
        if usage.requests is not None and usage.requests.level < 1:
            raise QuotaExceeded(
                f"The {who} reached its limit of {limits.requests_per_minute} requests per minute.",
                code="rate_limit_exceeded",
                retry_after_s=_seconds(usage.requests.wait_for(1)),
            )
        if usage.tokens is not None and tokens > 0:
            if tokens > usage.tokens.capacity:
                raise QuotaExceeded(
                    f"The request may use {tokens} tokens, more than the {who}'s limit of "
                    f"{usage.tokens.capacity} per minute; lower max_tokens.",
                    code="tokens_limit_exceeded",
                    retry_after_s=None,
                )
            if usage.tokens.level < tokens:
                raise QuotaExceeded(
                    f"The {who} reached its limit of {limits.tokens_per_minute} tokens per minute.",
                    code="tokens_limit_exceeded",
                    retry_after_s=_seconds(usage.tokens.wait_for(tokens)),
                )
        if limits.tokens_per_day is not None and usage.day_tokens + tokens > limits.tokens_per_day:
            midnight = (usage.day + 1) * _DAY_S
            raise QuotaExceeded(
                f"The {who} used its budget of {limits.tokens_per_day} tokens for today (UTC).",
                code="daily_budget_exceeded",
                retry_after_s=_seconds(midnight - now),
            )


def _tokens_left(limits: QuotaLimits, usage: _Usage) -> int | None:
    """Tokens the subject may still use now (its minute bucket, its day); None: no limit."""
    left: list[int] = []
    if usage.tokens is not None:
        left.append(max(0, math.floor(usage.tokens.level)))
    if limits.tokens_per_day is not None:
        left.append(max(0, limits.tokens_per_day - usage.day_tokens))
    return min(left) if left else None


def _resized(bucket: _Bucket | None, capacity: int | None, now: float) -> _Bucket | None:
    """A bucket for a new capacity that keeps what was used of the old one."""
    if capacity is None:
        return None
    if bucket is None:
        return _Bucket(capacity=capacity, level=float(capacity), at=now)
    used = bucket.capacity - bucket.level
    return _Bucket(capacity=capacity, level=capacity - used, at=bucket.at)


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))
