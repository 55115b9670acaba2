"""Reading and decoding request bodies: content type, size limit, JSON, schema."""

from __future__ import annotations

import asyncio
from typing import TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request

from bastion.api.errors import validation_error
from bastion.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType

T = TypeVar("T")

# The key, in a request's scope["state"], the server sets once the whole body is in hand
# (api/transport.py): reading it then cannot wait, so no deadline is armed for it.
BODY_RECEIVED = "bastion.body_received"


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing more than `limit` bytes before reading them all (413), and
    a client that takes longer than the body timeout to send it (408)."""
    timeout = getattr(request.app.state, "body_timeout_s", None)
    if timeout is None or request.scope.get("state", {}).get(BODY_RECEIVED):
        return await _read(request, limit)
    # asyncio.timeout(), without its state machine: one timer that cancels this task,
    # and the same bookkeeping of cancellations (a cancel of the task's own, the client
    # leaving say, is no timeout).
    task = asyncio.current_task()
    assert task is not None
    expiry = _Expiry(task)
    cancelling = task.cancelling()
    timer = asyncio.get_running_loop().call_later(timeout, expiry)
    try:
        body = await _read(request, limit)
    except asyncio.CancelledError:
        timer.cancel()
        if expiry.fired and task.uncancel() <= cancelling:
            raise RequestTimeout("The request body did not arrive in time.") from None
        raise
    except BaseException:
        timer.cancel()
        if expiry.fired:
            task.uncancel()
        raise
    timer.cancel()
    if expiry.fired:
        task.uncancel()
    return body


class _Expiry:
    """The body timeout's timer: cancels the reading task, and remembers that it did."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel()


async def _read(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest("Invalid Content-Length header.") from None
        if size > limit:
            raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    # The ASGI messages themselves (what Request.stream() reads, without its generator).
    receive = request.receive
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(
                        f"Request body is larger than the limit of {limit} bytes."
                    )
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        elif kind == "http.disconnect":
            raise ClientDisconnect()
    # The size counts against the caller's quota (max_request_bytes) at admission.
    request.scope.setdefault("state", {})["body_bytes"] = received
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
