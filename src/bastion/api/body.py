"""Reading and decoding request bodies: content type, size limit, JSON, schema."""

from __future__ import annotations

import asyncio
from typing import TypeVar

import msgspec
from starlette.requests import Request

from bastion.api.errors import validation_error
from bastion.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType

T = TypeVar("T")


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing more than `limit` bytes before reading them all (413), and
    a client that takes longer than the body timeout to send it (408)."""
    timeout = getattr(request.app.state, "body_timeout_s", None)
    try:
        async with asyncio.timeout(timeout):
            return await _read(request, limit)
    except TimeoutError:
        raise RequestTimeout("The request body did not arrive in time.") from None


async def _read(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest("Invalid Content-Length header.") from None
        if size > limit:
            raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    # The size counts against the caller's quota (max_request_bytes) at admission.
    request.state.body_bytes = received
    return b"".join(chunks)


def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise UnsupportedMediaType("Content-Type must be application/json.")


async def decode_json(request: Request, schema: type[T], limit: int) -> T:
    """Check content type and size, then decode and validate the body against `schema`."""
    require_json(request)
    return decode_value(await read_body(request, limit), schema)


def decode_value(data: bytes, schema: type[T]) -> T:
    """Decode JSON `data` and validate it against `schema`; any flaw is a 400."""
    if not data:
        raise InvalidRequest("The request body is empty.", code="invalid_json")
    try:
        return msgspec.json.decode(data, type=schema)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise validation_error(exc) from None
    except UnicodeDecodeError:
        # A string holding bytes that are not UTF-8 (msgspec checks them as it builds it).
        raise InvalidRequest(
            "The request body is not valid UTF-8 JSON.", code="invalid_json"
        ) from None
    except RecursionError:
        raise InvalidRequest(
            "The request body is nested too deeply.", code="invalid_json"
        ) from None
