"""The OHTTP replay guard that gateways share in Redis, against a real redis-server."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from redis_testing import wait_until

from bastion.config import Settings
from bastion.errors import LimiterUnavailable
from bastion.gateway.sealing import RedisReplayGuard, Replayed, ReplayGuard, SealingState
from bastion.quotas.redis import FAIL_CLOSED, FAIL_OPEN, RedisLink
from services import RedisServer

MAKE_GUARD = Callable[..., RedisReplayGuard]


@pytest.fixture
def make_guard(redis_server: RedisServer, prefix: str) -> Iterator[MAKE_GUARD]:
    """Replay guards, each with a link of its own (a gateway of its own)."""
    links: list[RedisLink] = []

    def make(policy: str = FAIL_CLOSED, ttl_s: float = 121.0) -> RedisReplayGuard:
        link = RedisLink.connect(redis_server.url(), timeout_s=1.0, policy=policy)
        links.append(link)
        return RedisReplayGuard(link, ReplayGuard(ttl_s, 1000), ttl_s, prefix=prefix)

    yield make
    for link in links:
        link.close()


def test_a_request_replayed_to_another_gateway_is_refused(make_guard: MAKE_GUARD) -> None:
    one, other = make_guard(), make_guard()
    enc = os.urandom(32)
    one.check(enc)
    with pytest.raises(Replayed) as caught:
        other.check(enc)
    assert caught.value.code == "ohttp_replay" and caught.value.status == 400
    with pytest.raises(Replayed):
        one.check(enc)
    other.check(os.urandom(32))


def test_a_forgotten_request_may_come_again(make_guard: MAKE_GUARD) -> None:
    one, other = make_guard(), make_guard()
    enc = os.urandom(32)
    one.check(enc)
    one.forget(enc)
    other.check(enc)


def test_entries_are_digests_that_expire_after_the_window(
    make_guard: MAKE_GUARD, client: redis.Redis, prefix: str
) -> None:
    guard = make_guard(ttl_s=0.5)
    enc = os.urandom(32)
    guard.check(enc)
    (key,) = client.keys(f"{prefix}*")
    assert isinstance(key, bytes)
    assert key.startswith(f"{prefix}ohttp:".encode()) and enc.hex().encode() not in key
    assert 0 < client.pttl(key) <= 500
    time.sleep(0.6)
    guard.check(enc)


def test_fail_closed_refuses_encrypted_requests_while_redis_is_away(
    outage: RedisServer, make_guard: MAKE_GUARD
) -> None:
    guard = make_guard(FAIL_CLOSED)
    outage.stop()
    with pytest.raises(LimiterUnavailable) as caught:
        guard.check(os.urandom(32))
    assert caught.value.status == 503 and caught.value.code == "limiter_unavailable"
    guard.forget(os.urandom(32))
    outage.start()
    enc = os.urandom(32)
    wait_until(lambda: _accepted(guard, enc))
    with pytest.raises(Replayed):
        guard.check(enc)


def test_fail_open_checks_locally_while_redis_is_away(
    outage: RedisServer, make_guard: MAKE_GUARD
) -> None:
    guard, other = make_guard(FAIL_OPEN), make_guard(FAIL_OPEN)
    outage.stop()
    enc = os.urandom(32)
    guard.check(enc)
    # This gateway still refuses its own replays; another gateway cannot know of them.
    with pytest.raises(Replayed):
        guard.check(enc)
    other.check(enc)
    outage.start()
    fresh = os.urandom(32)
    wait_until(lambda: _accepted(guard, fresh))
    # Back in Redis: the other gateway sees it.
    wait_until(lambda: _refused_as_replay(other, fresh))


def _accepted(guard: RedisReplayGuard, enc: bytes) -> bool:
    try:
        guard.check(enc)
    except LimiterUnavailable:
        return False
    return True


def _refused_as_replay(guard: RedisReplayGuard, enc: bytes) -> bool:
    try:
        guard.check(enc)
    except Replayed:
        return True
    return False


def test_the_gateways_sealing_state_uses_the_shared_guard(make_guard: MAKE_GUARD) -> None:
    # (An empty guard is still the guard: its emptiness must not make the state pick its own.)
    guard = make_guard()
    assert SealingState(Settings(), replays=guard).replays is guard
    assert isinstance(SealingState(Settings()).replays, ReplayGuard)
