"""The throttle of failed authentication: back-off per address and per key id, on a clock
of the test's own, and never a valid key refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import sqlalchemy as sa

from bastion.api.fast import auth_throttle_of
from bastion.api.services import Services
from bastion.audit.alerts import DEFAULT_RULES, Alert, AlertRules
from bastion.audit.events import AUTH_FAILED, AUTH_THROTTLED, EventSink, MemoryEventSink
from bastion.config import Settings
from bastion.errors import AuthenticationError, AuthThrottled, ConfigurationError
from bastion.gateway.auth import Authenticator
from bastion.gateway.auth_throttle import (
    AuthThrottle,
    FailureThrottle,
    ThrottlePolicy,
    address_bucket,
    address_buckets,
)
from bastion.identity.keys import KeyHasher, generate_api_key
from bastion.identity.principal import OPERATOR, Principal
from bastion.identity.service import IdentityService
from bastion.observability.metrics import Metrics, MetricsEventSink
from bastion.store.db import Database

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


POLICY = ThrottlePolicy(failures=3, window_s=60.0, backoff_initial_s=1.0, backoff_max_s=8.0)


# ---------------------------------------------------------------------- one table


def test_the_back_off_doubles_with_each_further_failure_up_to_the_cap() -> None:
    clock = Clock()
    table = FailureThrottle(POLICY, clock)
    assert [table.fail("a").retry_after_s for _ in range(2)] == [0.0, 0.0]
    assert table.retry_after("a") == 0.0
    third = table.fail("a")
    # The failure that reaches the threshold starts the lock-out; it is not refused itself.
    assert (third.failures, third.retry_after_s, third.started, third.refused) == (
        3,
        1.0,
        True,
        False,
    )
    backoffs = []
    for _ in range(5):
        strike = table.fail("a")
        assert strike.refused and not strike.started
        backoffs.append(strike.retry_after_s)
    assert backoffs == [2.0, 4.0, 8.0, 8.0, 8.0]
    clock.now += 3
    assert table.retry_after("a") == 5.0
    # Another key has a history of its own.
    assert table.retry_after("b") == 0.0


def test_the_time_left_never_passes_the_cap_by_a_rounding_error() -> None:
    # At this clock value (now + 8) - now is 8.000000000000114 in floating point: rounded
    # up for Retry-After it would have said 9 s, past the 8 s cap.
    clock = Clock()
    clock.now = 1021.1448697231507
    table = FailureThrottle(POLICY, clock)
    strikes = [table.fail("a") for _ in range(7)]
    assert [s.retry_after_s for s in strikes[2:]] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert table.retry_after("a") == 8.0


def test_a_lock_out_expires_and_a_quiet_window_after_it_forgets_the_history() -> None:
    clock = Clock()
    table = FailureThrottle(POLICY, clock)
    for _ in range(3):
        table.fail("a")
    clock.now += 1.0
    assert table.retry_after("a") == 0.0
    # Within a window of the lock-out's end, the next failure locks out again, doubled:
    # a new lock-out (reported), and answered as the failure it is.
    again = table.fail("a")
    assert (again.retry_after_s, again.started, again.refused) == (2.0, True, False)
    clock.now += 2.0 + 60.0
    fresh = table.fail("a")
    assert (fresh.failures, fresh.retry_after_s) == (1, 0.0)


def test_below_the_threshold_only_one_windows_failures_add_up() -> None:
    clock = Clock()
    table = FailureThrottle(POLICY, clock)
    table.fail("a")
    table.fail("a")
    clock.now += 60.0
    assert table.fail("a").failures == 1
    table.fail("a")
    assert table.fail("a").started


def test_a_long_flood_does_not_overflow_the_back_off() -> None:
    table = FailureThrottle(POLICY, Clock())
    for _ in range(5000):
        strike = table.fail("a")
    assert strike.retry_after_s == 8.0


def test_the_table_is_bounded_and_keeps_the_most_recent_failures() -> None:
    policy = ThrottlePolicy(failures=3, max_entries=10)
    table = FailureThrottle(policy, Clock())
    for _ in range(3):
        table.fail("attacker")
    for n in range(9):
        table.fail(f"other-{n}")
    assert len(table) == 10
    # A failure moves its history to the back of the line: the oldest other goes first.
    table.fail("attacker")
    table.fail("newcomer")
    assert len(table) == 10
    assert table.retry_after("attacker") > 0
    for n in range(100_000):
        table.fail(f"flood-{n}")
    assert len(table) == 10


def test_a_full_table_never_forgets_a_lock_out() -> None:
    clock = Clock()
    table = FailureThrottle(ThrottlePolicy(failures=3, max_entries=10), clock)
    for _ in range(3):
        table.fail("attacker")
    # Fresh addresses failing once each push out one another, never the lock-out.
    for n in range(1000):
        table.fail(f"flood-{n}")
    assert len(table) == 10 and table.retry_after("attacker") == 1.0
    # A table full of lock-outs records no newcomer: its failure is refused as if locked
    # out, and every lock-out stays.
    for n in range(9):
        for _ in range(3):
            table.fail(f"locked-{n}")
    newcomer = table.fail("newcomer")
    assert newcomer.refused and not newcomer.started and newcomer.retry_after_s == 1.0
    assert table.retry_after("newcomer") == 0.0 and table.full == 1
    assert len(table) == 10 and table.retry_after("attacker") == 1.0
    assert all(table.retry_after(f"locked-{n}") == 1.0 for n in range(9))
    # Once lock-outs end, their histories make room again.
    clock.now += 1.0
    assert not table.fail("newcomer").refused
    assert table.retry_after("attacker") == 0.0 and len(table) == 10


# ---------------------------------------------------------------------- addresses


def test_ipv6_addresses_are_bucketed_by_their_64() -> None:
    one = address_bucket(("2001:db8:1:2:aaaa::1", 40_000))
    assert one == "2001:db8:1:2::/64"
    assert address_bucket(["2001:db8:1:2:ffff:ffff:ffff:ffff", 1]) == one
    assert address_bucket(("2001:db8:1:3::1", 1)) != one
    assert address_bucket(("192.0.2.7", 1)) == "192.0.2.7"
    assert address_bucket(("::ffff:192.0.2.7", 1)) == "192.0.2.7"
    assert address_bucket(None) == address_bucket(("", 0)) == "unknown"


def test_ipv6_addresses_are_also_bucketed_by_their_48() -> None:
    assert address_buckets(("2001:db8:1:2:aaaa::1", 1)) == ("2001:db8:1:2::/64", "2001:db8:1::/48")
    assert address_buckets(("2001:db8:1:ff00::1", 1))[1] == "2001:db8:1::/48"
    assert address_buckets(("2001:db8:2::1", 1))[1] == "2001:db8:2::/48"
    for ipv4 in ("192.0.2.7", "::ffff:192.0.2.7"):
        assert address_buckets((ipv4, 1)) == ("192.0.2.7", None)


# ---------------------------------------------------------------------- the request step


class Harness:
    """A key store, an authenticator over it, and its throttle on a test clock."""

    def __init__(
        self, path: Path, policy: ThrottlePolicy = POLICY, alerts: EventSink | None = None
    ) -> None:
        self.db = Database(f"sqlite:///{path}")
        self.db.migrate()
        self.hasher = KeyHasher(b"s" * 32)
        self.events = MemoryEventSink()
        self.metrics = Metrics()
        sink = _FanOut(self.events, MetricsEventSink(self.metrics))
        self.service = IdentityService(self.db, self.hasher, MemoryEventSink())
        self.service.create_tenant(OPERATOR, "acme")
        # The wall clock of events and their reports; the throttle's own is monotonic.
        self.wall = Clock()
        # As the server wires it: the events rate-limited, the alert rules every one.
        self.alerts = alerts if alerts is not None else MemoryEventSink()
        self.auth = Authenticator(self.db, self.hasher, sink, clock=self.wall, alerts=self.alerts)
        self.clock = Clock()
        self.throttle = AuthThrottle(
            policy, self.auth, self.clock, on_refused=self.metrics.auth_failures.inc
        )
        self.queries = 0
        sa.event.listen(self.db.engine, "before_cursor_execute", self._count)

    def _count(self, *args: Any) -> None:
        self.queries += 1

    def key(self) -> tuple[str, str]:
        info, token = self.service.create_key(OPERATOR, tenant="acme", role="consumer")
        self.auth.refresh()
        return info.id, token

    def sign_in(self, token: str | None, address: str = "192.0.2.1") -> Principal:
        async def check(header: str | None) -> Principal:
            return self.auth.authenticate(header)

        header = None if token is None else f"Bearer {token}"
        return asyncio.run(self.throttle.authenticate(check, header, (address, 50_000)))

    def refused(self, token: str | None, address: str = "192.0.2.1") -> AuthThrottled:
        with pytest.raises(AuthThrottled) as info:
            self.sign_in(token, address)
        return info.value

    def failed(self, token: str | None, address: str = "192.0.2.1") -> AuthenticationError:
        with pytest.raises(AuthenticationError) as info:
            self.sign_in(token, address)
        return info.value

    def lockouts(self) -> list[Any]:
        return [e for e in self.events.events if e.kind == AUTH_THROTTLED]

    def counted(self, scope: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "bastion_auth_throttled_total", {"scope": scope}
        )
        return float(value or 0.0)

    def failures_counted(self) -> float:
        value = self.metrics.registry.get_sample_value("bastion_auth_failures_total", {})
        return float(value or 0.0)


class _FanOut:
    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    def emit(self, event: Any) -> None:
        for sink in self.sinks:
            sink.emit(event)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "bastion.db")
    yield harness
    harness.db.close()


def _made_up() -> str:
    return generate_api_key().token


def test_a_flood_of_made_up_keys_from_one_address_is_refused_unchecked(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, valid = h.key()
    for _ in range(3):
        assert not isinstance(h.failed(_made_up()), AuthThrottled)
    verified = []
    real_verify = KeyHasher.verify

    def counting(self: KeyHasher, *args: Any) -> None:
        verified.append(args[0])
        real_verify(self, *args)

    monkeypatch.setattr(KeyHasher, "verify", counting)
    queries = h.queries
    retry_after = []
    for token in [_made_up() for _ in range(200)] + [None, "x" * 40]:
        refused = h.refused(token)
        assert refused.status == 429 and refused.code == "auth_throttled"
        retry_after.append(int(refused.headers["retry-after"]))
    # Nothing was checked: no HMAC, no database read (not even the few lookups a second
    # that ids missing from memory get).
    assert verified == [] and h.queries == queries
    assert retry_after[:4] == [2, 4, 8, 8]
    # Another address is not locked out; a valid key from the locked one passes.
    assert type(h.failed(_made_up(), address="198.51.100.9")) is AuthenticationError
    assert h.sign_in(valid).tenant_name == "acme"
    (lockout,) = h.lockouts()
    assert lockout.target == "192.0.2.1" and lockout.actor is None
    assert dict(lockout.detail) == {"scope": "address", "failures": 3, "retry_after_s": 1}
    assert h.counted("address") == 1 and h.counted("key") == 0


def test_a_locked_out_address_cannot_try_a_real_key_id_with_a_wrong_secret(h: Harness) -> None:
    key_id, _ = h.key()
    for _ in range(3):
        h.failed(_made_up())
    # The id exists, so the secret is checked: wrong, refused all the same.
    wrong = f"bsk_{key_id}_{'a' * 52}"
    assert h.refused(wrong).status == 429


def test_the_right_secret_passes_while_wrong_ones_are_refused_for_a_locked_key_id(
    h: Harness,
) -> None:
    key_id, token = h.key()
    other_id, _ = h.key()

    def guess(public_id: str = key_id) -> str:
        return f"bsk_{public_id}_{generate_api_key().secret}"

    # A guesser spread over many addresses, each below its own threshold.
    for n in range(3):
        failure = h.failed(guess(), address=f"203.0.113.{n}")
        assert type(failure) is AuthenticationError
    assert h.throttle.keys.retry_after(key_id) == 1.0
    answers = set()
    for n in range(3, 8):
        refused = h.refused(guess(), address=f"203.0.113.{n}")
        answers.add((refused.status, refused.code, refused.message))
    # Every wrong secret gets the same answer; the key's holder gets in, from anywhere.
    assert answers == {(429, "auth_throttled", AuthThrottled().message)}
    for address in ("203.0.113.0", "203.0.113.7", "192.0.2.200"):
        assert h.sign_in(token, address=address).key_id == key_id
    # Only that key id is locked out.
    assert type(h.failed(guess(other_id), address="203.0.113.100")) is AuthenticationError
    (lockout,) = h.lockouts()
    assert lockout.actor == key_id and lockout.target is None
    assert lockout.detail["scope"] == "key" and lockout.detail["failures"] == 3
    assert token.split("_")[-1] not in repr(h.events.events)
    assert h.counted("key") == 1


def test_a_key_that_proves_its_secret_keeps_its_own_answer(h: Harness) -> None:
    key_id, token = h.key()
    h.service.revoke_key(OPERATOR, key_id)
    h.auth.refresh()
    for _ in range(3):
        h.failed(_made_up())
    # The address is locked out, but the revoked key's holder learns why it fails.
    failure = h.failed(token)
    assert type(failure) is AuthenticationError and "revoked" in failure.message
    # And its failures count for no lock-out of their own.
    for _ in range(10):
        h.failed(token, address="198.51.100.1")
    assert h.throttle.addresses.retry_after("198.51.100.1") == 0.0


def test_a_lock_out_ends_after_its_back_off(h: Harness) -> None:
    for _ in range(3):
        h.failed(_made_up())
    h.refused(_made_up())  # 2 s now
    h.clock.now += 2.0
    assert type(h.failed(_made_up())) is AuthenticationError


def test_an_ipv6_host_cannot_escape_by_changing_its_address(h: Harness) -> None:
    for n in range(3):
        h.failed(_made_up(), address=f"2001:db8:5:6::{n + 1:x}")
    assert h.refused(_made_up(), address="2001:db8:5:6:ffff::1").status == 429
    assert type(h.failed(_made_up(), address="2001:db8:5:7::1")) is AuthenticationError


def test_a_site_cannot_escape_by_taking_turns_among_its_64s(h: Harness) -> None:
    _, valid = h.key()
    # A /56 holds 256 /64s: one failure from each of 24 of them, each below its threshold,
    # reaches the /48's (8 times a /64's).
    for n in range(3 * 8):
        failure = h.failed(_made_up(), address=f"2001:db8:aa:{n:x}::1")
        assert type(failure) is AuthenticationError
    (lockout,) = h.lockouts()
    assert lockout.target == "2001:db8:aa::/48" and lockout.detail["scope"] == "address"
    # A /64 of that /48 never seen before is refused, unchecked; another /48 is not.
    assert h.refused(_made_up(), address="2001:db8:aa:ffff::1").status == 429
    assert h.refused(None, address="2001:db8:aa:ff00::9").status == 429
    assert type(h.failed(_made_up(), address="2001:db8:ab::1")) is AuthenticationError
    # A valid key from inside the /48 gets in.
    assert h.sign_in(valid, address="2001:db8:aa:ffff::1").tenant_name == "acme"


def test_a_full_table_of_lock_outs_refuses_new_addresses_failures_not_valid_keys(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path / "full.db", ThrottlePolicy(failures=3, max_entries=4))
    try:
        _, valid = h.key()
        for n in range(4):
            for _ in range(3):
                h.failed(_made_up(), address=f"10.0.0.{n}")
        # The attackers cannot free their lock-outs by failing from new addresses ...
        assert h.refused(_made_up(), address="10.9.9.9").status == 429
        assert all(h.throttle.addresses.retry_after(f"10.0.0.{n}") for n in range(4))
        # ... and a valid key passes from anywhere.
        assert h.sign_in(valid, address="10.9.9.9").tenant_name == "acme"
    finally:
        h.db.close()


def test_refused_unchecked_requests_count_as_failed_sign_ins(tmp_path: Path) -> None:
    fired: list[Alert] = []
    h = Harness(tmp_path / "burst.db", alerts=AlertRules(DEFAULT_RULES, [fired.append]))
    try:
        h.auth.refresh()  # the key ids are known: made-up ones can be refused unchecked
        for _ in range(3):
            h.failed(_made_up())
        for _ in range(100):
            h.refused(_made_up())
        # In the metric of failed sign-ins (the others are counted by the gateway's check),
        assert h.failures_counted() == 100
        # in the events (rate-limited; no key id, nothing of the credential) ...
        refused = [e for e in h.events.events if e.detail.get("reason") == "throttled"]
        assert refused and all(e.kind == AUTH_FAILED and e.actor is None for e in refused)
        # ... and, every one, in the alert rules: the burst rule sees them.
        assert "auth_failures_burst" in [a.rule for a in fired]
    finally:
        h.db.close()


def test_each_lock_out_is_reported_once_and_a_flood_of_them_as_counts(h: Harness) -> None:
    for _ in range(50):
        with contextlib.suppress(AuthenticationError, AuthThrottled):
            h.sign_in(_made_up())
    assert len(h.lockouts()) == 1
    # A thousand addresses each locked out: 20 reports one by one, the rest counted.
    for n in range(1000):
        for _ in range(3):
            h.failed(_made_up(), address=f"10.0.{n // 256}.{n % 256}")
    assert len(h.lockouts()) == 20
    h.wall.now += 11  # the report's window ends
    h.auth.flush_failures()
    summary = h.lockouts()[-1]
    assert dict(summary.detail) == {"scope": "address", "count": 981, "window_s": 10.0}
    assert h.counted("address") == 1001


def test_zero_failures_turns_the_throttle_off(tmp_path: Path) -> None:
    h = Harness(tmp_path / "off.db", ThrottlePolicy(failures=0))
    try:
        for _ in range(50):
            assert type(h.failed(_made_up())) is AuthenticationError
        assert len(h.throttle.addresses) == 0 and h.lockouts() == []
    finally:
        h.db.close()


def test_the_settings_make_the_policy() -> None:
    settings = Settings.load(
        {
            "BASTION_AUTH_THROTTLE_FAILURES": "4",
            "BASTION_AUTH_THROTTLE_WINDOW_S": "30",
            "BASTION_AUTH_THROTTLE_BACKOFF_INITIAL_S": "2",
            "BASTION_AUTH_THROTTLE_BACKOFF_MAX_S": "600",
        }
    )
    assert ThrottlePolicy.of(settings) == ThrottlePolicy(
        failures=4, window_s=30.0, backoff_initial_s=2.0, backoff_max_s=600.0
    )
    assert ThrottlePolicy.of(Settings()) == ThrottlePolicy()
    with pytest.raises(ConfigurationError):
        ThrottlePolicy(backoff_initial_s=10.0, backoff_max_s=5.0)
    with pytest.raises(ConfigurationError):
        ThrottlePolicy(failures=-1)


def test_the_listeners_of_one_server_share_one_throttle(h: Harness) -> None:
    services = cast(
        Services,
        SimpleNamespace(
            gateway=SimpleNamespace(authenticator=h.auth), settings=Settings(), metrics=Metrics()
        ),
    )
    first = auth_throttle_of(services)
    assert auth_throttle_of(services) is first
    assert first.policy == ThrottlePolicy()
