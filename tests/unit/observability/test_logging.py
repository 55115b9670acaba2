from __future__ import annotations

import io
import json
import logging

from bastion.observability.logging import JsonFormatter, redact


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
