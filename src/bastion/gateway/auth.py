"""The gateway's first step: turn an ``Authorization`` header into a Principal, or a 401.

Key records are cached in memory by public id, so the usual request costs one dict lookup,
one HMAC and one constant-time compare, with no database access. The set of every key id
is kept in memory too, reloaded with the revision: an id that is not in it is refused
without a query. (Only a few such ids a second are looked up anyway, for a key created by
another process since the last reload.) A cache miss for a known id reads the database
once. :meth:`Authenticator.refresh` drops every cached record when the database's change
revision moves, which is how a key revoked by another process (the CLI) stops working
within the refresh interval.

With single sign-on (gateway/sso.py), a ``Bearer`` token with a JWT's shape goes to the
:class:`~bastion.identity.jwt.JwtVerifier` instead: a token verified recently is answered
from its memory, any other is verified in a thread (it may fetch the provider's keys and
reads the tenant), as a key's cache miss is. Its caches are dropped with the revision too,
so a disabled tenant's tokens stop working within the refresh interval.

Failures are events (``auth.failed``), but a flood of them is not a flood of log lines: at
most :data:`FAILURES_LOGGED_PER_WINDOW` a window are emitted one by one, and the rest as one
event per reason with their count when the window ends. The lock-outs of the throttle of
failed attempts (``auth.throttled``, gateway/auth_throttle.py) are reported the same way.
The alert rules, given apart (`alerts`), see every one of them as it happens: a summary
names no key id, and the rules count in memory, bounded, whatever the flood.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, TypeVar

import sqlalchemy as sa

from bastion.audit.events import AUTH_FAILED, Event, EventSink
from bastion.errors import AuthenticationError, TokenRejected
from bastion.gateway.sso import jwt_of, looks_like_jwt
from bastion.identity.jwt import JwtVerifier
from bastion.identity.keys import KeyHasher, parse_api_key
from bastion.identity.principal import Principal
from bastion.store.db import Database
from bastion.store.tables import api_keys, tenants

if TYPE_CHECKING:
    from bastion.gateway.auth_throttle import AuthThrottle

_V = TypeVar("_V")

# Longer headers are refused before any parsing; a token is 73 characters. (A JWT may be
# longer: gateway/sso.py's MAX_JWT_AUTHORIZATION_LENGTH.)
MAX_AUTHORIZATION_LENGTH = 256

REASON_MISSING = "missing"
REASON_MALFORMED = "malformed"
REASON_UNKNOWN_KEY = "unknown_key"
REASON_BAD_SECRET = "bad_secret"  # noqa: S105 (a reason code, not a secret)
REASON_REVOKED = "revoked"
REASON_EXPIRED = "expired"
REASON_TENANT_DISABLED = "tenant_disabled"
# Refused unchecked during a lock-out of its address (gateway/auth_throttle.py).
REASON_THROTTLED = "throttled"
# Failures only the right secret can meet: not guesses, so never throttled.
PROVEN_SECRET_REASONS = frozenset({REASON_REVOKED, REASON_EXPIRED, REASON_TENANT_DISABLED})

# Failures emitted one by one per window; the rest are counted and emitted as one event.
FAILURES_LOGGED_PER_WINDOW = 20
FAILURE_WINDOW_S = 10.0
# Ids missing from the in-memory id set that may still be looked up (new keys), per second.
UNLISTED_LOOKUPS_PER_S = 5.0

# Messages for failures that only a caller holding the right secret can see; every other
# failure gets the generic message, so guessing reveals nothing.
_MESSAGES = {
    REASON_REVOKED: "This API key has been revoked.",
    REASON_EXPIRED: "This API key has expired.",
    REASON_TENANT_DISABLED: "This API key's tenant is disabled.",
}


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    """What authentication needs to know about one key, as read from the database."""

    digest: bytes
    principal: Principal
    expires_at: float | None
    revoked: bool
    tenant_disabled: bool


class NeedsRead(Exception):
    """Raised by ``authenticate(..., may_read=False)`` when only the database can answer."""


class Authenticator:
    """Checks bearer tokens against the key store, through an in-memory cache."""

    def __init__(
        self,
        db: Database,
        hasher: KeyHasher,
        events: EventSink,
        clock: Callable[[], float] = time.time,
        *,
        negative_ttl_s: float = 5.0,
        max_cached_keys: int = 100_000,
        max_unknown_ids: int = 10_000,
        tokens: JwtVerifier | None = None,
        alerts: EventSink | None = None,
    ) -> None:
        self._db = db
        self._hasher = hasher
        self._events = events
        self._clock = clock
        self._negative_ttl_s = negative_ttl_s
        self._max_cached_keys = max_cached_keys
        self._max_unknown_ids = max_unknown_ids
        self._keys: dict[str, _KeyRecord] = {}
        # Public id -> time until which it is known not to exist.
        self._unknown: dict[str, float] = {}
        self._revision: int | None = None
        # Bumped on every cache reset; a database read that started under an older
        # generation may be stale and is not cached.
        self._generation = 0
        # Every key id, as of the last refresh (None until the first).
        self._ids: frozenset[str] | None = None
        self._lookups = _Allowance(UNLISTED_LOOKUPS_PER_S)
        # JWT bearer tokens of the single sign-on provider (None: API keys only).
        self._tokens = tokens
        # `events` get failures and lock-outs rate-limited; `alerts` (the alert rules, when
        # `events` does not lead to them) get every one.
        self._failures = FailureReports(events, clock, alerts=alerts)
        # Lock-outs get a budget of their own: a flood of failures must not hide them.
        self._lockouts = FailureReports(events, clock, group="scope", alerts=alerts)
        # The throttle of failed attempts on the request path: one per server, shared by
        # its listeners (set where the server is wired, api/fast.py).
        self.throttle: AuthThrottle | None = None

    def authenticate(self, authorization: str | None, *, may_read: bool = True) -> Principal:
        """The principal of a ``Bearer <token>`` header; AuthenticationError otherwise.

        With `may_read` false, NeedsRead instead of a database read: the event loop answers
        from memory and hands only a cache miss to a thread."""
        if authorization is None:
            self._fail(REASON_MISSING)
        if self._tokens is not None:
            bearer = jwt_of(authorization)
            if bearer is not None:
                return self._authenticate_jwt(self._tokens, bearer, may_read)
        token = _token_of(authorization)
        if token is None:
            self._fail(REASON_MALFORMED)
        public_id, secret = token

        record = self._keys.get(public_id)
        if record is None:
            ids = self._ids
            if ids is not None and public_id not in ids and not self._lookups.take():
                # Not a key as of the last reload, and no lookups left this second: a
                # flood of made-up ids costs the database nothing.
                self._fail(REASON_UNKNOWN_KEY, public_id)
            if not may_read and not self._known_unknown(public_id):
                raise NeedsRead
            record = self._load(public_id)
            if record is None:
                self._fail(REASON_UNKNOWN_KEY, public_id)
        try:
            self._hasher.verify(public_id, secret, record.digest)
        except AuthenticationError:
            self._fail(REASON_BAD_SECRET, public_id)
        principal = record.principal
        if record.revoked:
            self._fail(REASON_REVOKED, public_id, principal.tenant_name)
        if record.expires_at is not None and self._clock() >= record.expires_at:
            self._fail(REASON_EXPIRED, public_id, principal.tenant_name)
        if record.tenant_disabled:
            self._fail(REASON_TENANT_DISABLED, public_id, principal.tenant_name)
        return principal

    def may_authenticate(self, authorization: str | None) -> bool:
        """Whether checking this header could authenticate anyone, as far as memory tells
        without a check: False only for what cannot (no header, a malformed token, a key id
        that does not exist, before the first refresh any id may; with single sign-on, a
        JWT whose header names an algorithm not allowed or a key the provider's key set
        cannot provide). The throttle of failed attempts refuses those unchecked during a
        lock-out and checks the rest, so every kind of credential this class accepts must
        answer True here when it may be valid."""
        if authorization is None:
            return False
        if self._tokens is not None:
            bearer = jwt_of(authorization)
            if bearer is not None:
                # Its header, read here (no thread, no signature): an allowed algorithm
                # and a key id the provider's key set may hold.
                return looks_like_jwt(bearer) and self._tokens.may_verify(bearer)
        token = _token_of(authorization)
        if token is None:
            return False
        public_id = token[0]
        ids = self._ids
        return ids is None or public_id in ids or public_id in self._keys

    def report_throttle(self, event: Event) -> None:
        """Report a lock-out of the throttle of failed attempts: one by one up to a number
        per window, then counted, as failures are."""
        self._lockouts.report(event)

    def report_refused(self) -> None:
        """Report a request that the throttle refused unchecked during a lock-out (what
        :meth:`may_authenticate` found could not authenticate): a failure like any other,
        with the reason ``throttled``; nothing of its credential is known or recorded."""
        self._report(REASON_THROTTLED)

    def refresh(self) -> bool:
        """Drop the caches and reload the key ids if the database changed since the last
        call; True if it did. (Blocking: call it from a thread.)"""
        revision = self._db.revision()
        if revision == self._revision:
            return False
        with self._db.read() as conn:
            ids = frozenset(conn.execute(sa.select(api_keys.c.id)).scalars())
        self.invalidate()
        self._ids = ids
        self._revision = revision
        return True

    def flush_failures(self) -> None:
        """Emit the counts of failures (and lock-outs) held back in a window that has ended."""
        self._failures.flush()
        self._lockouts.flush()

    def invalidate(self) -> None:
        """Forget every cached record (the next request per key reads the database), and
        every verified JWT (the next request per token verifies it again)."""
        self._generation += 1
        # New dicts rather than clear(): a request thread may be using the old ones.
        self._keys = {}
        self._unknown = {}
        if self._tokens is not None:
            self._tokens.invalidate()

    # ------------------------------------------------------------------ internals

    def _authenticate_jwt(self, verifier: JwtVerifier, token: str, may_read: bool) -> Principal:
        """The principal of a JWT bearer token: from memory if it was verified recently,
        else (NeedsRead without `may_read`) verified, which may fetch the provider's keys."""
        principal = verifier.cached(token)
        if principal is not None:
            return principal
        if not looks_like_jwt(token):
            self._fail(REASON_MALFORMED)
        if not may_read:
            raise NeedsRead
        try:
            return verifier.verify(token)
        except TokenRejected as exc:
            # Neither the token nor its unverified claims go into the event: the reason
            # code, and that it was a JWT, are what is known. (key_id stays None: the
            # throttle counts the failure for the client's address only.)
            self._report(exc.reason or REASON_MALFORMED, credential="jwt")
            raise

    def _known_unknown(self, public_id: str) -> bool:
        """Whether `public_id` is remembered, still, as no key at all."""
        until = self._unknown.get(public_id)
        return until is not None and time.monotonic() < until

    def _load(self, public_id: str) -> _KeyRecord | None:
        """Read one key on a cache miss, remembering the answer (found or not)."""
        now = time.monotonic()
        unknown = self._unknown
        until = unknown.get(public_id)
        if until is not None:
            if now < until:
                return None
            unknown.pop(public_id, None)
        generation = self._generation
        record = self._read(public_id)
        if generation != self._generation:
            return record  # the caches were reset meanwhile: use it, but do not keep it
        if record is None:
            _bounded_put(
                self._unknown, public_id, now + self._negative_ttl_s, self._max_unknown_ids
            )
        else:
            _bounded_put(self._keys, public_id, record, self._max_cached_keys)
        return record

    def _read(self, public_id: str) -> _KeyRecord | None:
        query = (
            sa.select(
                api_keys.c.digest,
                api_keys.c.tenant_id,
                api_keys.c.role,
                api_keys.c.models,
                api_keys.c.actions,
                api_keys.c.expires_at,
                api_keys.c.revoked_at,
                tenants.c.name.label("tenant_name"),
                tenants.c.disabled.label("tenant_disabled"),
            )
            .join(tenants, tenants.c.id == api_keys.c.tenant_id)
            .where(api_keys.c.id == public_id)
        )
        with self._db.read() as conn:
            row = conn.execute(query).mappings().one_or_none()
        if row is None:
            return None
        expires_at = row["expires_at"]
        principal = Principal(
            key_id=public_id,
            tenant_id=row["tenant_id"],
            tenant_name=row["tenant_name"],
            role=row["role"],
            models=tuple(row["models"]),
            actions=frozenset(row["actions"]),
            expires_at=expires_at,
        )
        return _KeyRecord(
            digest=bytes(row["digest"]),
            principal=principal,
            expires_at=expires_at.timestamp() if expires_at is not None else None,
            revoked=row["revoked_at"] is not None,
            tenant_disabled=bool(row["tenant_disabled"]),
        )

    def _fail(
        self, reason: str, public_id: str | None = None, tenant: str | None = None
    ) -> NoReturn:
        # Only the public id (when well-formed) is recorded: never the header or secret.
        self._report(reason, public_id, tenant)
        message = _MESSAGES.get(reason)
        error = AuthenticationError(message) if message else AuthenticationError()
        # For the throttle of failed attempts; never shown to the client.
        error.reason, error.key_id = reason, public_id
        # `from None`: the chained cause could hold the token in a traceback's locals.
        raise error from None

    def _report(
        self, reason: str, public_id: str | None = None, tenant: str | None = None, **more: str
    ) -> None:
        """One ``auth.failed`` event (or one more count of a flood's)."""
        self._failures.report(
            Event(
                kind=AUTH_FAILED,
                outcome="failure",
                actor=public_id,
                tenant=tenant,
                detail={"reason": reason, **more},
                at=self._clock(),
            )
        )


class FailureReports:
    """Emits failure events one by one up to a number per window, then counts them: one
    event per kind and value of their `group` detail when the window ends.

    `alerts`, if given, gets every event one by one, never a count: the alert rules,
    which count in memory (bounded) and must see a targeted key id inside a flood. It
    must not also be behind `events`, or the rules would count the events twice."""

    def __init__(
        self,
        events: EventSink,
        clock: Callable[[], float],
        *,
        per_window: int = FAILURES_LOGGED_PER_WINDOW,
        window_s: float = FAILURE_WINDOW_S,
        group: str = "reason",
        alerts: EventSink | None = None,
    ) -> None:
        self._events = events
        self._alerts = alerts
        self._clock = clock
        self._per_window = per_window
        self._window_s = window_s
        self._group = group
        self._window_start = clock()
        self._emitted = 0
        self._held: dict[tuple[str, str], int] = {}
        # Failures come from the event loop and, for keys read from the database, from
        # the threads that read them.
        self._lock = threading.Lock()

    def report(self, event: Event) -> None:
        if self._alerts is not None:
            self._alerts.emit(event)
        self.flush()
        with self._lock:
            emit = self._emitted < self._per_window
            if emit:
                self._emitted += 1
            else:
                held = (event.kind, str(event.detail.get(self._group)))
                self._held[held] = self._held.get(held, 0) + 1
        if emit:
            self._events.emit(event)

    def flush(self) -> None:
        """If the window has ended: one event per reason held back, and a new window."""
        now = self._clock()
        with self._lock:
            if now - self._window_start < self._window_s:
                return
            held, self._held = self._held, {}
            self._window_start, self._emitted = now, 0
        for (kind, value), count in sorted(held.items()):
            self._events.emit(
                Event(
                    kind=kind,
                    outcome="failure",
                    detail={self._group: value, "count": count, "window_s": self._window_s},
                    at=now,
                )
            )


class _Allowance:
    """A small token bucket (monotonic clock): `rate` a second, as many at once."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._level = rate
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._level = min(self._rate, self._level + (now - self._at) * self._rate)
        self._at = now
        if self._level >= 1:
            self._level -= 1
            return True
        return False


def _token_of(authorization: str) -> tuple[str, str] | None:
    """(public id, secret) of a ``Bearer <token>`` header; None if it is malformed.

    The length is checked before anything else, so oversized input costs nothing."""
    if len(authorization) > MAX_AUTHORIZATION_LENGTH:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    try:
        return parse_api_key(token.strip())
    except AuthenticationError:
        return None


def _bounded_put(table: dict[str, _V], key: str, value: _V, limit: int) -> None:
    """Insert, evicting the oldest entries first once the table holds `limit` entries."""
    while len(table) >= limit:
        try:
            del table[next(iter(table))]
        except (StopIteration, KeyError, RuntimeError):
            break
    table[key] = value
