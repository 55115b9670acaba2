"""The console's session table and its sign-ins in progress: timeouts, bounds, endings."""

from __future__ import annotations

import pytest

from bastion.console.sessions import (
    BY_KEY,
    BY_SSO,
    PendingSignIns,
    SessionStore,
    cookie_digest,
)
from bastion.identity.oidc import AuthorizationRequest
from bastion.identity.principal import ROLE_ADMIN, ROLE_TENANT_ADMIN, Principal

ADMIN = Principal("a" * 16, 1, "system", ROLE_ADMIN, actions=frozenset({"admin"}))
LEAD = Principal("b" * 16, 2, "acme", ROLE_TENANT_ADMIN, actions=frozenset({"admin"}))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def store(clock: Clock, limit: int = 100) -> SessionStore:
    return SessionStore(idle_s=60, max_age_s=300, clock=clock, limit=limit)


def test_a_session_is_found_by_its_cookie_which_is_not_kept() -> None:
    sessions = store(Clock())
    value, session = sessions.create(ADMIN, BY_KEY)
    assert sessions.find(value) is session
    assert session.digest == cookie_digest(value) != value
    assert value not in repr(sessions.active())
    assert sessions.find("made-up") is None and sessions.find(None) is None
    # Each session has a CSRF token of its own.
    _, other = sessions.create(ADMIN, BY_KEY)
    assert other.csrf != session.csrf and len(session.csrf) >= 43


def test_idle_and_absolute_timeouts_end_a_session() -> None:
    clock = Clock()
    sessions = store(clock)
    value, _ = sessions.create(ADMIN, BY_KEY)
    for _ in range(4):  # requests every 59 s keep it alive up to the absolute limit
        clock.now += 59
        assert sessions.find(value) is not None
    clock.now += 59  # 295 s after sign-in: still inside 300
    assert sessions.find(value) is not None
    clock.now += 10  # past 300 s since sign-in, though not idle
    assert sessions.find(value) is None
    idle, _ = sessions.create(ADMIN, BY_KEY)
    clock.now += 61
    assert sessions.find(idle) is None
    assert sessions.active() == []


def test_ending_sessions_says_why_once() -> None:
    sessions = store(Clock())
    first, _ = sessions.create(LEAD, BY_KEY)
    second, _ = sessions.create(LEAD, BY_SSO)
    admin, _ = sessions.create(ADMIN, BY_KEY)
    ended = sessions.end_where(lambda s: s.principal.tenant_name == "acme", "tenant_disabled")
    assert len(ended) == 2
    assert sessions.find(first) is None and sessions.find(admin) is not None
    assert sessions.why_ended(second) == "tenant_disabled"
    assert sessions.why_ended(second) is None
    assert sessions.why_ended(admin) is None


def test_the_table_is_bounded_least_recently_used_first() -> None:
    sessions = store(Clock(), limit=3)
    values = [sessions.create(ADMIN, BY_KEY)[0] for _ in range(3)]
    assert sessions.find(values[0]) is not None  # now the most recently used
    sessions.create(ADMIN, BY_KEY)
    assert sessions.find(values[1]) is None
    assert sessions.find(values[0]) is not None and sessions.find(values[2]) is not None


def test_flashes_are_shown_once() -> None:
    _, session = store(Clock()).create(ADMIN, BY_KEY)
    session.flash("ok", "done")
    assert session.take_flashes() == [("ok", "done")]
    assert session.take_flashes() == []


def _request() -> AuthorizationRequest:
    return AuthorizationRequest("https://idp/authorize", "s", "n", "v" * 43, started_at=0)


def test_a_pending_sign_in_is_taken_once_by_its_browser_within_its_time() -> None:
    clock = Clock()
    pending = PendingSignIns(clock=clock, ttl_s=600)
    started = _request()
    value = pending.add(started)
    assert pending.take("another browser") is None
    assert pending.take(value) is started
    assert pending.take(value) is None
    late = pending.add(_request())
    clock.now += 601
    assert pending.take(late) is None


@pytest.mark.parametrize("count", [5])
def test_pending_sign_ins_are_bounded(count: int) -> None:
    pending = PendingSignIns(clock=Clock(), limit=count)
    values = [pending.add(_request()) for _ in range(count + 1)]
    assert pending.take(values[0]) is None
    assert all(pending.take(v) is not None for v in values[1:])
