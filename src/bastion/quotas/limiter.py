"""Rate limits and budgets per tenant and per key: reserve on admission, settle at the end.

A request is admitted against every subject it belongs to (its tenant and its key), each
with its own :class:`QuotaLimits`. Admission *reserves* an estimate — one request, the
prompt's tokens plus ``max_tokens``, one concurrent slot — and refuses with
:class:`QuotaExceeded` (a 429 with ``Retry-After``) if any limit would be passed. When the
answer ends, :meth:`Limiter.settle` replaces the estimate with the tokens actually used
(refunding or charging the difference) and frees the slot.

Per-minute limits are token buckets refilled continuously (a full bucket holds one
minute's allowance), as OpenAI's are; the daily token budget resets at midnight UTC. The
:class:`Limiter` protocol is what callers use: :class:`InMemoryLimiter` keeps the counts of
one gateway process, :class:`bastion.quotas.redis.RedisLimiter` those that several gateways
share. Both refuse with the same errors (built here, by :func:`refusal`), and both hand back,
with each reservation and each refusal, the states the `x-ratelimit-*` headers report, so
that the headers cost no second look at the counts.
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
    (if not, the reservation bounds nothing). `states` are its subjects' states right after
    it was made (what the `x-ratelimit-*` headers report; empty if the limiter does not
    tell); `handle` is whatever the limiter that made it needs to settle it.
    """

    id: int
    subjects: tuple[tuple[Subject, QuotaLimits], ...]
    tokens: int
    settled: bool = False
    token_limited: bool = False
    states: tuple[LimitState, ...] = ()
    handle: object = None


class QuotaExceeded(RateLimited):
    """A limit would be passed: 429, with `Retry-After` when waiting will help. `states`:
    the subjects' states when it was refused (for the headers; empty if not told)."""

    states: tuple[LimitState, ...] = ()

    def __init__(self, message: str, *, code: str, retry_after_s: int | None) -> None:
        super().__init__(message, code=code)
        if retry_after_s is not None:
            self.headers["retry-after"] = str(retry_after_s)


class RequestTooLarge(PayloadTooLarge):
    """The request is over its subject's size limit (413; waiting will not help)."""

    states: tuple[LimitState, ...] = ()


# Why a reservation is refused: the first limit, of the first subject, that it would pass
# (the checks run in this order for each subject in turn).
TOO_LARGE = "too_large"
CONCURRENCY = "concurrency"
REQUESTS = "requests"
OVER_CAPACITY = "over_capacity"
TOKENS = "tokens"
DAILY = "daily"


def refusal(
    reason: str, subject: Subject, limits: QuotaLimits, *, tokens: int, wait_s: float | None
) -> QuotaExceeded | RequestTooLarge:
    """The error for a reservation refused for `reason` by `subject`'s `limits`; `wait_s`:
    how long until waiting would let it pass (None: never)."""
    who = f"{subject.kind} {subject.id}"
    retry_after_s = _seconds(wait_s) if wait_s is not None else None
    if reason == TOO_LARGE:
        return RequestTooLarge(
            f"The request is larger than the {who}'s limit of {limits.max_request_bytes} bytes."
        )
    if reason == CONCURRENCY:
        return QuotaExceeded(
            f"The {who} has {limits.concurrent_requests} requests in progress, its limit.",
            code="concurrency_limit_exceeded",
            retry_after_s=1,
        )
    if reason == REQUESTS:
        return QuotaExceeded(
            f"The {who} reached its limit of {limits.requests_per_minute} requests per minute.",
            code="rate_limit_exceeded",
            retry_after_s=retry_after_s,
        )
    if reason == OVER_CAPACITY:
        return QuotaExceeded(
            f"The request may use {tokens} tokens, more than the {who}'s limit of "
            f"{limits.tokens_per_minute} per minute; lower max_tokens.",
            code="tokens_limit_exceeded",
            retry_after_s=None,
        )
    if reason == TOKENS:
        return QuotaExceeded(
            f"The {who} reached its limit of {limits.tokens_per_minute} tokens per minute.",
            code="tokens_limit_exceeded",
            retry_after_s=retry_after_s,
        )
    if reason == DAILY:
        return QuotaExceeded(
            f"The {who} used its budget of {limits.tokens_per_day} tokens for today (UTC).",
            code="daily_budget_exceeded",
            retry_after_s=retry_after_s,
        )
    raise ValueError(f"unknown refusal reason {reason!r}")


def limit_state(limits: QuotaLimits, requests: float | None, tokens: float | None) -> LimitState:
    """The headers' view of a subject whose minute buckets hold `requests` and `tokens`
    (None: no such bucket), refilled to now."""
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    if rpm is None:
        requests = None
    if tpm is None:
        tokens = None
    return LimitState(
        limit_requests=rpm,
        remaining_requests=None if requests is None else max(0, math.floor(requests)),
        reset_requests_s=None if requests is None or rpm is None else _until_full_s(rpm, requests),
        limit_tokens=tpm,
        remaining_tokens=None if tokens is None else max(0, math.floor(tokens)),
        reset_tokens_s=None if tokens is None or tpm is None else _until_full_s(tpm, tokens),
    )


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
        have left, up to `up_to` (for a request whose size the gateway cannot see). The
        reservation's (or the error's) `states` are the subjects' states, if told."""
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

    def wait_for(self, amount: float) -> float | None:
        """Seconds until `amount` is available (0 if it is; None: never)."""
        return _wait_s(self.capacity, self.level, amount)


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
                refused = _check(subject, limits, usage, tokens, request_bytes, now)
                if refused is not None:
                    refused.states = tuple(_state(limits, usage) for _, limits, usage in usages)
                    raise refused
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
                next(self._ids),
                tuple(subjects),
                tokens,
                token_limited=bool(limited),
                states=tuple(_state(limits, usage) for _, limits, usage in usages),
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
            return _state(limits, self._current(subject, limits, self._clock()))

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
    subject: Subject,
    limits: QuotaLimits,
    usage: _Usage,
    tokens: int,
    request_bytes: int,
    now: float,
) -> QuotaExceeded | RequestTooLarge | None:
    """Why `subject` refuses the request, or None if it allows it."""
    reason: str | None = None
    wait_s: float | None = None
    if limits.max_request_bytes is not None and request_bytes > limits.max_request_bytes:
        reason = TOO_LARGE
    elif limits.concurrent_requests is not None and usage.concurrent >= limits.concurrent_requests:
        reason = CONCURRENCY
    elif usage.requests is not None and usage.requests.level < 1:
        reason, wait_s = REQUESTS, usage.requests.wait_for(1)
    elif usage.tokens is not None and tokens > 0 and tokens > usage.tokens.capacity:
        reason = OVER_CAPACITY
    elif usage.tokens is not None and tokens > 0 and usage.tokens.level < tokens:
        reason, wait_s = TOKENS, usage.tokens.wait_for(tokens)
    elif limits.tokens_per_day is not None and usage.day_tokens + tokens > limits.tokens_per_day:
        reason, wait_s = DAILY, (usage.day + 1) * _DAY_S - now
    if reason is None:
        return None
    return refusal(reason, subject, limits, tokens=tokens, wait_s=wait_s)


def _state(limits: QuotaLimits, usage: _Usage) -> LimitState:
    requests, tokens = usage.requests, usage.tokens
    return limit_state(
        limits,
        requests.level if requests is not None else None,
        tokens.level if tokens is not None else None,
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


def _wait_s(capacity: int, level: float, amount: float) -> float | None:
    """Seconds until a bucket of `capacity` at `level` holds `amount` (None: a bucket of
    capacity 0, which never refills)."""
    missing = amount - level
    if missing <= 0:
        return 0.0
    return None if capacity <= 0 else missing * _MINUTE_S / capacity


def _until_full_s(capacity: int, level: float) -> float:
    return 0.0 if capacity <= 0 else (capacity - level) * _MINUTE_S / capacity


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))
