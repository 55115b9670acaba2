from __future__ import annotations

import json

import msgspec
import pytest

from bastion.api.errors import oip_body, openai_body, validation_error
from bastion.api.schemas import ChatCompletionRequest
from bastion.errors import AuthenticationError, InvalidRequest, ModelUnavailable


def _decode_error(raw: bytes) -> InvalidRequest:
    with pytest.raises(msgspec.DecodeError) as info:
        msgspec.json.decode(raw, type=ChatCompletionRequest)
    return validation_error(info.value)


def test_validation_messages_never_quote_client_values() -> None:
    secret = "SECRET-VALUE-123"
    raw = json.dumps({"model": "m", "messages": [{"role": secret, "content": "hi"}]}).encode()
    error = _decode_error(raw)
    assert secret not in error.message
    assert error.param == "messages[0].role"
    assert error.status == 400


def test_malformed_json_is_invalid_json() -> None:
    error = _decode_error(b"{nope")
    assert error.code == "invalid_json"


def test_error_shapes() -> None:
    exc = AuthenticationError()
    body = json.loads(openai_body(exc))
    assert body["error"]["type"] == "authentication_error"
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert exc.headers["www-authenticate"].startswith("Bearer")
    assert json.loads(oip_body(exc)) == {"error": exc.message}
    unavailable = ModelUnavailable("busy", retry_after_s=7)
    assert unavailable.status == 503 and unavailable.headers["retry-after"] == "7"
