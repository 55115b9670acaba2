"""Throttling of failed authentication: per client address and per key id, with exponential
back-off, never refusing a valid key.

Failures are counted in two tables (:class:`FailureThrottle`):

- per **client address**: the TCP peer of the connection (the server reads no proxy
  headers, so a client cannot choose it), an IPv6 address by its /64 (a host usually holds
  a whole /64 and could otherwise take a fresh address per attempt), and also by its /48
  with :data:`NETWORK_FACTOR` times the threshold (a site's allocation: a /56 holds 256
  /64s). Every failure that does not prove the key's secret counts: no key, a malformed
  one, an unknown id, a wrong secret, a JWT refused before its signature verified or one
  signed for another issuer or audience (with single sign-on).
- per **key id**: wrong secrets for a key that exists, from any address (a guesser spread
  over many addresses).

``failures`` failures within ``window_s`` start a lock-out of ``backoff_initial_s``; each
further failure (a refused attempt included) doubles it, up to ``backoff_max_s``. A history
is forgotten once its lock-out has ended and ``window_s`` has passed without a failure.
A full table never gives up a history that is locked out (see :class:`FailureThrottle`).

During a lock-out, failures are answered 429 with ``Retry-After`` instead of 401; what a
request costs and whether it can still succeed is decided by what it could prove:

- a request from a locked-out address that cannot authenticate, as far as memory tells
  (no header, a malformed token, an id not in the authenticator's in-memory set, a JWT
  whose header names an algorithm not allowed or a key the provider's cached key set
  lacks) is refused at once and nothing is checked: no HMAC, no database read, no thread.
  It is reported as a failure (``auth.failed``, reason ``throttled``) all the same;
- every other request is checked as usual. One with a valid key is let through whatever
  the locks, so an attacker can neither lock a key's holder out by guessing its id nor
  lock out the clients sharing an address with it (a NAT, a TLS-terminating proxy). A
  failure that proves the secret (revoked, expired, tenant disabled; a JWT the provider
  signed for this issuer and audience that is expired, not yet valid, or whose tenant is
  unknown or disabled) keeps its own 401. Any other failure is answered 429 if its
  address or its key id was locked out before it. A JWT counts for its address only: it
  names no key id.

So the throttle only ever turns a 401 into a 429 (and spares the work of one that cannot
succeed): the holder of the right secret sees no difference. Each lock-out is reported
once, when it starts (``auth.throttled``), through the authenticator's flood-proof report.
The tables are bounded; they are used from the event loop only.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

from bastion.audit.events import AUTH_THROTTLED, Event
from bastion.errors import AuthenticationError, AuthThrottled, ConfigurationError, TokenRejected
from bastion.gateway.auth import PROVEN_SECRET_REASONS, REASON_BAD_SECRET
from bastion.identity.jwt import SIGNED_UNUSABLE_REASONS

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
# that is not locked out goes first.
MAX_ENTRIES = 100_000
# How many more failures an IPv6 /48 may have than one /64 before it is locked out: room
# for the honest hosts of a site, none for a /56's 256 /64s taking turns.
NETWORK_FACTOR = 8
NETWORK_PREFIX = 48
# Histories a full table looks at, oldest first, for one that is not locked out.
_EVICTION_SCAN = 64


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

    A full table makes room by forgetting the history of the least recent failure that is
    not locked out: failing from ever new addresses cannot free a lock-out. When every
    history it looks at is locked out (:data:`_EVICTION_SCAN`), a failure of a new key is
    not recorded and is refused as if locked out (:attr:`full` counts them): the throttle
    refuses only failures, never a valid key, so this is safe, where recording nothing
    and answering 401 would let a large botnet out of the throttle.

    The clock is injectable (monotonic by default: lock-outs must not move with the wall
    clock)."""

    def __init__(self, policy: ThrottlePolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        # Ordered by last failure, least recent first (a locked-out history passed over
        # when making room goes to the back): what goes when the table is full.
        self._table: dict[str, _History] = {}
        #: Failures of new keys refused unrecorded, the table being full of lock-outs.
        self.full = 0

    def __len__(self) -> int:
        return len(self._table)

    def retry_after(self, key: str) -> float:
        """Seconds left of `key`'s lock-out (0 if it is not locked out)."""
        history = self._table.get(key)
        if history is None:
            return 0.0
        return _seconds_left(history.until, self._clock())

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
            if len(self._table) >= policy.max_entries and not self._make_room(now):
                self.full += 1
                return Strike(1, policy.backoff_initial_s, started=False)
            history = _History(failures=0, since=now, until=0.0)
        locked = now < history.until
        history.failures += 1
        started = False
        if history.failures >= policy.failures:
            backoff = policy.backoff_s(history.failures - policy.failures)
            history.until = max(history.until, now + backoff)
            started = not locked
        self._table[key] = history
        return Strike(history.failures, _seconds_left(history.until, now), started)

    def _make_room(self, now: float) -> bool:
        """Forget the oldest history that is not locked out; False if none was found among
        the oldest few (those locked out go to the back, so the next search starts past
        them: the cost per failure stays bounded however many are locked out)."""
        table = self._table
        for key in list(itertools.islice(table, _EVICTION_SCAN)):
            history = table.pop(key)
            if now >= history.until:
                return True
            table[key] = history
        return False


def _seconds_left(until: float, now: float) -> float:
    """`until - now`, at least 0, to the microsecond: (now + 600) - now may come out as
    600.0000000000002, which a Retry-After rounded up would turn into 601, past the cap."""
    left = round(until - now, 6)
    return left if left > 0 else 0.0


def _proves_credential(exc: AuthenticationError) -> bool:
    """Whether the failure could only be met with the right credential: a key's right
    secret, or a JWT the provider signed for this issuer and audience that cannot be used
    for its time or its tenant. (A token for another issuer or audience is signed too, but
    anyone can get one of those from a provider that serves other applications.)"""
    if isinstance(exc, TokenRejected):
        return exc.signed and exc.reason in SIGNED_UNUSABLE_REASONS
    return exc.reason in PROVEN_SECRET_REASONS


def address_bucket(client: Sequence[object] | None) -> str:
    """The throttle's name for a connection's peer (the ASGI scope's ``client``): an IPv4
    address as it is, an IPv6 address by its /64 (an IPv4-mapped one as IPv4)."""
    return address_buckets(client)[0]


def address_buckets(client: Sequence[object] | None) -> tuple[str, str | None]:
    """The peer's :func:`address_bucket`, and for an IPv6 address its /48 (else None)."""
    host = client[0] if client else None
    if not isinstance(host, str) or not host:
        return NO_ADDRESS, None
    if ":" not in host:
        return host, None
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return host, None
    mapped = address.ipv4_mapped
    if mapped is not None:
        return str(mapped), None
    return _prefix(address, 64), _prefix(address, NETWORK_PREFIX)


def _prefix(address: ipaddress.IPv6Address, bits: int) -> str:
    host_bits = 128 - bits
    return str(ipaddress.IPv6Network((int(address) >> host_bits << host_bits, bits)))


class AuthThrottle:
    """The request path's throttle of failed authentication (see the module docstring):
    one per server, whatever its listeners, beside its :class:`Authenticator`."""

    def __init__(
        self,
        policy: ThrottlePolicy,
        authenticator: Authenticator,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.policy = policy
        self._authenticator = authenticator
        # Called for each request refused unchecked (the metric of failed sign-ins: such
        # a request never reaches the check that counts the others).
        self._on_refused = on_refused
        self.addresses = FailureThrottle(policy, clock)
        # IPv6 /48s, each with NETWORK_FACTOR times the failures of one /64.
        self.networks = FailureThrottle(
            replace(policy, failures=policy.failures * NETWORK_FACTOR), clock
        )
        self.keys = FailureThrottle(policy, clock)

    async def authenticate(
        self,
        check: Callable[[str | None], Awaitable[_C]],
        authorization: str | None,
        client: Sequence[object] | None,
    ) -> _C:
        """`check(authorization)` (the pipeline's authentication) for a request from
        `client`, throttled: AuthThrottled (429) for a failure during a lock-out."""
        self.before(authorization, client)
        try:
            return await check(authorization)
        except AuthenticationError as exc:
            self.failed(exc, client)
            raise

    def before(self, authorization: str | None, client: Sequence[object] | None) -> None:
        """Before checking a request's credential: AuthThrottled if its address is locked
        out and nothing in it could prove a credential (refused unchecked, and counted).
        The request path calls this and :meth:`failed` itself (no coroutine layer)."""
        # No history at all is the usual case: then the address is not even worked out.
        if not self.policy.enabled or not (self.addresses or self.networks):
            return
        buckets = address_buckets(client)
        if self._locked_out(*buckets) and not self._authenticator.may_authenticate(authorization):
            wait = self._strike(*buckets, None)
            self._authenticator.report_refused()
            if self._on_refused is not None:
                self._on_refused()
            raise AuthThrottled(retry_after_s=math.ceil(max(wait, 1.0)))

    def failed(self, exc: AuthenticationError, client: Sequence[object] | None) -> None:
        """After a credential failed: AuthThrottled (from None, so the 401 it replaces
        stays out of any traceback) when this failure starts or extends a lock-out;
        otherwise nothing, and the caller raises the failure as it is."""
        if not self.policy.enabled or _proves_credential(exc):
            # The right secret, of a key that cannot be used: its holder's own answer.
            return
        key_id = exc.key_id if exc.reason == REASON_BAD_SECRET else None
        wait = self._strike(*address_buckets(client), key_id)
        if wait:
            raise AuthThrottled(retry_after_s=math.ceil(wait)) from None

    def _locked_out(self, bucket: str, network: str | None) -> bool:
        if self.addresses.retry_after(bucket):
            return True
        return network is not None and bool(self.networks.retry_after(network))

    def _strike(self, bucket: str, network: str | None, key_id: str | None) -> float:
        """Count a failure from `bucket` in `network` (an IPv6 /48, or None), with a wrong
        secret for `key_id`; how long it must be refused for (0: answered as the failure
        it is)."""
        strike = self.addresses.fail(bucket)
        if strike.started:
            self._report(SCOPE_ADDRESS, strike, target=bucket)
        wait = strike.retry_after_s if strike.refused else 0.0
        if network is not None:
            strike = self.networks.fail(network)
            if strike.started:
                self._report(SCOPE_ADDRESS, strike, target=network)
            if strike.refused:
                wait = max(wait, strike.retry_after_s)
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
