"""Webhook delivery of alerts to a real receiver on loopback: signatures, retries, dead letters."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alert_receiver import AlertReceiver, Delivery
from bastion.audit.alerts import Alert
from bastion.audit.webhooks import (
    ALERT_ID_HEADER,
    WebhookNotifier,
    check_webhook_url,
    sign,
    verify_signature,
    webhook_secret,
)
from bastion.config import Settings
from bastion.errors import AuthenticationError, ConfigurationError

SECRET = b"whsec_0123456789abcdef0123456789abcdef"


def alert(
    rule: str = "auth_failures_per_key", key: str = "0123456789abcdef", severity: str = "warning"
) -> Alert:
    return Alert(
        id=f"{abs(hash((rule, key, time.monotonic()))):032x}"[:32],
        rule=rule,
        severity=severity,
        description="Repeated failed sign-ins with one key id.",
        group={"actor": key},
        count=10,
        threshold=10,
        window_s=60.0,
        first_at=1_700_000_000.0,
        last_at=1_700_000_045.0,
        suppressed=0,
        event={"kind": "auth.failed", "actor": key, "detail": {"reason": "bad_secret"}},
    )


def independent_check(secret: bytes, delivery: Delivery, tolerance_s: float = 300) -> None:
    """The few lines a receiver without Bastion's code would write."""
    fields = dict(item.split("=", 1) for item in delivery.headers["bastion-signature"].split(","))
    signed = fields["t"].encode() + b"." + delivery.body
    expected = hmac.new(secret, signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, fields["v1"])
    assert abs(time.time() - int(fields["t"])) <= tolerance_s


@pytest.fixture
def receiver() -> Iterator[AlertReceiver]:
    found = AlertReceiver()
    yield found
    found.close()


@pytest.fixture
def outcomes() -> Counter[str]:
    return Counter()


@pytest.fixture
def make(outcomes: Counter[str]) -> Iterator[Callable[..., WebhookNotifier]]:
    made: list[WebhookNotifier] = []

    def notifier(url: str, **options: object) -> WebhookNotifier:
        options.setdefault("backoff_s", 0.01)
        options.setdefault("jitter", lambda: 0.5)
        found = WebhookNotifier(url, SECRET, on_outcome=counting(outcomes), **options)  # type: ignore[arg-type]
        made.append(found)
        return found

    yield notifier
    for found in made:
        found.close(1.0)


def counting(outcomes: Counter[str]) -> Callable[[str], None]:
    return lambda outcome: outcomes.update([outcome])


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---------------------------------------------------------------- delivery and signature


def test_an_alert_arrives_signed_and_the_receiver_verifies_it(
    receiver: AlertReceiver, make: Callable[..., WebhookNotifier], outcomes: Counter[str]
) -> None:
    notifier = make(receiver.url)
    sent = alert()
    notifier.submit(sent)
    (delivery,) = receiver.wait(1)
    wait_for(lambda: outcomes["delivered"] == 1)

    assert verify_signature(SECRET, delivery.headers["bastion-signature"], delivery.body) > 0
    independent_check(SECRET, delivery)
    body = json.loads(delivery.body)
    assert body == sent.as_dict()
    assert delivery.headers[ALERT_ID_HEADER.lower()] == body["id"] == sent.id
    assert delivery.headers["content-type"] == "application/json"
    assert SECRET not in delivery.body and SECRET.decode() not in str(delivery.headers)
    assert notifier.delivered_count == 1 and notifier.dead_letter_count == 0
    assert outcomes == Counter(delivered=1)


def test_a_tampered_body_an_old_timestamp_or_another_secret_is_refused() -> None:
    body = json.dumps(alert().as_dict()).encode()
    now = time.time()
    header = sign(SECRET, body, int(now))
    assert verify_signature(SECRET, header, body, now=now) == int(now)
    assert verify_signature(SECRET.decode(), header, body, now=now) == int(now)

    with pytest.raises(AuthenticationError, match="does not match"):
        verify_signature(SECRET, header, body.replace(b"bad_secret", b"revoked"), now=now)
    with pytest.raises(AuthenticationError, match="does not match"):
        verify_signature(b"another-secret-of-enough-length", header, body, now=now)
    # A delivery recorded and replayed later: its signed timestamp is too old.
    with pytest.raises(AuthenticationError, match="tolerance"):
        verify_signature(SECRET, header, body, now=now + 301)
    with pytest.raises(AuthenticationError, match="tolerance"):
        verify_signature(SECRET, header, body, tolerance_s=10, now=now + 11)
    # A fresh timestamp put on an old signature does not match it.
    old = sign(SECRET, body, int(now) - 3600)
    moved = f"t={int(now)},{old.split(',')[1]}"
    with pytest.raises(AuthenticationError, match="does not match"):
        verify_signature(SECRET, moved, body, now=now)


@pytest.mark.parametrize(
    "header",
    [None, "", "v1=abc", "t=123", "t=abc,v1=00", "t=-5,v1=00", "x" * 5000, "t=1,v1=é"],
)
def test_a_missing_or_malformed_header_is_refused(header: str | None) -> None:
    with pytest.raises(AuthenticationError):
        verify_signature(SECRET, header, b"{}", now=1)


def test_any_of_several_signatures_may_match_for_secret_rotation() -> None:
    body, now = b'{"id":"x"}', 1_700_000_000
    good = sign(SECRET, body, now).split(",")[1]
    old = sign(b"the-previous-secret-0123456789", body, now).split(",")[1]
    assert verify_signature(SECRET, f"t={now},{old},{good}", body, now=now) == now


# ---------------------------------------------------------------- retries and dead letters


def test_5xx_then_success_is_delivered_once(make: Callable[..., WebhookNotifier]) -> None:
    receiver = AlertReceiver([503, 500, (429, {"Retry-After": "0"})])
    try:
        outcomes: Counter[str] = Counter()
        notifier = WebhookNotifier(
            receiver.url,
            SECRET,
            backoff_s=0.01,
            jitter=lambda: 0.0,
            on_outcome=counting(outcomes),
        )
        sent = alert()
        notifier.submit(sent)
        deliveries = receiver.wait(4)
        wait_for(lambda: outcomes["delivered"] == 1)
        notifier.close(1.0)
    finally:
        receiver.close()
    assert outcomes == Counter(retried=3, delivered=1)
    # The same alert each time (one id to drop duplicates by), each attempt signed anew.
    assert {d.headers["bastion-alert-id"] for d in deliveries} == {sent.id}
    assert len({d.body for d in deliveries}) == 1
    for delivery in deliveries:
        verify_signature(SECRET, delivery.headers["bastion-signature"], delivery.body)
    assert notifier.delivered_count == 1 and notifier.dead_letter_count == 0


def test_a_receiver_that_is_down_gets_retries_then_a_dead_letter(
    make: Callable[..., WebhookNotifier], outcomes: Counter[str]
) -> None:
    notifier = make(f"http://127.0.0.1:{unused_port()}/hook", attempts=3)
    sent = alert()
    notifier.submit(sent)
    wait_for(lambda: notifier.dead_letter_count == 1)
    assert outcomes == Counter(retried=2, dead_letter=1)
    (dead,) = notifier.dead_letters
    assert dead.alert == sent and dead.reason == "ConnectError"


def test_other_4xx_answers_are_not_retried(make: Callable[..., WebhookNotifier]) -> None:
    receiver = AlertReceiver([400])
    try:
        outcomes: Counter[str] = Counter()
        notifier = WebhookNotifier(receiver.url, SECRET, on_outcome=counting(outcomes))
        notifier.submit(alert())
        receiver.wait(1)
        wait_for(lambda: notifier.dead_letter_count == 1)
        notifier.close(1.0)
    finally:
        receiver.close()
    assert len(receiver.deliveries) == 1
    assert outcomes == Counter(dead_letter=1)
    assert notifier.dead_letters[0].reason == "status 400"


def test_backoff_grows_exponentially_with_jitter_and_a_ceiling() -> None:
    notifier = WebhookNotifier(
        "http://127.0.0.1:9/x", SECRET, backoff_s=1.0, backoff_max_s=5.0, jitter=lambda: 1.0
    )
    try:
        from bastion.audit.webhooks import _Retry

        delays = [notifier._delay(attempt, _Retry("x")) for attempt in range(1, 6)]
        assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
        notifier._jitter = lambda: 0.0
        assert notifier._delay(3, _Retry("x")) == 2.0
        # A server's Retry-After is honoured, within the ceiling.
        assert notifier._delay(1, _Retry("x", after_s=3.0)) == 3.0
        assert notifier._delay(1, _Retry("x", after_s=3600.0)) == 5.0
    finally:
        notifier.close(0.1)


def test_submit_never_blocks_a_full_queue_makes_dead_letters(
    make: Callable[..., WebhookNotifier], outcomes: Counter[str]
) -> None:
    notifier = make(f"http://127.0.0.1:{unused_port()}/hook", queue_size=0)
    started = time.monotonic()
    for _ in range(50):
        notifier.submit(alert())
    assert time.monotonic() - started < 0.5
    assert notifier.dead_letter_count == 50 and outcomes == Counter(dead_letter=50)
    # Only the latest are kept in memory.
    assert len(notifier.dead_letters) == 50
    small = make(f"http://127.0.0.1:{unused_port()}/hook", queue_size=0, dead_letters_kept=3)
    for _ in range(10):
        small.submit(alert())
    assert len(small.dead_letters) == 3 and small.dead_letter_count == 10
    assert {d.reason for d in small.dead_letters} == {"queue_full"}


# ---------------------------------------------------------------- slow and endless receivers


class RawReceiver:
    """A receiver on loopback that answers each connection as `answer(connection, n)` says
    (n: the connection's number), after reading its request: a slow or broken one."""

    def __init__(self, answer: Callable[[socket.socket, int], None]) -> None:
        self._answer = answer
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}/hooks/bastion"
        self.requests: list[bytes] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        for n in itertools.count():
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection, n), daemon=True).start()

    def _serve(self, connection: socket.socket, n: int) -> None:
        with connection:
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head, re.I)[1])  # type: ignore[index]
            while len(body) < length:
                body += connection.recv(65536)
            self.requests.append(body)
            # OSError: the notifier hung up, what these tests want to see.
            with contextlib.suppress(OSError):
                self._answer(connection, n)
            self.closed.set()

    def close(self) -> None:
        self._server.close()


def trickle_headers(connection: socket.socket, n: int) -> None:
    """A status line, then a header a byte every 50 ms, never ending (the first time)."""
    if n > 0:
        connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        return
    connection.sendall(b"HTTP/1.1 200 OK\r\nx-slow: ")
    for _ in range(2000):
        connection.sendall(b"a")
        time.sleep(0.05)


def endless_body(connection: socket.socket, n: int) -> None:
    """A 200, then a body that never ends, as fast as the notifier takes it."""
    connection.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"x" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        connection.sendall(framed)


def test_a_receiver_trickling_its_answer_costs_one_attempts_deadline(
    make: Callable[..., WebhookNotifier], outcomes: Counter[str]
) -> None:
    receiver = RawReceiver(trickle_headers)
    try:
        # httpx's read timeout (1 s here) never trips: a byte comes every 50 ms.
        notifier = make(receiver.url, timeout_s=1.0, attempts=1)
        started = time.monotonic()
        notifier.submit(slow := alert(key="1" * 16))
        notifier.submit(alert(key="2" * 16))
        wait_for(lambda: notifier.dead_letter_count == 1 and notifier.delivered_count == 1)
        # The whole attempt had one deadline; the next alert was not held back behind it.
        assert time.monotonic() - started < 4.0
        (dead,) = notifier.dead_letters
        assert dead.alert == slow and dead.reason == "TimeoutError"
        assert outcomes == Counter(dead_letter=1, delivered=1)
    finally:
        receiver.close()


def test_an_endless_answer_is_not_read(
    make: Callable[..., WebhookNotifier], outcomes: Counter[str]
) -> None:
    receiver = RawReceiver(endless_body)
    try:
        notifier = make(receiver.url, timeout_s=5.0)
        started = time.monotonic()
        notifier.submit(alert())
        wait_for(lambda: outcomes["delivered"] == 1, timeout=5.0)
        # Its status was enough: the notifier read a few KiB and hung up.
        assert time.monotonic() - started < 3.0
        assert receiver.closed.wait(10)
        assert outcomes == Counter(delivered=1)
    finally:
        receiver.close()


# ---------------------------------------------------------------- the most severe first


def test_critical_alerts_go_before_warnings(make: Callable[..., WebhookNotifier]) -> None:
    hold = threading.Event()
    receiver = AlertReceiver(hold=hold)
    try:
        notifier = make(receiver.url)
        notifier.submit(alert(key="busy".ljust(16, "0")))
        receiver.wait(1)  # delivering it: the receiver holds its answer
        for name, severity in [("w1", "warning"), ("i1", "info"), ("w2", "warning")]:
            notifier.submit(alert(key=name.ljust(16, "0"), severity=severity))
        notifier.submit(alert("model_integrity_failed", "c1".ljust(16, "0"), "critical"))
        hold.set()
        deliveries = receiver.wait(5)
        wait_for(lambda: notifier.delivered_count == 5)
    finally:
        hold.set()
        receiver.close()
    order = [json.loads(d.body)["group"]["actor"][:4] for d in deliveries]
    assert order == ["busy", "c100", "w100", "w200", "i100"]


def test_a_warning_waiting_to_be_retried_does_not_hold_back_a_critical(
    make: Callable[..., WebhookNotifier],
) -> None:
    receiver = AlertReceiver([503])
    try:
        notifier = make(receiver.url, backoff_s=2.0, jitter=lambda: 1.0)
        notifier.submit(alert(key="warn".ljust(16, "0")))
        receiver.wait(1)  # answered 503: retried in 2 s
        notifier.submit(alert("model_integrity_failed", "crit".ljust(16, "0"), "critical"))
        deliveries = receiver.wait(3)
    finally:
        receiver.close()
    order = [json.loads(d.body)["group"]["actor"][:4] for d in deliveries]
    assert order == ["warn", "crit", "warn"]
    assert deliveries[1].at - deliveries[0].at < 1.0
    assert deliveries[2].at - deliveries[0].at >= 1.9


def test_a_full_queue_gives_up_a_warning_for_a_critical(
    make: Callable[..., WebhookNotifier], outcomes: Counter[str]
) -> None:
    hold = threading.Event()
    receiver = AlertReceiver(hold=hold)
    try:
        notifier = make(receiver.url, queue_size=2)
        notifier.submit(alert(key="busy".ljust(16, "0")))
        receiver.wait(1)
        notifier.submit(alert(key="w1".ljust(16, "0")))
        notifier.submit(dropped := alert(key="w2".ljust(16, "0")))
        notifier.submit(alert("model_integrity_failed", "c1".ljust(16, "0"), "critical"))
        # Nothing less severe to give up for another warning: it is the one given up.
        notifier.submit(late := alert(key="w3".ljust(16, "0")))
        assert [(d.alert, d.reason) for d in notifier.dead_letters] == [
            (dropped, "queue_full"),
            (late, "queue_full"),
        ]
        hold.set()
        deliveries = receiver.wait(3)
        wait_for(lambda: notifier.delivered_count == 3)
    finally:
        hold.set()
        receiver.close()
    order = [json.loads(d.body)["group"]["actor"][:4] for d in deliveries]
    assert order == ["busy", "c100", "w100"]
    assert outcomes == Counter(delivered=3, dead_letter=2)


# ---------------------------------------------------------------- closing


def test_close_delivers_what_is_queued(receiver: AlertReceiver, outcomes: Counter[str]) -> None:
    notifier = WebhookNotifier(receiver.url, SECRET, on_outcome=counting(outcomes))
    for i in range(5):
        notifier.submit(alert(key=f"{i:016x}"))
    notifier.close(5.0)
    assert len(receiver.deliveries) == 5
    assert outcomes == Counter(delivered=5)
    # Alerts after the close are not lost silently.
    notifier.submit(alert())
    assert notifier.dead_letters[-1].reason == "closed"


def test_close_keeps_its_deadline_when_the_receiver_is_down(outcomes: Counter[str]) -> None:
    notifier = WebhookNotifier(
        f"http://127.0.0.1:{unused_port()}/hook",
        SECRET,
        backoff_s=10.0,
        attempts=10,
        on_outcome=counting(outcomes),
    )
    notifier.submit(alert())
    wait_for(lambda: outcomes["retried"] == 1)  # failed once, waiting 5-10 s to retry
    started = time.monotonic()
    notifier.close(0.5)
    assert time.monotonic() - started < 1.0
    assert outcomes == Counter(retried=1, dead_letter=1)
    assert notifier.dead_letters[0].reason == "closed"


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "url",
    ["ftp://alerts.example/hook", "file:///etc/passwd", "javascript:alert(1)", "http://", "hook"],
)
def test_only_http_urls_are_webhooks(url: str) -> None:
    with pytest.raises(ConfigurationError, match="http"):
        check_webhook_url(url)
    with pytest.raises(ConfigurationError, match="http"):
        WebhookNotifier(url, SECRET)


def test_an_http_webhook_url_loads() -> None:
    url = "https://alerts.example/hooks/bastion"
    assert Settings.load({"BASTION_ALERT_WEBHOOK_URL": url}).alert_webhook_url == url
    assert check_webhook_url("http://127.0.0.1:9000/x") == "http://127.0.0.1:9000/x"


def test_the_secret_comes_from_the_setting_or_a_file(tmp_path: Path) -> None:
    secret = "0123456789abcdef0123456789abcdef"
    assert webhook_secret(secret, None) == secret.encode()
    path = tmp_path / "secret"
    path.write_text(secret + "\n")
    assert webhook_secret(None, str(path)) == secret.encode()
    for given, file in [(None, None), (secret, str(path))]:
        with pytest.raises(ConfigurationError, match="one of them"):
            webhook_secret(given, file)
    with pytest.raises(ConfigurationError, match="at least 16"):
        webhook_secret("short", None)
    with pytest.raises(ConfigurationError, match="Cannot read") as caught:
        webhook_secret(None, str(tmp_path / "absent"))
    assert secret not in str(caught.value)
    # The setting is a secret: never in the settings' repr (nor so in logs).
    settings = Settings.load({"BASTION_ALERT_WEBHOOK_SECRET": secret})
    assert settings.alert_webhook_secret == secret and secret not in repr(settings)
