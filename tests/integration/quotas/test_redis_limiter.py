"""The Redis limiter against a real redis-server: InMemoryLimiter's rules, shared.

The rules themselves are checked twice, on both limiters with the same expectations
(`either` runs each test on an InMemoryLimiter and on a RedisLimiter); what only a shared
limiter has (several gateways, leases, Redis going away) is checked on Redis alone. Each
test's keys have a prefix of their own, so no test sees another's counts.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from redis_testing import redis_now, wait_until

from bastion.errors import LimiterUnavailable, PayloadTooLarge
from bastion.quotas.limiter import (
    InMemoryLimiter,
    Limiter,
    QuotaExceeded,
    QuotaLimits,
    Subject,
)
from bastion.quotas.redis import FAIL_CLOSED, FAIL_OPEN, RedisLimiter, RedisLink
from services import RedisServer

TENANT = Subject("tenant", "acme")
KEY = Subject("key", "bsk_0123")
MAKE_LIMITER = Callable[..., RedisLimiter]


@pytest.fixture
def make_limiter(redis_server: RedisServer, prefix: str) -> Iterator[MAKE_LIMITER]:
    """RedisLimiters, each with a link of its own (a gateway of its own), closed after."""
    made: list[tuple[RedisLimiter, RedisLink]] = []

    def make(policy: str = FAIL_CLOSED, lease_ttl_s: float = 30.0) -> RedisLimiter:
        link = RedisLink.connect(redis_server.url(), timeout_s=1.0, policy=policy)
        limiter = RedisLimiter(link, prefix=prefix, lease_ttl_s=lease_ttl_s)
        made.append((limiter, link))
        return limiter

    yield make
    for limiter, link in made:
        limiter.close()
        link.close()


@pytest.fixture(params=["memory", "redis"])
def either(request: pytest.FixtureRequest, make_limiter: MAKE_LIMITER) -> Limiter:
    if request.param == "memory":
        return InMemoryLimiter()
    return make_limiter()


def refused(limiter: Limiter, limits: QuotaLimits, tokens: int = 0) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as caught:
        limiter.reserve([(TENANT, limits)], tokens=tokens)
    assert caught.value.status == 429
    return caught.value


# ---------------------------------------------------------------------- the same rules


def test_requests_per_minute(either: Limiter) -> None:
    limits = QuotaLimits(requests_per_minute=3)
    reservations = [either.reserve([(TENANT, limits)], tokens=0) for _ in range(3)]
    assert [r.states[0].remaining_requests for r in reservations] == [2, 1, 0]
    error = refused(either, limits)
    assert error.code == "rate_limit_exceeded"
    assert error.message == "The tenant acme reached its limit of 3 requests per minute."
    # One request comes back every 20 s.
    assert error.headers["retry-after"] == "20"
    assert error.states[0].remaining_requests == 0


def test_tokens_are_reserved_then_settled_to_what_was_used(either: Limiter) -> None:
    limits = QuotaLimits(tokens_per_minute=100)
    first = either.reserve([(TENANT, limits)], tokens=80)
    assert refused(either, limits, tokens=30).code == "tokens_limit_exceeded"
    # It used 10 of its 80: the other 70 come back (before the next reservation).
    either.settle(first, 10)
    second = either.reserve([(TENANT, limits)], tokens=30)
    assert second.states[0].remaining_tokens == 60
    assert either.state(TENANT, limits).remaining_tokens == 60
    # Using more than reserved is charged too: the bucket goes below zero and others wait.
    either.settle(second, 150)
    assert either.state(TENANT, limits).remaining_tokens == 0
    error = refused(either, limits, tokens=1)
    # 60 - 120 = -60 left: one token is 61 away, at 100 a minute.
    assert error.headers["retry-after"] == "37"
    # Settling twice changes nothing; charging after the settlement does.
    either.settle(second, 150)
    either.charge(second, 0)
    assert refused(either, limits, tokens=1).headers["retry-after"] == "37"
    either.charge(second, 100)
    assert refused(either, limits, tokens=1).headers["retry-after"] == "97"


def test_a_request_bigger_than_a_minute_of_tokens_can_never_pass(either: Limiter) -> None:
    error = refused(either, QuotaLimits(tokens_per_minute=100), tokens=101)
    assert error.message == (
        "The request may use 101 tokens, more than the tenant acme's limit of 100 per minute; "
        "lower max_tokens."
    )
    assert "retry-after" not in error.headers


def test_concurrency_is_held_until_settled(either: Limiter) -> None:
    limits = QuotaLimits(concurrent_requests=2)
    one = either.reserve([(TENANT, limits)], tokens=0)
    either.reserve([(TENANT, limits)], tokens=0)
    error = refused(either, limits)
    assert error.code == "concurrency_limit_exceeded"
    assert error.headers["retry-after"] == "1"
    either.settle(one, 0)
    either.settle(one, 0)
    either.reserve([(TENANT, limits)], tokens=0)
    assert refused(either, limits).code == "concurrency_limit_exceeded"


def test_the_daily_budget(either: Limiter, client: redis.Redis) -> None:
    limits = QuotaLimits(tokens_per_day=100)
    either.settle(either.reserve([(TENANT, limits)], tokens=50), 90)
    error = refused(either, limits, tokens=20)
    assert error.code == "daily_budget_exceeded"
    # Until midnight UTC (on Redis's clock; the same as this machine's).
    now = redis_now(client)
    to_midnight = math.ceil((math.floor(now / 86400) + 1) * 86400 - now)
    assert abs(int(error.headers["retry-after"]) - to_midnight) <= 1
    either.reserve([(TENANT, limits)], tokens=10)
    refused(either, limits, tokens=1)


def test_a_refusal_by_one_subject_takes_nothing_from_the_others(either: Limiter) -> None:
    tenant = QuotaLimits(requests_per_minute=1)
    key = QuotaLimits(requests_per_minute=10, tokens_per_minute=1000)
    either.reserve([(TENANT, tenant), (KEY, key)], tokens=100)
    with pytest.raises(QuotaExceeded) as caught:
        either.reserve([(TENANT, tenant), (KEY, key)], tokens=100)
    # The refusal reports both subjects, as they were.
    assert [s.remaining_requests for s in caught.value.states] == [0, 9]
    state = either.state(KEY, key)
    assert state.remaining_requests == 9 and state.remaining_tokens == 900


def test_request_size_is_a_413(either: Limiter) -> None:
    limits = QuotaLimits(max_request_bytes=100)
    with pytest.raises(PayloadTooLarge) as caught:
        either.reserve([(TENANT, limits)], tokens=0, request_bytes=101)
    assert caught.value.status == 413
    assert (
        caught.value.message == "The request is larger than the tenant acme's limit of 100 bytes."
    )
    either.reserve([(TENANT, limits)], tokens=0, request_bytes=100)


def test_states_are_what_the_headers_need(either: Limiter) -> None:
    limits = QuotaLimits(requests_per_minute=60, tokens_per_minute=600)
    reservation = either.reserve([(TENANT, limits)], tokens=300)
    for state in (reservation.states[0], either.state(TENANT, limits)):
        assert (state.limit_requests, state.remaining_requests) == (60, 59)
        assert state.reset_requests_s == pytest.approx(1.0, abs=0.05)
        assert (state.limit_tokens, state.remaining_tokens) == (600, 300)
        assert state.reset_tokens_s == pytest.approx(30.0, abs=0.05)
    unlimited = either.state(KEY, QuotaLimits())
    assert unlimited.limit_requests is None and unlimited.remaining_tokens is None


def test_changed_limits_keep_what_was_used(either: Limiter) -> None:
    either.reserve([(TENANT, QuotaLimits(tokens_per_minute=100))], tokens=80)
    assert either.state(TENANT, QuotaLimits(tokens_per_minute=200)).remaining_tokens == 120


def test_a_limit_lifted_then_set_again_starts_full(either: Limiter) -> None:
    limited = QuotaLimits(requests_per_minute=2, tokens_per_minute=100)
    for _ in range(2):
        either.reserve([(TENANT, limited)], tokens=10)
    refused(either, limited)
    either.reserve([(TENANT, QuotaLimits(tokens_per_minute=100))], tokens=10)
    again = either.reserve([(TENANT, limited)], tokens=10)
    assert [again.states[0].remaining_requests, again.states[0].remaining_tokens] == [1, 60]


def test_up_to_reserves_what_every_subject_has_left(either: Limiter) -> None:
    tenant = QuotaLimits(tokens_per_day=5000)
    key = QuotaLimits(tokens_per_minute=3000)
    first = either.reserve([(TENANT, tenant), (KEY, key)], tokens=300, up_to=100_000)
    assert first.tokens == 3000 and first.token_limited
    # Nothing is left for a second one meanwhile: no two can overshoot together.
    with pytest.raises(QuotaExceeded):
        either.reserve([(TENANT, tenant), (KEY, key)], tokens=300, up_to=100_000)
    either.settle(first, 200)
    # Without the key's minute bucket, the day's budget bounds it: 5000 - 200.
    second = either.reserve([(TENANT, tenant)], tokens=300, up_to=100_000)
    assert second.tokens == 4800
    either.settle(second, 0)
    assert either.reserve([(TENANT, tenant)], tokens=10, up_to=50).tokens == 50
    free = either.reserve([(TENANT, QuotaLimits(requests_per_minute=9))], tokens=10, up_to=70)
    assert free.tokens == 70 and not free.token_limited


def test_a_limit_of_zero_refuses_without_retry_after(either: Limiter) -> None:
    error = refused(either, QuotaLimits(requests_per_minute=0))
    assert error.code == "rate_limit_exceeded" and "retry-after" not in error.headers
    assert either.state(TENANT, QuotaLimits(requests_per_minute=0)).remaining_requests == 0


# ---------------------------------------------------------------------- Redis only


def test_buckets_refill_on_redis_clock(make_limiter: MAKE_LIMITER) -> None:
    limiter = make_limiter()
    limits = QuotaLimits(requests_per_minute=60)
    for _ in range(60):
        limiter.reserve([(TENANT, limits)], tokens=0)
    assert refused(limiter, limits).headers["retry-after"] == "1"
    # One a second comes back.
    time.sleep(1.05)
    limiter.reserve([(TENANT, limits)], tokens=0)


def test_the_daily_budget_is_of_the_current_day(
    make_limiter: MAKE_LIMITER, client: redis.Redis, prefix: str
) -> None:
    limiter = make_limiter()
    limits = QuotaLimits(tokens_per_day=100)
    limiter.reserve([(TENANT, limits)], tokens=100)
    refused(limiter, limits, tokens=1)
    # The same counts, had they been yesterday's: today starts afresh.
    (usage,) = client.keys(f"{prefix}quota:tenant:*")
    yesterday = math.floor(redis_now(client) / 86400) - 1
    client.hset(usage, "d", str(yesterday))
    assert limiter.reserve([(TENANT, limits)], tokens=100).tokens == 100


def test_keys_are_prefixed_digested_and_expire(
    make_limiter: MAKE_LIMITER, client: redis.Redis, prefix: str
) -> None:
    limiter = make_limiter()
    odd = Subject("tenant", "a:b c\n*{}é")
    limits = QuotaLimits(requests_per_minute=60, concurrent_requests=1)
    held = limiter.reserve([(odd, limits)], tokens=0)
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in client.keys(f"{prefix}*"))
    assert len(keys) == 2 and keys[1] == keys[0] + ":leases"
    assert keys[0].startswith(f"{prefix}quota:tenant:") and "a:b" not in keys[0]
    # The bucket is full again within a second (one of 60 a minute): it expires soon after;
    # the lease set lives as long as a lease, renewed.
    assert 0 < client.pttl(keys[0]) <= 2000
    assert 0 < client.pttl(keys[1]) <= 31_000
    limiter.settle(held, 0)
    limiter.flush()
    assert client.zcard(keys[1]) == 0


def test_two_gateways_share_one_limit(make_limiter: MAKE_LIMITER, client: redis.Redis) -> None:
    # A tenant's 600 requests a minute, flooded through two gateways from four threads
    # each: exactly 600 are admitted, plus what the bucket refilled meanwhile (10 a second,
    # on Redis's clock, which is measured around the flood).
    gateways = [make_limiter(), make_limiter()]
    limits = QuotaLimits(requests_per_minute=600)
    admitted = [0, 0]
    codes: set[str] = set()
    refusals = 0
    lock = threading.Lock()
    stop = threading.Event()

    def flood(gateway: int) -> None:
        nonlocal refusals
        mine = 0
        while not stop.is_set():
            try:
                gateways[gateway].reserve([(TENANT, limits)], tokens=0)
                mine += 1
            except QuotaExceeded as exc:
                with lock:
                    codes.add(exc.code)
                    refusals += 1
                    if refusals >= 40:
                        stop.set()
        with lock:
            admitted[gateway] += mine

    threads = [threading.Thread(target=flood, args=(g,)) for g in (0, 1) for _ in range(4)]
    started = redis_now(client)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    ended = redis_now(client)
    refilled = (ended - started) * 10
    assert codes == {"rate_limit_exceeded"}
    assert 600 <= sum(admitted) <= 600 + math.floor(refilled)
    # Both gateways admitted some.
    assert all(admitted), admitted


def test_settlements_reach_redis_in_order_and_are_seen_by_others(
    make_limiter: MAKE_LIMITER,
) -> None:
    one, other = make_limiter(), make_limiter()
    limits = QuotaLimits(tokens_per_minute=1000, concurrent_requests=1)
    held = one.reserve([(TENANT, limits)], tokens=900)
    assert refused(other, limits).code == "concurrency_limit_exceeded"
    one.settle(held, 100)
    one.charge(held, 50)
    # The sender thread sends them without anyone waiting.
    wait_until(lambda: other.state(TENANT, limits).remaining_tokens == 850)
    assert other.reserve([(TENANT, limits)], tokens=850).tokens == 850


def test_close_sends_what_is_queued_and_frees_the_slots(make_limiter: MAKE_LIMITER) -> None:
    one, other = make_limiter(), make_limiter()
    limits = QuotaLimits(tokens_per_minute=1000, concurrent_requests=2)
    settled = one.reserve([(TENANT, limits)], tokens=500)
    one.reserve([(TENANT, limits)], tokens=100)
    one.settle(settled, 0)
    one.close()
    # The settlement was sent, and the request still in progress freed its slot.
    state = other.state(TENANT, limits)
    assert state.remaining_tokens == 900
    other.reserve([(TENANT, limits)], tokens=0)
    other.reserve([(TENANT, limits)], tokens=0)


_DEAD_GATEWAY = """
import sys, time
from bastion.quotas.limiter import QuotaLimits, Subject
from bastion.quotas.redis import RedisLimiter, RedisLink
link = RedisLink.connect(sys.stdin.readline().strip(), timeout_s=1.0)
limiter = RedisLimiter(link, prefix=sys.argv[1], lease_ttl_s=float(sys.argv[2]))
for _ in range(2):
    limiter.reserve([(Subject("tenant", "acme"), QuotaLimits(concurrent_requests=2))], tokens=0)
print("held", flush=True)
time.sleep(600)
"""


def test_a_dead_gateways_slots_come_back_after_the_lease(
    redis_server: RedisServer, make_limiter: MAKE_LIMITER, prefix: str
) -> None:
    limits = QuotaLimits(concurrent_requests=2)
    gateway = subprocess.Popen(
        [sys.executable, "-c", _DEAD_GATEWAY, prefix, "2.0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert gateway.stdin is not None and gateway.stdout is not None
        gateway.stdin.write(redis_server.url() + "\n")
        gateway.stdin.flush()
        assert gateway.stdout.readline().strip() == "held"
        survivor = make_limiter(lease_ttl_s=2.0)
        # Its two slots are held while it lives (renewed, past their first lease)...
        time.sleep(3.0)
        assert refused(survivor, limits).code == "concurrency_limit_exceeded"
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait(10)
        # ...and come back once their leases run out, without anyone settling them.
        assert refused(survivor, limits).code == "concurrency_limit_exceeded"
        wait_until(lambda: _admits(survivor, limits))
        survivor.reserve([(TENANT, limits)], tokens=0)
    finally:
        if gateway.poll() is None:
            os.kill(gateway.pid, signal.SIGKILL)
            gateway.wait(10)


def test_a_long_request_keeps_its_slot_past_the_lease(make_limiter: MAKE_LIMITER) -> None:
    limits = QuotaLimits(concurrent_requests=1)
    long, other = make_limiter(lease_ttl_s=1.0), make_limiter(lease_ttl_s=1.0)
    held = long.reserve([(TENANT, limits)], tokens=0)
    # Three leases' lives later, the request (still running) holds its slot: renewed.
    time.sleep(3.0)
    assert refused(other, limits).code == "concurrency_limit_exceeded"
    long.settle(held, 0)
    long.flush()
    other.reserve([(TENANT, limits)], tokens=0)


def _admits(limiter: Limiter, limits: QuotaLimits) -> bool:
    try:
        limiter.reserve([(TENANT, limits)], tokens=0)
    except (QuotaExceeded, LimiterUnavailable):
        return False
    return True


# ---------------------------------------------------------------------- Redis goes away


def test_fail_closed_refuses_while_redis_is_away(
    outage: RedisServer, make_limiter: MAKE_LIMITER, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = make_limiter(FAIL_CLOSED)
    limits = QuotaLimits(requests_per_minute=100, concurrent_requests=5)
    before = limiter.reserve([(TENANT, limits)], tokens=0)
    outage.stop()
    for _ in range(3):
        with pytest.raises(LimiterUnavailable) as caught:
            limiter.reserve([(TENANT, limits)], tokens=0)
        error = caught.value
        assert (error.status, error.code, error.headers["retry-after"]) == (
            503,
            "limiter_unavailable",
            "2",
        )
    with pytest.raises(LimiterUnavailable):
        limiter.state(TENANT, limits)
    # A settlement that cannot be sent is dropped, not raised.
    limiter.settle(before, 0)
    limiter.flush()
    # One warning for the outage, without the URL (and its password).
    warnings = [r for r in caplog.records if r.name == "bastion.redis" and r.levelname == "WARNING"]
    assert [r.getMessage() for r in warnings][:1] == [
        "Redis does not answer; its failure policy applies until it does"
    ]
    assert all(outage.password not in r.getMessage() for r in caplog.records)
    outage.start()
    wait_until(lambda: _admits(limiter, limits))
    # Redis restarted empty (no persistence here): only what was admitted since counts.
    assert limiter.state(TENANT, limits).remaining_requests == 99


def test_fail_open_falls_back_to_local_limits_then_returns(
    outage: RedisServer, make_limiter: MAKE_LIMITER
) -> None:
    limiter = make_limiter(FAIL_OPEN)
    observer = make_limiter(FAIL_CLOSED)
    limits = QuotaLimits(requests_per_minute=2)
    limiter.reserve([(TENANT, limits)], tokens=0)
    outage.stop()
    # This gateway's own limits apply meanwhile (its own bucket: two more).
    local = [limiter.reserve([(TENANT, limits)], tokens=0) for _ in range(2)]
    assert refused(limiter, limits).code == "rate_limit_exceeded"
    limiter.settle(local[0], 0)
    assert limiter.state(TENANT, limits).remaining_requests == 0
    outage.start()
    # Back to Redis (restarted empty) once it answers: what it admits, others see.
    wait_until(lambda: _admits(limiter, limits))
    assert observer.state(TENANT, limits).remaining_requests == 1
    limiter.settle(local[1], 0)
