"""The console's sessions and its sign-ins in progress, kept in the server's memory.

A session is found by the value of the browser's session cookie: 32 random bytes, of
which only the SHA-256 is kept here, so that neither a listing of the sessions nor a
memory dump hands out a usable cookie. A session ends after `idle_s` without a request and
`max_age_s` after its sign-in, whatever happens; the console also ends it when its
credential stops working (revoked key, disabled tenant) or when an admin ends it.

Nothing is written to disk: a restart of the server signs everyone out. Both tables are
bounded (the least recently used entries go first), and are used from the event loop only.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from bastion.identity.oidc import AuthorizationRequest
from bastion.identity.principal import Principal

# How a session was signed in.
BY_KEY = "key"
BY_SSO = "sso"

MAX_SESSIONS = 10_000
# Sign-ins through the provider that have started but not come back yet.
MAX_PENDING = 1_000
PENDING_TTL_S = 600.0

_V = TypeVar("_V")


def cookie_digest(value: str) -> str:
    """What the tables are keyed by: the SHA-256 of a cookie's value, in hex."""
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()


@dataclass(slots=True)
class Session:
    """One signed-in browser. `principal` is the one its credential gave at the last
    request (re-read on every request); `csrf` the token its forms carry."""

    digest: str
    principal: Principal
    method: str
    csrf: str
    created_at: float
    seen_at: float
    # Messages for the next page shown: (level, text), level "ok" or "error".
    flashes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def short_id(self) -> str:
        """A name for the session in lists and audit records (not its cookie)."""
        return self.digest[:12]

    def flash(self, level: str, text: str) -> None:
        self.flashes = [*self.flashes[-4:], (level, text)]

    def take_flashes(self) -> list[tuple[str, str]]:
        flashes, self.flashes = self.flashes, []
        return flashes


class _Bounded(Generic[_V]):
    """A table that forgets its least recently used entry beyond `limit`."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._entries: OrderedDict[str, _V] = OrderedDict()

    def put(self, key: str, value: _V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def touch(self, key: str) -> _V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def pop(self, key: str) -> _V | None:
        return self._entries.pop(key, None)

    def values(self) -> list[_V]:
        return list(self._entries.values())


class SessionStore:
    """The signed-in sessions, with their idle and absolute timeouts."""

    def __init__(
        self,
        *,
        idle_s: float,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
        limit: int = MAX_SESSIONS,
    ) -> None:
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._clock = clock
        self._sessions: _Bounded[Session] = _Bounded(limit)
        # Why sessions ended lately (by the digest of their cookie), for the sign-in page.
        self._ended: _Bounded[str] = _Bounded(limit)

    def create(self, principal: Principal, method: str) -> tuple[str, Session]:
        """A new session: the cookie value to hand the browser (once), and the session."""
        value = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(
            digest=cookie_digest(value),
            principal=principal,
            method=method,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            seen_at=now,
        )
        self._sessions.put(session.digest, session)
        return value, session

    def find(self, value: str | None) -> Session | None:
        """The live session of a cookie's value, its idle clock restarted; None when
        there is none, or it timed out (then it is gone)."""
        if not value:
            return None
        digest = cookie_digest(value)
        session = self._sessions.touch(digest)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen_at > self.idle_s or now - session.created_at > self.max_age_s:
            self._sessions.pop(digest)
            return None
        session.seen_at = now
        return session

    def end(self, session: Session, reason: str) -> None:
        """End `session`; its browser's next request is told `reason`."""
        self._sessions.pop(session.digest)
        self._ended.put(session.digest, reason)

    def end_where(self, ended: Callable[[Session], bool], reason: str) -> list[Session]:
        """End every session for which `ended` holds; returns them."""
        gone = [s for s in self._sessions.values() if ended(s)]
        for session in gone:
            self.end(session, reason)
        return gone

    def why_ended(self, value: str | None) -> str | None:
        """Why the session of a cookie's value was ended, if it was, lately."""
        return self._ended.pop(cookie_digest(value)) if value else None

    def active(self) -> list[Session]:
        """The sessions that have not timed out, the most recently seen first."""
        now = self._clock()
        live = [
            s
            for s in self._sessions.values()
            if now - s.seen_at <= self.idle_s and now - s.created_at <= self.max_age_s
        ]
        return sorted(live, key=lambda s: s.seen_at, reverse=True)


class PendingSignIns:
    """Sign-ins sent to the identity provider, each kept under a random value that only
    the browser that started it holds (a cookie), for at most `ttl_s`."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        ttl_s: float = PENDING_TTL_S,
        limit: int = MAX_PENDING,
    ) -> None:
        self._clock = clock
        self._ttl_s = ttl_s
        self._pending: _Bounded[tuple[float, AuthorizationRequest]] = _Bounded(limit)

    def add(self, request: AuthorizationRequest) -> str:
        """Keep `request`; returns the value the browser's binding cookie carries."""
        value = secrets.token_urlsafe(32)
        self._pending.put(cookie_digest(value), (self._clock(), request))
        return value

    def take(self, value: str | None) -> AuthorizationRequest | None:
        """The request started by the holder of `value`, once; None if there is none or
        it is too old."""
        if not value:
            return None
        found = self._pending.pop(cookie_digest(value))
        if found is None:
            return None
        started, request = found
        if self._clock() - started > self._ttl_s:
            return None
        return request
