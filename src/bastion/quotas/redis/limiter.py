"""The limiter that several gateways share: the counts live in Redis.

:class:`RedisLimiter` is the :class:`~bastion.quotas.limiter.Limiter` of a gateway with
``BASTION_REDIS_URL``. It keeps InMemoryLimiter's rules (the same Lua arithmetic, the same
errors, the same headers: :mod:`bastion.quotas.redis.scripts`) with the counts in Redis, so
that a tenant's 600 requests a minute are 600 however many gateways it reaches.

- **One round trip per admission.** A reservation is one script run (EVALSHA) that checks
  every subject, then takes from every subject, atomically, on Redis's clock; it answers
  the subjects' levels too, which the rate-limit headers report (the reservation's
  `states`), so the headers cost nothing more.
- **Settlements are not waited for.** `settle` and `charge` queue their script run; a
  thread of the limiter sends what is queued (in one pipeline), and the next reservation
  sends whatever is still queued ahead of itself, in the same round trip. One queue, one
  sender at a time: everything reaches Redis in the order it happened, and a reservation
  always sees the settlements made before it in this gateway.
- **Concurrency is leased.** A request holds its slot as a lease that expires
  (`lease_ttl_s`); the same thread renews the leases of the requests still in progress
  every third of that. A gateway that dies frees its slots when their leases expire.
- **When Redis does not answer** (:class:`~bastion.quotas.redis.link.RedisLink`):
  `fail_closed` refuses what needs the limiter (:class:`~bastion.errors.LimiterUnavailable`,
  503); `fail_open` admits against this gateway's own :class:`InMemoryLimiter` until Redis
  answers again. Settlements that cannot be sent are dropped: the leases they would free
  expire, and the tokens they would refund are refilled within the minute anyway.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from bastion.errors import LimiterUnavailable
from bastion.quotas.limiter import (
    InMemoryLimiter,
    LimitState,
    QuotaLimits,
    Reservation,
    Subject,
    limit_state,
    refusal,
)
from bastion.quotas.redis import scripts
from bastion.quotas.redis.link import RedisLink, Script, ScriptCall

logger = logging.getLogger("bastion.redis")

_RESERVE = Script(scripts.RESERVE)
_ADJUST = Script(scripts.ADJUST)
_RENEW = Script(scripts.RENEW)
_RELEASE = Script(scripts.RELEASE)
_STATE = Script(scripts.STATE)

# Key names of this many subjects are remembered (then forgotten all at once).
_KEY_CACHE = 100_000


@dataclass(frozen=True, slots=True)
class _Held:
    """What a reservation made in Redis needs to be settled: its lease's member, its
    subjects' keys (hash, leases; per subject) and their bucket capacities, and the lease
    sets it is in (those of subjects that limit concurrency)."""

    member: str
    keys: tuple[str, ...]
    capacities: tuple[int, ...]
    leases: tuple[str, ...]


class _Unreachable(Exception):
    """Redis was not asked, or did not answer (the link says which outage)."""


class RedisLimiter:
    """The :class:`~bastion.quotas.limiter.Limiter` whose counts are in Redis; see the
    module docstring. Thread-safe; :meth:`close` it once (it sends what is queued)."""

    def __init__(
        self,
        link: RedisLink,
        *,
        prefix: str = "bastion:",
        lease_ttl_s: float = 30.0,
        local: InMemoryLimiter | None = None,
    ) -> None:
        self._link = link
        self._prefix = prefix
        self._lease_ms = max(1, round(lease_ttl_s * 1000))
        self._renew_every_s = lease_ttl_s / 3
        # fail_open's limits, of this gateway alone.
        self._local = local or InMemoryLimiter()
        # Lease members are `<this limiter>:<reservation id>`: unique across gateways.
        self._instance = secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._key_names: dict[Subject, tuple[str, str]] = {}
        # The queue of script runs not yet sent, and the leases to renew (by reservation
        # id), both under `_cond`; `_send_lock` is held while something is being sent.
        self._cond = threading.Condition()
        self._outbox: list[ScriptCall] = []
        self._live: dict[int, _Held] = {}
        self._send_lock = threading.Lock()
        self._stopping = False
        #: Queued script runs dropped because Redis did not answer.
        self.dropped = 0
        self._dropped_in_outage = 0
        self._sender = threading.Thread(
            target=self._send_forever, name="bastion-redis-limiter", daemon=True
        )
        self._sender.start()

    # ------------------------------------------------------------------ the Limiter

    def reserve(
        self,
        subjects: Sequence[tuple[Subject, QuotaLimits]],
        *,
        tokens: int,
        request_bytes: int = 0,
        up_to: int | None = None,
    ) -> Reservation:
        tokens = max(0, tokens)
        number = next(self._ids)
        member = f"{self._instance}:{number}"
        keys: list[str] = []
        capacities: list[int] = []
        leases: list[str] = []
        args: list[str | int | float] = [
            tokens,
            request_bytes,
            -1 if up_to is None else up_to,
            member,
            self._lease_ms,
        ]
        for subject, limits in subjects:
            usage, lease_set = self._key_names_of(subject)
            keys += (usage, lease_set)
            rpm, tpm = _n(limits.requests_per_minute), _n(limits.tokens_per_minute)
            capacities += (rpm, tpm)
            args += (
                rpm,
                tpm,
                _n(limits.concurrent_requests),
                _n(limits.tokens_per_day),
                _n(limits.max_request_bytes),
            )
            if limits.concurrent_requests is not None:
                leases.append(lease_set)
        try:
            reply = self._call(_RESERVE(keys, args))
        except _Unreachable:
            if self._link.fail_open:
                return self._local.reserve(
                    subjects, tokens=tokens, request_bytes=request_bytes, up_to=up_to
                )
            raise LimiterUnavailable() from None
        outcome, which, wait, reserved, limited, *levels = reply
        states = tuple(
            limit_state(limits, _float(levels[2 * i]), _float(levels[2 * i + 1]))
            for i, (_, limits) in enumerate(subjects)
        )
        if outcome != b"ok":
            subject, limits = subjects[int(which) - 1]
            refused = refusal(outcome.decode(), subject, limits, tokens=tokens, wait_s=_float(wait))
            refused.states = states
            raise refused
        held = _Held(member, tuple(keys), tuple(capacities), tuple(leases))
        if leases:
            with self._cond:
                self._live[number] = held
        return Reservation(
            number,
            tuple(subjects),
            int(float(reserved)),
            token_limited=bool(limited),
            states=states,
            handle=held,
        )

    def settle(self, reservation: Reservation, tokens: int) -> None:
        held = reservation.handle
        if not isinstance(held, _Held):
            self._local.settle(reservation, tokens)
            return
        with self._cond:
            if reservation.settled:
                return
            reservation.settled = True
            self._live.pop(reservation.id, None)
            difference = max(0, tokens) - reservation.tokens
            self._post(_adjust(held, difference, free=bool(held.leases)))

    def charge(self, reservation: Reservation, tokens: int) -> None:
        if tokens <= 0:
            return
        held = reservation.handle
        if not isinstance(held, _Held):
            self._local.charge(reservation, tokens)
            return
        with self._cond:
            self._post(_adjust(held, tokens, free=False))

    def state(self, subject: Subject, limits: QuotaLimits) -> LimitState:
        usage, _ = self._key_names_of(subject)
        capacities = [_n(limits.requests_per_minute), _n(limits.tokens_per_minute)]
        try:
            requests, tokens = self._call(_STATE([usage], capacities))
        except _Unreachable:
            if self._link.fail_open:
                return self._local.state(subject, limits)
            raise LimiterUnavailable() from None
        return limit_state(limits, _float(requests), _float(tokens))

    # ------------------------------------------------------------------ lifecycle

    def flush(self) -> None:
        """Send what is queued now (the sender thread does so by itself)."""
        self._flush()

    def close(self) -> None:
        """Free the slots of requests still in progress (this gateway stops: they are
        over), send what is queued, and stop the sender thread."""
        with self._cond:
            for held in self._live.values():
                self._post(_RELEASE(held.leases, [held.member]))
            self._live.clear()
            self._stopping = True
            self._cond.notify()
        self._sender.join(timeout=10)

    # ------------------------------------------------------------------ internals

    def _key_names_of(self, subject: Subject) -> tuple[str, str]:
        """The subject's hash and lease set: its kind, and a digest of its id (any text,
        never parsed from the name)."""
        names = self._key_names.get(subject)
        if names is None:
            if len(self._key_names) >= _KEY_CACHE:
                self._key_names = {}
            digest = hashlib.sha256(f"{subject.kind}\0{subject.id}".encode()).hexdigest()[:32]
            kind = subject.kind if subject.kind.isalnum() else "subject"
            usage = f"{self._prefix}quota:{kind}:{digest}"
            names = self._key_names[subject] = (usage, f"{usage}:leases")
        return names

    def _post(self, call: ScriptCall) -> None:
        """Queue `call` for the sender (the caller holds `_cond`)."""
        self._outbox.append(call)
        self._cond.notify()

    def _call(self, call: ScriptCall) -> Any:
        """Run `call` after whatever is queued, in one round trip; its result."""
        if not self._link.available:
            raise _Unreachable
        with self._send_lock:
            with self._cond:
                calls, self._outbox = [*self._outbox, call], []
            try:
                results = self._link.run(calls)
            except RedisError as exc:
                self._link.failed(exc)
                self._lost(len(calls) - 1)
                raise _Unreachable from exc
            self._report_refused(results[:-1])
        result = results[-1]
        if isinstance(result, Exception):
            # A script that fails (Redis out of memory, say) is as good as no Redis.
            self._link.failed(result)
            raise _Unreachable from result
        return result

    def _flush(self) -> None:
        with self._send_lock:
            with self._cond:
                calls, self._outbox = self._outbox, []
            if not calls:
                return
            if not self._link.available:
                self._lost(len(calls))
                return
            try:
                results = self._link.run(calls)
            except RedisError as exc:
                self._link.failed(exc)
                self._lost(len(calls))
                return
            self._report_refused(results)

    def _report_refused(self, results: Sequence[Any]) -> None:
        """Count (and log) queued script runs that Redis refused (the caller holds
        `_send_lock`)."""
        failed = [result for result in results if isinstance(result, Exception)]
        if failed:
            logger.error(
                "settlements were refused by Redis",
                extra={"exc_type": type(failed[0]).__name__, "count": len(failed)},
            )
            self.dropped += len(failed)

    def _lost(self, count: int) -> None:
        """Count queued script runs that could not be sent (the caller holds `_send_lock`)."""
        if count <= 0:
            return
        self.dropped += count
        if self._dropped_in_outage != self._link.outages:
            # Once per outage: the leases these would free expire by themselves.
            self._dropped_in_outage = self._link.outages
            logger.warning("settlements dropped while Redis does not answer")

    def _send_forever(self) -> None:
        renew_at = time.monotonic() + self._renew_every_s
        while True:
            with self._cond:
                while not self._outbox and not self._stopping:
                    wait = renew_at - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if time.monotonic() >= renew_at:
                    renewal = self._renewal()
                    if renewal is not None:
                        self._outbox.append(renewal)
                    renew_at = time.monotonic() + self._renew_every_s
                stopping = self._stopping
            try:
                self._flush()
            except Exception as exc:
                # Whatever it was, the queue was taken; the next ones must still go.
                logger.error(
                    "could not send settlements to Redis", extra={"exc_type": type(exc).__name__}
                )
            if stopping:
                return

    def _renewal(self) -> ScriptCall | None:
        """The renewal of every lease held now (the caller holds `_cond`)."""
        members: dict[str, list[str]] = {}
        for held in self._live.values():
            for lease_set in held.leases:
                members.setdefault(lease_set, []).append(held.member)
        if not members:
            return None
        args: list[str | int | float] = [self._lease_ms]
        for found in members.values():
            args += (len(found), *found)
        return _RENEW(list(members), args)


def _adjust(held: _Held, difference: int, *, free: bool) -> ScriptCall:
    return _ADJUST(held.keys, [difference, held.member if free else "", *held.capacities])


def _n(limit: int | None) -> int:
    """A limit as the scripts take it (-1: none)."""
    return -1 if limit is None else limit


def _float(value: bytes) -> float | None:
    """A number the scripts answered ('': none)."""
    return float(value) if value else None
