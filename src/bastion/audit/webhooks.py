"""Delivering security alerts to a webhook, signed with HMAC-SHA-256.

Each alert is POSTed as one JSON object (:meth:`bastion.audit.alerts.Alert.as_dict`) with

``Bastion-Signature: t=<unix time>,v1=<hex HMAC-SHA-256(secret, "<t>." + body)>``

the scheme of Stripe's webhooks (GitHub's signs the body alone): the timestamp is signed
with the body, so a receiver that refuses old timestamps (:func:`verify_signature`) cannot
be fed a recorded delivery again later. ``Bastion-Alert-Id`` (also the body's ``id``)
stays the same across the retries of one alert, so a receiver can drop duplicates.

:class:`WebhookNotifier` delivers on a daemon thread of its own, from a bounded queue:
``submit`` never blocks (the alert rules call it on the request path). Connection errors,
timeouts, 5xx and 429 are retried with exponential backoff and jitter; other answers, or
the last failed attempt, make the alert a dead letter: counted, logged, and the last few
kept in memory. :meth:`WebhookNotifier.close` delivers what is queued within a deadline.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bastion.audit.alerts import Alert
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


class WebhookNotifier:
    """Delivers alerts to one webhook URL from a thread of its own (see the module's doc).

    `on_outcome` is called with an outcome of :data:`OUTCOMES` for each alert delivered or
    given up and for each retry (the metrics' callback); `transport`, `clock` and `jitter`
    (the random part of the backoff) are injectable for tests.
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
        transport: httpx.BaseTransport | None = None,
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
        self._client = httpx.Client(transport=transport, timeout=timeout_s, follow_redirects=False)
        self._pending: deque[tuple[Alert, bytes]] = deque()
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
        """Queue `alert` for delivery; never blocks (a full queue makes it a dead letter)."""
        body = json.dumps(alert.as_dict(), separators=(",", ":"), sort_keys=True).encode()
        with self._ready:
            accepted = not self._closing.is_set() and len(self._pending) < self._queue_size
            if accepted:
                self._pending.append((alert, body))
                self._ready.notify()
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
            left = list(self._pending)
            self._pending.clear()
        for alert, _ in left:
            self._give_up(alert, "closed")
        if not self._thread.is_alive():
            self._client.close()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closing.is_set():
                    self._ready.wait()
                if not self._pending:
                    return
                alert, body = self._pending.popleft()
            try:
                self._deliver(alert, body)
            except Exception as exc:  # never let one alert stop the thread
                self._give_up(alert, type(exc).__name__)

    def _deliver(self, alert: Alert, body: bytes) -> None:
        for attempt in range(1, self._attempts + 1):
            try:
                self._post(alert, body)
            except _GiveUp as exc:
                self._give_up(alert, str(exc))
                return
            except _Retry as exc:
                if attempt == self._attempts:
                    self._give_up(alert, exc.reason)
                    return
                self._count(RETRIED)
                logger.info(
                    "retrying an alert delivery",
                    extra={"alert_id": alert.id, "reason": exc.reason, "attempt": attempt},
                )
                if not self._pause(self._delay(attempt, exc)):
                    self._give_up(alert, "closed")
                    return
            else:
                self.delivered_count += 1
                self._count(DELIVERED)
                return

    def _post(self, alert: Alert, body: bytes) -> None:
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
        try:
            response = self._client.post(self.url, content=body, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise _Retry(type(exc).__name__) from None
        status = response.status_code
        if 200 <= status < 300:
            return
        if status == 429 or status >= 500:
            raise _Retry(f"status {status}", _retry_after(response))
        raise _GiveUp(f"status {status}")

    def _delay(self, attempt: int, retry: _Retry) -> float:
        """Exponential backoff with jitter (half fixed, half random), or the server's
        Retry-After where it gave one; never more than `backoff_max_s`."""
        if retry.after_s is not None:
            return min(retry.after_s, self._backoff_max_s)
        base = min(self._backoff_max_s, self._backoff_s * 2.0 ** (attempt - 1))
        return base / 2 + base / 2 * self._jitter()

    def _pause(self, delay: float) -> bool:
        """Wait `delay` before a retry; False if closing and it would pass the deadline."""
        end = time.monotonic() + delay
        if not self._closing.wait(delay):
            return True
        if end > self._deadline:
            return False
        time.sleep(max(0.0, end - time.monotonic()))
        return True

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
