"""The in-memory limiter, on an injected clock: windows, budgets, settlement, headers."""

from __future__ import annotations

import pytest

from bastion.errors import PayloadTooLarge
from bastion.quotas.limiter import InMemoryLimiter, QuotaExceeded, QuotaLimits, Subject

TENANT = Subject("tenant", "acme")
KEY = Subject("key", "bsk_0123")
# 2026-11-27 12:00:00 UTC
NOON = 1_795_780_800.0


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def refused(limiter: InMemoryLimiter, limits: QuotaLimits, tokens: int = 0) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as caught:
        limiter.reserve([(TENANT, limits)], tokens=tokens)
    assert caught.value.status == 429
    return caught.value


def test_requests_per_minute_refill_continuously(clock: Clock) -> None:
    limiter = InMemoryLimiter(clock)
    limits = QuotaLimits(requests_per_minute=3)
    for _ in range(3):
        limiter.reserve([(TENANT, limits)], tokens=0)
    error = refused(limiter, limits)
    assert error.code == "rate_limit_exceeded"
    # One request comes back every 20 s.
    assert error.headers["retry-after"] == "20"
    clock.now += 19
    refused(limiter, limits)
    clock.now += 1
    limiter.reserve([(TENANT, limits)], tokens=0)


def test_tokens_are_reserved_then_settled_to_what_was_used(clock: Clock) -> None:
    limiter = InMemoryLimiter(clock)
    limits = QuotaLimits(tokens_per_minute=100)
    first = limiter.reserve([(TENANT, limits)], tokens=80)
    assert refused(limiter, limits, tokens=30).code == "tokens_limit_exceeded"
    # It used 10 of its 80: the other 70 come back at once.
    limiter.settle(first, 10)
    second = limiter.reserve([(TENANT, limits)], tokens=30)
    assert limiter.state(TENANT, limits).remaining_tokens == 60
    # Using more than reserved is charged too: the bucket goes below zero and others wait.
    limiter.settle(second, 150)
    assert limiter.state(TENANT, limits).remaining_tokens == 0
    error = refused(limiter, limits, tokens=1)
    # 60 - 120 = -60 left: one token is 61 away, at 100 a minute.
    assert error.headers["retry-after"] == "37"
    # Settling twice changes nothing.
    limiter.settle(second, 150)
    clock.now += 60
    assert limiter.state(TENANT, limits).remaining_tokens == 40
    clock.now += 36
    assert limiter.state(TENANT, limits).remaining_tokens == 100


def test_a_request_bigger_than_a_minute_of_tokens_can_never_pass(clock: Clock) -> None:
    limiter = InMemoryLimiter(clock)
    error = refused(limiter, QuotaLimits(tokens_per_minute=100), tokens=101)
    assert "lower max_tokens" in error.message and "retry-after" not in error.headers


def test_concurrency_is_held_until_settled(clock: Clock) -> None:
    limiter = InMemoryLimiter(clock)
    limits = QuotaLimits(concurrent_requests=2)
    one = limiter.reserve([(TENANT, limits)], tokens=0)
    limiter.reserve([(TENANT, limits)], tokens=0)
    assert refused(limiter, limits).code == "concurrency_limit_exceeded"
    limiter.settle(one, 0)
    limiter.settle(one, 0)
    limiter.reserve([(TENANT, limits)], tokens=0)
    assert refused(limiter, limits).code == "concurrency_limit_exceeded"


def test_the_daily_budget_resets_at_midnight_utc(clock: Clock) -> None:
    limiter = InMemoryLimiter(clock)
    limits = QuotaLimits(tokens_per_day=100)
    limiter.settle(limiter.reserve([(TENANT, limits)], tokens=50), 90)
    error = refused(limiter, limits, tokens=20)
    assert error.code == "daily_budget_exceeded"
    assert error.headers["retry-after"] == str(12 * 3600)
    limiter.reserve([(TENANT, limits)], tokens=10)
    clock.now += 12 * 3600
    limiter.reserve([(TENANT, limits)], tokens=100)


def test_a_refusal_by_one_subject_takes_nothing_from_the_others(clock: Clock) -> None:
    limiter = InMemoryLimiter(clock)
    tenant = QuotaLimits(requests_per_minute=1)
    key = QuotaLimits(requests_per_minute=10, tokens_per_minute=1000)
    limiter.reserve([(TENANT, tenant), (KEY, key)], tokens=100)
    with pytest.raises(QuotaExceeded):
        limiter.reserve([(TENANT, tenant), (KEY, key)], tokens=100)
    state = limiter.state(KEY, key)
    assert state.remaining_requests == 9 and state.remaining_tokens == 900


def test_request_size_is_a_413(clock: Clock) -> None:
    limiter = InMemoryLimiter(clock)
    with pytest.raises(PayloadTooLarge) as caught:
        limiter.reserve([(TENANT, QuotaLimits(max_request_bytes=100))], tokens=0, request_bytes=101)
    assert caught.value.status == 413
    limiter.reserve([(TENANT, QuotaLimits(max_request_bytes=100))], tokens=0, request_bytes=100)


def test_state_reports_what_the_headers_need(clock: Clock) -> None:
    limiter = InMemoryLimiter(clock)
    limits = QuotaLimits(requests_per_minute=60, tokens_per_minute=600)
    limiter.reserve([(TENANT, limits)], tokens=300)
    state = limiter.state(TENANT, limits)
    assert (state.limit_requests, state.remaining_requests) == (60, 59)
    assert state.reset_requests_s == pytest.approx(1.0)
    assert (state.limit_tokens, state.remaining_tokens) == (600, 300)
    assert state.reset_tokens_s == pytest.approx(30.0)
    unlimited = limiter.state(KEY, QuotaLimits())
    assert unlimited.limit_requests is None and unlimited.remaining_tokens is None


def test_changed_limits_keep_what_was_used(clock: Clock) -> None:
    limiter = InMemoryLimiter(clock)
    limiter.reserve([(TENANT, QuotaLimits(tokens_per_minute=100))], tokens=80)
    raised = QuotaLimits(tokens_per_minute=200)
    assert limiter.state(TENANT, raised).remaining_tokens == 120


def test_up_to_reserves_what_every_subject_has_left(clock: Clock) -> None:
    # An encrypted request: the gateway cannot see its size, so it takes what is left (the
    # worker holds the inner request to it) and settles to what was used.
    limiter = InMemoryLimiter(clock)
    tenant = QuotaLimits(tokens_per_day=5000)
    key = QuotaLimits(tokens_per_minute=3000)
    first = limiter.reserve([(TENANT, tenant), (KEY, key)], tokens=300, up_to=100_000)
    assert first.tokens == 3000 and first.token_limited
    # Nothing is left for a second one meanwhile: no two can overshoot together.
    with pytest.raises(QuotaExceeded):
        limiter.reserve([(TENANT, tenant), (KEY, key)], tokens=300, up_to=100_000)
    limiter.settle(first, 200)
    clock.now += 60
    second = limiter.reserve([(TENANT, tenant), (KEY, key)], tokens=300, up_to=100_000)
    # The day's budget is what bounds it now: 5000 - 200.
    assert second.tokens == 3000
    limiter.settle(second, 2800)
    clock.now += 60
    third = limiter.reserve([(TENANT, tenant)], tokens=300, up_to=100_000)
    assert third.tokens == 5000 - 200 - 2800
    # Up to is a ceiling too, and without any token limit it is what is reserved.
    limiter.settle(third, 0)
    assert limiter.reserve([(TENANT, tenant)], tokens=10, up_to=50).tokens == 50
    free = limiter.reserve([(TENANT, QuotaLimits(requests_per_minute=9))], tokens=10, up_to=70)
    assert free.tokens == 70 and not free.token_limited


def test_reservations_and_refusals_carry_the_states_for_the_headers(clock: Clock) -> None:
    # The gateway's rate-limit headers come from these, without asking the limiter again
    # (for a shared limiter, that would be another round trip to Redis).
    limiter = InMemoryLimiter(clock)
    tenant = QuotaLimits(requests_per_minute=2, tokens_per_minute=600)
    key = QuotaLimits(tokens_per_minute=1000)
    reservation = limiter.reserve([(TENANT, tenant), (KEY, key)], tokens=100)
    assert reservation.states == (limiter.state(TENANT, tenant), limiter.state(KEY, key))
    assert [s.remaining_tokens for s in reservation.states] == [500, 900]
    limiter.reserve([(TENANT, tenant), (KEY, key)], tokens=100)
    with pytest.raises(QuotaExceeded) as caught:
        limiter.reserve([(TENANT, tenant), (KEY, key)], tokens=100)
    assert caught.value.states == (limiter.state(TENANT, tenant), limiter.state(KEY, key))
    assert caught.value.states[0].remaining_requests == 0


def test_a_limit_of_zero_refuses_for_good(clock: Clock) -> None:
    limiter = InMemoryLimiter(clock)
    limits = QuotaLimits(requests_per_minute=0)
    error = refused(limiter, limits)
    assert error.code == "rate_limit_exceeded" and "retry-after" not in error.headers
    state = limiter.state(TENANT, limits)
    assert (state.remaining_requests, state.reset_requests_s) == (0, 0.0)
