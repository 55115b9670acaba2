"""The authenticator: bearer tokens to principals, with its cache and revision refresh."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from bastion.audit.alerts import DEFAULT_RULES, Alert, AlertRules
from bastion.audit.events import AUTH_FAILED, MemoryEventSink
from bastion.errors import AuthenticationError
from bastion.gateway.auth import Authenticator, NeedsRead
from bastion.gateway.gateway import Gateway
from bastion.identity.keys import KeyHasher, generate_api_key, parse_api_key
from bastion.identity.principal import OPERATOR
from bastion.identity.service import IdentityService
from bastion.store.db import Database

pytestmark = pytest.mark.unit

NOW = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Harness:
    """A database file, the identity service writing to it, and an authenticator."""

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path}"
        self.db = Database(self.url)
        self.db.migrate()
        self.hasher = KeyHasher(b"s" * 32)
        self.events = MemoryEventSink()
        self.clock = Clock()
        self.service = IdentityService(self.db, self.hasher, MemoryEventSink(), clock=self.clock)
        self.auth = Authenticator(self.db, self.hasher, self.events, clock=self.clock)
        self.queries = 0
        sa.event.listen(self.db.engine, "before_cursor_execute", self._count)
        self.service.create_tenant(OPERATOR, "acme")

    def _count(self, *args: Any) -> None:
        self.queries += 1

    def key(self, **kw: Any) -> tuple[str, str]:
        info, token = self.service.create_key(
            OPERATOR, tenant=kw.pop("tenant", "acme"), role=kw.pop("role", "consumer"), **kw
        )
        return info.id, token

    def failure(self, header: str | None) -> tuple[AuthenticationError, dict[str, Any]]:
        before = len(self.events.events)
        with pytest.raises(AuthenticationError) as info:
            self.auth.authenticate(header)
        assert len(self.events.events) == before + 1
        event = self.events.events[-1]
        assert event.kind == AUTH_FAILED and event.outcome == "failure"
        return info.value, {"reason": event.detail["reason"], "actor": event.actor}


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "bastion.db")
    yield harness
    harness.db.close()


def _no_secret_leaks(h: Harness, error: AuthenticationError, secret: str) -> None:
    assert secret not in str(error) and secret not in error.message
    assert secret not in repr(h.events.events)
    assert error.status == 401
    assert "www-authenticate" in error.headers


def test_valid_key_gives_its_principal(h: Harness) -> None:
    expiry = datetime.fromtimestamp(NOW + 3600, UTC)
    key_id, token = h.key(models=["tiny-*"], actions=["chat", "models"], expires_at=expiry)
    principal = h.auth.authenticate(f"Bearer {token}")
    assert principal.key_id == key_id
    assert principal.tenant_name == "acme"
    assert principal.role == "consumer"
    assert principal.models == ("tiny-*",)
    assert principal.actions == frozenset({"chat", "models"})
    assert principal.expires_at == expiry
    # The scheme is case-insensitive.
    assert h.auth.authenticate(f"bearer {token}") == principal
    assert h.auth.authenticate(f"BEARER {token}") == principal
    assert h.events.events == []


def test_cache_hits_do_not_touch_the_database(h: Harness) -> None:
    _, token = h.key()
    h.auth.refresh()
    h.auth.authenticate(f"Bearer {token}")
    after_first = h.queries
    for _ in range(20):
        h.auth.authenticate(f"Bearer {token}")
    assert h.queries == after_first


def test_wrong_secret(h: Harness) -> None:
    key_id, token = h.key()
    wrong = f"bsk_{key_id}_{generate_api_key().secret}"
    error, event = h.failure(f"Bearer {wrong}")
    assert event == {"reason": "bad_secret", "actor": key_id}
    _no_secret_leaks(h, error, parse_api_key(wrong)[1])
    _no_secret_leaks(h, error, parse_api_key(token)[1])


def test_unknown_key_and_negative_cache(h: Harness) -> None:
    unknown = generate_api_key()
    error, event = h.failure(f"Bearer {unknown.token}")
    assert event == {"reason": "unknown_key", "actor": unknown.public_id}
    _no_secret_leaks(h, error, unknown.secret)
    before = h.queries
    for _ in range(5):
        h.failure(f"Bearer {unknown.token}")
    assert h.queries == before  # remembered as unknown: no query per attempt


def test_negative_cache_is_bounded(tmp_path: Path) -> None:
    h = Harness(tmp_path / "bounded.db")
    h.auth = Authenticator(h.db, h.hasher, h.events, clock=h.clock, max_unknown_ids=4)
    tokens = [generate_api_key().token for _ in range(10)]
    for token in tokens:
        h.failure(f"Bearer {token}")
    assert len(h.auth._unknown) == 4
    h.db.close()


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token bsk_0123456789abcdef_" + "a" * 52,
        "Bearer bsk_0123456789abcdef",
        "Bearer sk-0123456789",
        "Bearer " + "x" * 10_000,
    ],
)
def test_missing_and_malformed_headers(h: Harness, header: str | None) -> None:
    error, event = h.failure(header)
    assert event["reason"] == ("missing" if header is None else "malformed")
    assert event["actor"] is None  # never a malformed id
    assert error.message == "Invalid or missing API key."


def test_expired_key(h: Harness) -> None:
    key_id, token = h.key(expires_at=datetime.fromtimestamp(NOW + 60, UTC))
    h.auth.authenticate(f"Bearer {token}")
    h.clock.now = NOW + 60
    error, event = h.failure(f"Bearer {token}")
    assert event == {"reason": "expired", "actor": key_id}
    _no_secret_leaks(h, error, parse_api_key(token)[1])


def test_revoked_in_another_process_stops_working_after_refresh(h: Harness) -> None:
    key_id, token = h.key()
    h.auth.refresh()
    h.auth.authenticate(f"Bearer {token}")  # now cached
    # The CLI is another process: another Database object on the same file.
    cli_db = Database(h.url)
    IdentityService(cli_db, h.hasher, MemoryEventSink()).revoke_key(OPERATOR, key_id)
    cli_db.close()
    assert h.auth.refresh() is True
    error, event = h.failure(f"Bearer {token}")
    assert event == {"reason": "revoked", "actor": key_id}
    _no_secret_leaks(h, error, parse_api_key(token)[1])
    assert h.auth.refresh() is False  # nothing changed since


def test_key_created_already_expired_never_works(h: Harness) -> None:
    key_id, token = h.key(expires_at=datetime(2001, 1, 1, tzinfo=UTC))
    _, event = h.failure(f"Bearer {token}")
    assert event == {"reason": "expired", "actor": key_id}


def test_disabled_tenant(h: Harness) -> None:
    h.service.create_tenant(OPERATOR, "globex")
    key_id, token = h.key(tenant="globex")
    h.auth.authenticate(f"Bearer {token}")
    h.service.disable_tenant(OPERATOR, "globex")
    h.auth.refresh()
    error, event = h.failure(f"Bearer {token}")
    assert event == {"reason": "tenant_disabled", "actor": key_id}
    _no_secret_leaks(h, error, parse_api_key(token)[1])


def test_a_key_created_after_an_unknown_lookup_works_after_refresh(h: Harness) -> None:
    h.auth.refresh()
    key_id, token = h.key()
    # Not refreshed yet, but a miss reads the database: new keys work at once.
    assert h.auth.authenticate(f"Bearer {token}").key_id == key_id
    h.auth.refresh()
    assert h.auth.authenticate(f"Bearer {token}").key_id == key_id


def test_rotated_key_old_fails_new_works(h: Harness) -> None:
    key_id, token = h.key()
    h.auth.authenticate(f"Bearer {token}")
    _, new_token = h.service.rotate_key(OPERATOR, key_id)
    h.auth.refresh()
    assert h.auth.authenticate(f"Bearer {new_token}").role == "consumer"
    _, event = h.failure(f"Bearer {token}")
    assert event["reason"] == "revoked"


def test_a_flood_of_made_up_ids_costs_no_query_per_id(h: Harness) -> None:
    # The finding: each random key id cost a database read, and a flood of them took the
    # median latency of legitimate requests from 1.5 to 36 ms.
    _, token = h.key()
    h.auth.refresh()  # loads the set of every key id
    h.auth.authenticate(f"Bearer {token}")
    before = h.queries
    for _ in range(500):
        made_up = generate_api_key().token
        with pytest.raises(AuthenticationError):
            h.auth.authenticate(f"Bearer {made_up}")
    # A few look-ups a second are still allowed (a key made by another process since the
    # last reload), never one per id.
    assert h.queries - before <= 10
    # The known key still works, from the cache.
    before = h.queries
    h.auth.authenticate(f"Bearer {token}")
    assert h.queries == before


def test_a_key_created_since_the_last_reload_is_found(h: Harness) -> None:
    h.auth.refresh()
    _, token = h.key()  # by "another process": no reload yet
    assert h.auth.authenticate(f"Bearer {token}").tenant_name == "acme"


def test_a_flood_of_failures_is_logged_as_counts(h: Harness) -> None:
    h.auth.refresh()
    first = len(h.events.events)
    for _ in range(300):
        with pytest.raises(AuthenticationError):
            h.auth.authenticate("Bearer nope")
    emitted = h.events.events[first:]
    assert len(emitted) == 20
    # The window ends: the rest comes as one event with their count.
    h.clock.now += 11
    h.auth.flush_failures()
    (summary,) = h.events.events[first + 20 :]
    assert summary.kind == AUTH_FAILED and summary.detail["count"] == 280
    assert summary.detail["reason"] == "malformed"


def test_a_flood_does_not_hide_a_targeted_key_from_the_alert_rules(tmp_path: Path) -> None:
    fired: list[Alert] = []
    events = MemoryEventSink()
    h = Harness(tmp_path / "flood.db")
    try:
        auth = Authenticator(
            h.db,
            h.hasher,
            events,
            clock=h.clock,
            alerts=AlertRules(DEFAULT_RULES, [fired.append]),
        )
        key_id, token = h.key()
        auth.refresh()
        # Any twenty failures fill the window's budget of events one by one ...
        for _ in range(20):
            with pytest.raises(AuthenticationError):
                auth.authenticate("Bearer nope")
        # ... and the guesses at one key id after them are held back as counts (no key id).
        wrong = token[:-1] + ("a" if token[-1] != "a" else "b")
        for _ in range(10):
            with pytest.raises(AuthenticationError):
                auth.authenticate(f"Bearer {wrong}")
        assert len(events.events) == 20
        assert all(e.actor != key_id for e in events.events)
        # The alert rules saw every one: the key id's rule fires.
        assert [(a.rule, dict(a.group)) for a in fired] == [
            ("auth_failures_per_key", {"actor": key_id})
        ]
        h.clock.now += 11
        auth.flush_failures()
        (summary,) = [e for e in events.events if e.detail.get("reason") == "bad_secret"]
        assert summary.detail["count"] == 10
        # The summary goes to the events only: the rules counted those failures already.
        assert len(fired) == 1
    finally:
        h.db.close()


def test_without_reads_a_cache_miss_asks_for_a_thread(h: Harness) -> None:
    _, token = h.key()
    h.auth.refresh()
    before = h.queries
    with pytest.raises(NeedsRead):
        h.auth.authenticate(f"Bearer {token}", may_read=False)
    assert h.queries == before
    principal = h.auth.authenticate(f"Bearer {token}")
    # Now cached: answered from memory, without a read.
    assert h.auth.authenticate(f"Bearer {token}", may_read=False) == principal
    # An id remembered as unknown is answered from memory too.
    unknown = generate_api_key()
    with pytest.raises(AuthenticationError):
        h.auth.authenticate(f"Bearer {unknown.token}")
    queries = h.queries
    with pytest.raises(AuthenticationError):
        h.auth.authenticate(f"Bearer {unknown.token}", may_read=False)
    assert h.queries == queries


def test_the_gateway_reads_a_missed_key_off_the_event_loop(h: Harness) -> None:
    _, token = h.key()
    h.auth.refresh()
    threads: list[threading.Thread] = []
    read = h.auth._read

    def record(public_id: str) -> Any:
        threads.append(threading.current_thread())
        return read(public_id)

    h.auth._read = record  # type: ignore[method-assign]
    owner = SimpleNamespace(authenticator=h.auth, metrics=SimpleNamespace())

    async def authenticate() -> Any:
        return await Gateway.authenticate(owner, f"Bearer {token}")  # type: ignore[arg-type]

    principal = asyncio.run(authenticate())
    assert principal.tenant_name == "acme"
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    # A cache hit stays on the loop's thread and reads nothing.
    asyncio.run(authenticate())
    assert len(threads) == 1
