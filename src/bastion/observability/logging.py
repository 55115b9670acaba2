"""JSON log lines, with redaction of anything that looks like a credential.

Bastion never logs request or response bodies; the redaction filter is a second line of
defence in case a library puts an Authorization header or a key in a message.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

# API keys (bsk_...), bearer tokens and long base64/hex runs that could be secrets.
_SECRET_PATTERNS = [
    re.compile(r"bsk_[A-Za-z0-9]+_[A-Za-z0-9]+"),
    re.compile(r"(?i)(bearer\s+)[^\s\"',]+"),
]
_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "color_message"}


def redact(text: str) -> str:
    """Replace credential-looking substrings with a fixed marker."""
    text = _SECRET_PATTERNS[0].sub("bsk_[REDACTED]", text)
    return _SECRET_PATTERNS[1].sub(r"\1[REDACTED]", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and structured extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: messages and tracebacks can quote payloads.
            entry["exc_type"] = record.exc_info[0].__name__
        return json.dumps(entry, separators=(",", ":"), default=str)


def configure_logging(level: str = "info", stream: Any = None) -> None:
    """Send every logger's output, uvicorn's included, through the JSON formatter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Access logs carry raw paths and query strings; Bastion writes its own request lines.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request's URL at INFO ("HTTP Request: POST <url>"), and the alert
    # webhook's may hold a password, a token in its path or a secret in its query.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
