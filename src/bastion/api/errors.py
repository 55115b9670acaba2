"""Rendering of Bastion errors in each API's own error shape.

The status of an error is decided by its class in :mod:`bastion.errors`; this module only
chooses the body: OpenAI's ``{"error": {"message", "type", "code", "param"}}`` for
``/v1`` and ``/admin``, the Open Inference Protocol's ``{"error": "..."}`` for ``/v2``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from bastion.errors import (
    BastionError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)

_json = msgspec.json.Encoder()

# msgspec quotes offending enum and string values in its messages; those come from the
# client and may be payload, so they are cut out before the message reaches anyone.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def validation_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> InvalidRequest:
    """Turn a msgspec decoding failure into a 400 whose message quotes no client data."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        message = _QUOTED.sub("(value)", text)
        path = text.rsplit(" - at `", 1)[-1].rstrip("`") if " - at `" in text else None
        param = path[2:] if path and path.startswith("$.") else None
        return InvalidRequest(f"Invalid request: {message}", param=param)
    return InvalidRequest("The request body is not valid JSON.", code="invalid_json")


def openai_body(exc: BastionError) -> bytes:
    return _json.encode(
        {
            "error": {
                "message": exc.message,
                "type": exc.error_type,
                "code": exc.code,
                "param": exc.param,
            }
        }
    )


def oip_body(exc: BastionError) -> bytes:
    return _json.encode({"error": exc.message})


def error_response(request: Request, exc: BastionError) -> Response:
    path = request.url.path
    body = oip_body(exc) if path.startswith("/v2/") or path == "/v2" else openai_body(exc)
    return Response(body, exc.status, headers=exc.headers, media_type="application/json")


def from_http_exception(exc: HTTPException) -> BastionError:
    if exc.status_code == 404:
        return NotFound("No such route.", code="route_not_found")
    if exc.status_code == 405:
        return MethodNotAllowed("Method not allowed on this route.")
    if 400 <= exc.status_code < 500:
        return InvalidRequest("The request could not be processed.")
    return BastionError("Internal error.")


async def handle_bastion_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BastionError)
    return error_response(request, exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(request, from_http_exception(exc))


def internal_error_body(path: str) -> bytes:
    exc = BastionError("Internal error.")
    return oip_body(exc) if path.startswith("/v2/") else openai_body(exc)


# An exception handler: the app's own (handle_bastion_error, handle_http_exception, ...).
Handler = Callable[[Request, Exception], Awaitable[Response]]


def handler_for(handlers: Mapping[type, Handler], exc: Exception) -> Handler | None:
    """The handler of `exc`'s nearest class that has one (Starlette's rule), or None."""
    for cls in type(exc).__mro__:
        handler = handlers.get(cls)
        if handler is not None:
            return handler
    return None
