"""Delivering security alerts to a webhook, signed with HMAC-SHA-256.

Each alert is POSTed as one JSON object (:meth:`bastion.audit.alerts.Alert.as_dict`) with

``Bastion-Signature: t=<unix time>,v1=<hex HMAC-SHA-256(secret, "<t>." + body)>``

the scheme of Stripe's webhooks (GitHub's signs the body alone): the timestamp is signed
with the body, so a receiver that refuses old timestamps (:func:`verify_signature`) cannot
be fed a recorded delivery again later. ``Bastion-Alert-Id`` (also the body's ``id``)
stays the same across the retries of one alert, so a receiver can drop duplicates.

:class:`WebhookNotifier` delivers on a daemon thread of its own, from a bounded queue:
``submit`` never blocks (the alert rules call it on the request path). Critical alerts go
before warnings, warnings before the rest. Each attempt has one deadline for all of it
(connecting, sending, the answer's headers) and reads at most a few KiB of the answer, so
a receiver that answers slowly or without end costs one attempt's time and no memory.
Connection errors, timeouts, 5xx and 429 are retried with exponential backoff and jitter,
other alerts being delivered meanwhile; other answers, or the last failed attempt, make the
alert a dead letter: counted, logged, and the last few kept in memory.
:meth:`WebhookNotifier.close` delivers what is queued within a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import httpx

from bastion.audit.alerts import SEVERITIES, Alert
from bastion.errors import AuthenticationError, ConfigurationError

logger = logging.getLogger("bastion.alerts")

SIGNATURE_HEADER = "Bastion-Signature"
ALERT_ID_HEADER = "Bastion-Alert-Id"
# How far a signature's timestamp may be from the receiver's clock (Stripe's default).
DEFAULT_TOLERANCE_S = 300.0
MIN_SECRET_BYTES = 16

# The outcomes counted per delivery: an alert delivered, one retry, an alert given up.
DELIVERED = "delivered"
RETRIED = "retried"
DEAD_LETTER = "dead_letter"
OUTCOMES = (DELIVERED, RETRIED, DEAD_LETTER)

_MAX_HEADER = 4096
_MAX_SIGNATURES = 8
# What is read of a receiver's answer at most (its status and headers are what count; a
# short body is read so that the connection can serve the next alert).
MAX_ANSWER_BYTES = 4096
# The order of delivery: the most severe first.
_BY_SEVERITY = tuple(reversed(SEVERITIES))


def check_webhook_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host; ConfigurationError otherwise."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError("The alert webhook must be an http:// or https:// URL.")
    return url


def webhook_secret(secret: str | None, secret_file: str | None) -> bytes:
    """The webhook's signing secret, given itself or as a file that holds it (trailing
    whitespace ignored); ConfigurationError if neither or both, or if it is too short."""
    if (secret is None) == (secret_file is None):
        raise ConfigurationError(
            "An alert webhook needs a signing secret: set BASTION_ALERT_WEBHOOK_SECRET or "
            "BASTION_ALERT_WEBHOOK_SECRET_FILE (one of them)."
        )
    if secret_file is not None:
        try:
            secret = Path(secret_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(
                f"Cannot read the alert webhook secret file {secret_file}: {type(exc).__name__}."
            ) from None
    value = (secret or "").strip().encode()
    if len(value) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"The alert webhook secret must be at least {MIN_SECRET_BYTES} characters "
            "(e.g. `openssl rand -hex 32`)."
        )
    return value


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``Bastion-Signature`` header of `body` sent at `timestamp`."""
    return f"t={timestamp},v1={_mac(secret, body, timestamp)}"


def _mac(secret: bytes, body: bytes, timestamp: int) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_signature(
    secret: bytes | str,
    header: str | None,
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> int:
    """Check a delivery's ``Bastion-Signature`` header against its raw body; the signed
    timestamp if it holds. AuthenticationError if the header is missing or malformed, its
    timestamp lies more than `tolerance_s` from `now`, or no ``v1`` signature matches."""
    key = secret.encode() if isinstance(secret, str) else secret
    if not header or len(header) > _MAX_HEADER:
        raise AuthenticationError("The webhook signature header is missing or too long.")
    timestamp: int | None = None
    signatures: list[bytes] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value.encode("utf-8", "replace"))
    if timestamp is None or not 0 < len(signatures) <= _MAX_SIGNATURES:
        raise AuthenticationError("The webhook signature header is malformed.")
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise AuthenticationError("The webhook signature's timestamp is outside the tolerance.")
    expected = _mac(key, body, timestamp).encode()
    # Every candidate is compared, in constant time each: no early exit on a match.
    matched = False
    for candidate in signatures:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise AuthenticationError("The webhook signature does not match the body.")
    return timestamp


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An alert whose delivery was given up, and why (a status code or an error's type)."""

    alert: Alert
    reason: str
    at: float


class _Retry(Exception):
    def __init__(self, reason: str, after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after_s = after_s


class _GiveUp(Exception):
    pass


@dataclass(slots=True)
class _Pending:
    """An alert to deliver, its signed body and how many attempts it has had."""

    alert: Alert
    body: bytes
    attempts: int = 0
    # The monotonic time before which it is not tried again (after a failed attempt).
    due: float = field(default=0.0)


class WebhookNotifier:
    """Delivers alerts to one webhook URL from a thread of its own (see the module's doc).

    `on_outcome` is called with an outcome of :data:`OUTCOMES` for each alert delivered or
    given up and for each retry (the metrics' callback); `transport`, `clock` and `jitter`
    (the random part of the backoff) are injectable for tests. `timeout_s` bounds each
    attempt as a whole.
    """

    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        timeout_s: float = 5.0,
        attempts: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        queue_size: int = 1000,
        dead_letters_kept: int = 100,
        on_outcome: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = check_webhook_url(url)
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"The alert webhook secret must be at least {MIN_SECRET_BYTES} bytes."
            )
        self._secret = secret
        self._timeout_s = timeout_s
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._queue_size = queue_size
        self._on_outcome = on_outcome
        self._clock = clock
        self._jitter = jitter
        # Where logs say the alerts go: never the URL's path, query or credentials.
        parts = urlsplit(url)
        self._where = f"{parts.scheme}://{parts.hostname}"
        if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
            logger.warning(
                "alerts go to a webhook over plain HTTP: they are signed, but anyone on the "
                "way can read them",
                extra={"webhook": self._where},
            )
        # Used on the delivery thread's own event loop only: asyncio gives each attempt one
        # deadline for all of it (httpx's timeouts hold per read, which a receiver trickling
        # bytes never trips).
        self._client = httpx.AsyncClient(
            transport=transport, timeout=timeout_s, follow_redirects=False
        )
        # Alerts to deliver now, one queue per severity, the most severe first; and those
        # waiting to be tried again, by when (with a sequence number to break ties).
        self._queues: dict[str, deque[_Pending]] = {name: deque() for name in _BY_SEVERITY}
        self._waiting: list[tuple[float, int, _Pending]] = []
        self._sequence = itertools.count()
        self._ready = threading.Condition()
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._dead: deque[DeadLetter] = deque(maxlen=dead_letters_kept)
        self._dead_lock = threading.Lock()
        #: Alerts given up since the start (the kept ones are :attr:`dead_letters`).
        self.dead_letter_count = 0
        #: Alerts delivered since the start.
        self.delivered_count = 0
        self._thread = threading.Thread(target=self._run, name="bastion-alerts", daemon=True)
        self._thread.start()

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """The last alerts given up, oldest first."""
        with self._dead_lock:
            return list(self._dead)

    def submit(self, alert: Alert) -> None:
        """Queue `alert` for delivery; never blocks. A full queue makes room by giving up
        its newest alert of a lower severity; with none, `alert` is given up."""
        body = json.dumps(alert.as_dict(), separators=(",", ":"), sort_keys=True).encode()
        dropped: _Pending | None = None
        with self._ready:
            accepted = not self._closing.is_set()
            if accepted and self._pending_count() >= self._queue_size:
                dropped = self._drop_below(alert.severity)
                accepted = dropped is not None
            if accepted:
                self._queue_of(alert.severity).append(_Pending(alert, body))
                self._ready.notify()
        if dropped is not None:
            self._give_up(dropped.alert, "queue_full")
        if not accepted:
            self._give_up(alert, "closed" if self._closing.is_set() else "queue_full")

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued within `timeout_s`, then stop; what is left is given up."""
        with self._ready:
            self._deadline = time.monotonic() + timeout_s
            self._closing.set()
            self._ready.notify_all()
        self._thread.join(timeout_s + 0.5)
        with self._ready:
            left = [p for queue in self._queues.values() for p in queue]
            left += [p for _, _, p in self._waiting]
            for queue in self._queues.values():
                queue.clear()
            self._waiting.clear()
        for pending in left:
            self._give_up(pending.alert, "closed")

    # ------------------------------------------------------------------ the queues

    def _queue_of(self, severity: str) -> deque[_Pending]:
        queue = self._queues.get(severity)
        return self._queues["warning"] if queue is None else queue

    def _pending_count(self) -> int:
        return sum(len(q) for q in self._queues.values()) + len(self._waiting)

    def _drop_below(self, severity: str) -> _Pending | None:
        """Take out the newest queued alert less severe than `severity` (None if none)."""
        rank = _BY_SEVERITY.index(severity) if severity in _BY_SEVERITY else 1
        for name in reversed(_BY_SEVERITY[rank + 1 :]):
            if self._queues[name]:
                return self._queues[name].pop()
        return None

    def _next(self) -> _Pending | None:
        """The next alert to try, the most severe first, waiting for one if there is none
        yet; None once closing leaves nothing that can be delivered before the deadline."""
        with self._ready:
            while True:
                now = time.monotonic()
                # Retries that are due go before newer alerts of their severity.
                while self._waiting and self._waiting[0][0] <= now:
                    _, _, due = heapq.heappop(self._waiting)
                    self._queue_of(due.alert.severity).appendleft(due)
                for queue in self._queues.values():
                    if queue:
                        return queue.popleft()
                wake = self._waiting[0][0] if self._waiting else None
                if self._closing.is_set():
                    if wake is None or wake >= self._deadline:
                        return None
                    self._ready.wait(wake - now)
                else:
                    self._ready.wait(None if wake is None else wake - now)

    def _retry_later(self, pending: _Pending, delay: float) -> bool:
        """Queue `pending` to be tried again in `delay`; False if closing and that would
        pass the deadline."""
        pending.due = time.monotonic() + delay
        with self._ready:
            if self._closing.is_set() and pending.due >= self._deadline:
                return False
            heapq.heappush(self._waiting, (pending.due, next(self._sequence), pending))
        return True

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            while (pending := self._next()) is not None:
                try:
                    loop.run_until_complete(self._try(pending))
                except Exception as exc:  # never let one alert stop the thread
                    self._give_up(pending.alert, type(exc).__name__)
            loop.run_until_complete(self._client.aclose())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def _try(self, pending: _Pending) -> None:
        """One attempt at delivering `pending`; a failure that may pass is queued again."""
        alert = pending.alert
        pending.attempts += 1
        try:
            await self._post(alert, pending.body)
        except _GiveUp as exc:
            self._give_up(alert, str(exc))
        except _Retry as exc:
            if pending.attempts >= self._attempts:
                self._give_up(alert, exc.reason)
                return
            self._count(RETRIED)
            logger.info(
                "retrying an alert delivery",
                extra={"alert_id": alert.id, "reason": exc.reason, "attempt": pending.attempts},
            )
            if not self._retry_later(pending, self._delay(pending.attempts, exc)):
                self._give_up(alert, "closed")
        else:
            self.delivered_count += 1
            self._count(DELIVERED)

    async def _post(self, alert: Alert, body: bytes) -> None:
        timeout = self._timeout_s
        if self._closing.is_set():
            timeout = min(timeout, self._deadline - time.monotonic())
            if timeout <= 0:
                raise _GiveUp("closed")
        timestamp = int(self._clock())
        headers = {
            "content-type": "application/json",
            "user-agent": "bastion-alerts",
            SIGNATURE_HEADER: sign(self._secret, body, timestamp),
            ALERT_ID_HEADER: alert.id,
        }
        status: int | None = None
        retry_after: float | None = None
        try:
            async with asyncio.timeout(timeout):
                async with self._client.stream(
                    "POST", self.url, content=body, headers=headers, timeout=timeout
                ) as response:
                    status, retry_after = response.status_code, _retry_after(response)
                    await _read_some(response, MAX_ANSWER_BYTES)
        except (httpx.HTTPError, TimeoutError) as exc:
            # Once the status is in, the rest of the answer does not matter.
            if status is None:
                raise _Retry(type(exc).__name__) from None
        if 200 <= status < 300:
            return
        if status == 429 or status >= 500:
            raise _Retry(f"status {status}", retry_after)
        raise _GiveUp(f"status {status}")

    def _delay(self, attempt: int, retry: _Retry) -> float:
        """Exponential backoff with jitter (half fixed, half random), or the server's
        Retry-After where it gave one; never more than `backoff_max_s`."""
        if retry.after_s is not None:
            return min(retry.after_s, self._backoff_max_s)
        base = min(self._backoff_max_s, self._backoff_s * 2.0 ** (attempt - 1))
        return base / 2 + base / 2 * self._jitter()

    def _give_up(self, alert: Alert, reason: str) -> None:
        with self._dead_lock:
            self._dead.append(DeadLetter(alert, reason, self._clock()))
            self.dead_letter_count += 1
        self._count(DEAD_LETTER)
        logger.warning(
            "gave up delivering an alert",
            extra={
                "alert": alert.rule,
                "alert_id": alert.id,
                "reason": reason,
                "webhook": self._where,
            },
        )

    def _count(self, outcome: str) -> None:
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome)
            except Exception:
                logger.exception("the alert delivery callback failed")


async def _read_some(response: httpx.Response, limit: int) -> None:
    """Read at most about `limit` bytes of the answer (one chunk more at most), so that a
    short one leaves the connection reusable and an endless one costs nothing."""
    read = 0
    chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            read += len(chunk)
            if read >= limit:
                return


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    if value.isascii() and value.isdigit():
        return float(value)
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
