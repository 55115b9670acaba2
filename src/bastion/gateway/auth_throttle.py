"""Throttling of failed authentication: per client address and per key id, with exponential
back-off, never refusing a valid key.

Failures are counted in two tables (:class:`FailureThrottle`):

- per **client address**: the TCP peer of the connection (the server reads no proxy
  headers, so a client cannot choose it), an IPv6 address by its /64 (a host usually holds
  a whole /64 and could otherwise take a fresh address per attempt). Every failure that
  does not prove the key's secret counts: no key, a malformed one, an unknown id, a wrong
  secret, a JWT refused before its signature verified (with single sign-on).
- per **key id**: wrong secrets for a key that exists, from any address (a guesser spread
  over many addresses).

``failures`` failures within ``window_s`` start a lock-out of ``backoff_initial_s``; each
further failure (a refused attempt included) doubles it, up to ``backoff_max_s``. A history
is forgotten once its lock-out has ended and ``window_s`` has passed without a failure.

During a lock-out, failures are answered 429 with ``Retry-After`` instead of 401; what a
request costs and whether it can still succeed is decided by what it could prove:

- a request from a locked-out address that names no existing key id (no header, a
  malformed token, an id not in the authenticator's in-memory set) is refused at once and
  nothing is checked: no HMAC, no database read;
- every other request is checked as usual. One with a valid key is let through whatever
  the locks, so an attacker can neither lock a key's holder out by guessing its id nor
  lock out the clients sharing an address with it (a NAT, a TLS-terminating proxy). A
  failure that proves the secret (revoked, expired, tenant disabled; a JWT whose signature
  verified but that is expired, for another audience, without a tenant, ...) keeps its own
  401. Any other failure is answered 429 if its address or its key id was locked out
  before it. A JWT is checked whatever the locks (only its signature tells whether it is
  valid) and counts for its address only: it names no key id.

So the throttle only ever turns a 401 into a 429 (and spares the work of one that cannot
succeed): the holder of the right secret sees no difference. Each lock-out is reported
once, when it starts (``auth.throttled``), through the authenticator's flood-proof report.
The tables are bounded; they are used from the event loop only.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from bastion.audit.events import AUTH_THROTTLED, Event
from bastion.errors import AuthenticationError, AuthThrottled, ConfigurationError, TokenRejected
from bastion.gateway.auth import PROVEN_SECRET_REASONS, REASON_BAD_SECRET

if TYPE_CHECKING:
    from bastion.config import Settings
    from bastion.gateway.auth import Authenticator

_C = TypeVar("_C")

# The scopes of a lock-out, as events and metrics label them.
SCOPE_ADDRESS = "address"
SCOPE_KEY = "key"

# The address bucket of a connection without a peer address (a unix socket).
NO_ADDRESS = "unknown"

# Entries each table holds at most; beyond it, the history of the least recent failure
# goes first.
MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """When failures start a lock-out, and how long it lasts (see the module docstring).
    Zero `failures` turns the throttle off."""

    failures: int = 10
    window_s: float = 60.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 900.0
    max_entries: int = MAX_ENTRIES

    def __post_init__(self) -> None:
        if (
            self.failures < 0
            or self.window_s <= 0
            or self.backoff_initial_s <= 0
            or self.backoff_max_s < self.backoff_initial_s
            or self.max_entries < 1
        ):
            raise ConfigurationError(
                "The authentication throttle needs BASTION_AUTH_THROTTLE_FAILURES >= 0, "
                "a positive BASTION_AUTH_THROTTLE_WINDOW_S and BASTION_AUTH_THROTTLE_"
                "BACKOFF_INITIAL_S, and BASTION_AUTH_THROTTLE_BACKOFF_MAX_S no smaller."
            )

    @classmethod
    def of(cls, settings: Settings) -> ThrottlePolicy:
        return cls(
            failures=settings.auth_throttle_failures,
            window_s=settings.auth_throttle_window_s,
            backoff_initial_s=settings.auth_throttle_backoff_initial_s,
            backoff_max_s=settings.auth_throttle_backoff_max_s,
        )

    @property
    def enabled(self) -> bool:
        return self.failures > 0

    def backoff_s(self, beyond: int) -> float:
        """The lock-out after `beyond` failures past the threshold (0: the first)."""
        # The exponent is capped: a long flood must not overflow the float.
        return min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** min(beyond, 64))


@dataclass(frozen=True, slots=True)
class Strike:
    """What one failure did to its history."""

    failures: int
    # How long the history is locked out from now on (0: it is not).
    retry_after_s: float
    # This failure started the lock-out (it was not locked out before).
    started: bool

    @property
    def refused(self) -> bool:
        """The history was locked out before this failure: it is answered 429."""
        return self.retry_after_s > 0 and not self.started


@dataclass(slots=True)
class _History:
    failures: int
    # When the current count began (below the threshold, only one window's failures add up).
    since: float
    # When the lock-out ends (0: never locked out).
    until: float


class FailureThrottle:
    """Failures and lock-outs by a key (an address bucket, a key id), in a bounded table.

    The clock is injectable (monotonic by default: lock-outs must not move with the wall
    clock)."""

    def __init__(self, policy: ThrottlePolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        # Ordered by last failure, least recent first: what goes when the table is full.
        self._table: dict[str, _History] = {}

    def __len__(self) -> int:
        return len(self._table)

    def retry_after(self, key: str) -> float:
        """Seconds left of `key`'s lock-out (0 if it is not locked out)."""
        history = self._table.get(key)
        if history is None:
            return 0.0
        left = history.until - self._clock()
        return left if left > 0 else 0.0

    def fail(self, key: str) -> Strike:
        """Count one failure of `key`; what it did to its lock-out."""
        policy = self.policy
        now = self._clock()
        history = self._table.pop(key, None)
        if history is not None and (
            now >= history.until + policy.window_s
            if history.until
            else now - history.since >= policy.window_s
        ):
            history = None  # forgotten: a quiet window after its lock-out, or its count
        if history is None:
            history = _History(failures=0, since=now, until=0.0)
        locked = now < history.until
        history.failures += 1
        started = False
        if history.failures >= policy.failures:
            backoff = policy.backoff_s(history.failures - policy.failures)
            history.until = max(history.until, now + backoff)
            started = not locked
        table = self._table
        while len(table) >= policy.max_entries:
            del table[next(iter(table))]
        table[key] = history
        left = history.until - now
        return Strike(history.failures, left if left > 0 else 0.0, started)


def _proves_credential(exc: AuthenticationError) -> bool:
    """Whether the failure could only be met with the right credential: a key's right
    secret, or a JWT the provider signed."""
    if isinstance(exc, TokenRejected):
        return exc.signed
    return exc.reason in PROVEN_SECRET_REASONS


def address_bucket(client: Sequence[object] | None) -> str:
    """The throttle's name for a connection's peer (the ASGI scope's ``client``): an IPv4
    address as it is, an IPv6 address by its /64 (an IPv4-mapped one as IPv4)."""
    host = client[0] if client else None
    if not isinstance(host, str) or not host:
        return NO_ADDRESS
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    mapped = address.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


class AuthThrottle:
    """The request path's throttle of failed authentication (see the module docstring):
    one per server, whatever its listeners, beside its :class:`Authenticator`."""

    def __init__(
        self,
        policy: ThrottlePolicy,
        authenticator: Authenticator,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._authenticator = authenticator
        self.addresses = FailureThrottle(policy, clock)
        self.keys = FailureThrottle(policy, clock)

    async def authenticate(
        self,
        check: Callable[[str | None], Awaitable[_C]],
        authorization: str | None,
        client: Sequence[object] | None,
    ) -> _C:
        """`check(authorization)` (the pipeline's authentication) for a request from
        `client`, throttled: AuthThrottled (429) for a failure during a lock-out."""
        if not self.policy.enabled:
            return await check(authorization)
        bucket = None
        # No history at all is the usual case: then the address is not even worked out.
        if self.addresses:
            bucket = address_bucket(client)
            if self.addresses.retry_after(bucket) and not self._authenticator.may_authenticate(
                authorization
            ):
                # Nothing here could prove a key: refused unchecked, and counted.
                wait = self._strike(bucket, None)
                raise AuthThrottled(retry_after_s=math.ceil(max(wait, 1.0)))
        try:
            return await check(authorization)
        except AuthenticationError as exc:
            if _proves_credential(exc):
                # The right secret, of a key that cannot be used: its holder's own answer.
                raise
            key_id = exc.key_id if exc.reason == REASON_BAD_SECRET else None
            wait = self._strike(bucket or address_bucket(client), key_id)
            if wait:
                # `from None`: the 401 it replaces stays out of any traceback.
                raise AuthThrottled(retry_after_s=math.ceil(wait)) from None
            raise

    def _strike(self, bucket: str, key_id: str | None) -> float:
        """Count a failure from `bucket` (with a wrong secret for `key_id`); how long it
        must be refused for (0: answered as the failure it is)."""
        strike = self.addresses.fail(bucket)
        if strike.started:
            self._report(SCOPE_ADDRESS, strike, target=bucket)
        wait = strike.retry_after_s if strike.refused else 0.0
        if key_id is not None:
            strike = self.keys.fail(key_id)
            if strike.started:
                self._report(SCOPE_KEY, strike, actor=key_id)
            if strike.refused:
                wait = max(wait, strike.retry_after_s)
        return wait

    def _report(
        self, scope: str, strike: Strike, *, actor: str | None = None, target: str | None = None
    ) -> None:
        self._authenticator.report_throttle(
            Event(
                kind=AUTH_THROTTLED,
                outcome="failure",
                actor=actor,
                target=target,
                detail={
                    "scope": scope,
                    "failures": strike.failures,
                    "retry_after_s": math.ceil(strike.retry_after_s),
                },
            )
        )
