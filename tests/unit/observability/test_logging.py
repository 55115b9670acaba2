from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from alert_receiver import AlertReceiver
from bastion.audit.alerts import Alert
from bastion.audit.webhooks import WebhookNotifier
from bastion.config import Settings
from bastion.observability.logging import JsonFormatter, configure_logging, redact


def test_redacts_keys_and_bearer_tokens() -> None:
    text = "auth Bearer abc.def key bsk_0123abcd_secretsecret end"
    cleaned = redact(text)
    assert "secretsecret" not in cleaned and "abc.def" not in cleaned
    assert "end" in cleaned


def test_json_lines_carry_extras_but_not_exception_text() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.json")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        raise ValueError("payload text that must not be logged")
    except ValueError:
        logger.exception("failed", extra={"route": "/v1/x"})
    line = json.loads(stream.getvalue())
    assert line["msg"] == "failed" and line["route"] == "/v1/x"
    assert line["exc_type"] == "ValueError"
    assert "payload text" not in stream.getvalue()


# The loggers configure_logging changes, put back after each test that calls it.
_CONFIGURED = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore")


@pytest.fixture
def logging_restored() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _CONFIGURED]
    saved = [(lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    try:
        yield
    finally:
        for lg, (handlers, level, propagate, disabled) in zip(loggers, saved, strict=True):
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_alert_webhooks_url_is_in_no_log_record(logging_restored: None) -> None:
    # The finding: httpx logged "HTTP Request: POST <url>" at INFO for every delivery.
    stream = io.StringIO()
    configure_logging("info", stream)
    kept = _Kept()
    logging.getLogger().addHandler(kept)
    receiver = AlertReceiver()
    secrets = ("hunter2-password", "path-token-0f3a", "query-secret-9c1d")
    base = receiver.url.replace("http://", f"http://bastion:{secrets[0]}@")
    url = f"{base}/{secrets[1]}?token={secrets[2]}"
    try:
        notifier = WebhookNotifier(url, b"whsec_0123456789abcdef0123456789abcdef")
        notifier.submit(
            Alert(
                id="0" * 32,
                rule="auth_failures_per_key",
                severity="warning",
                description="Repeated failed sign-ins with one key id.",
                group={"actor": "0123456789abcdef"},
                count=10,
                threshold=10,
                window_s=60.0,
                first_at=time.time() - 5,
                last_at=time.time(),
                suppressed=0,
            )
        )
        notifier.close()
        assert len(receiver.wait(1)) == 1
    finally:
        receiver.close()
    logged = [f"{r.getMessage()} {r.args!r} {r.__dict__!r}" for r in kept.records]
    logged.append(stream.getvalue())
    for secret in secrets:
        assert not any(secret in text for text in logged), secret
    # Nor in the settings' repr (which a traceback or a debug line could show).
    assert not any(secret in repr(Settings(alert_webhook_url=url)) for secret in secrets)
