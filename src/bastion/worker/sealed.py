"""Opening, serving and sealing end-to-end encrypted (OHTTP) requests inside a worker.

The gateway forwards an encapsulated request unopened (:class:`SealedRequest`). Here, in
the worker that serves the model, it is decapsulated with the OHTTP private keys the
gateway sent over the control channel (:class:`SealingKeys`), its Binary HTTP request is
run through the *same* route code as plaintext requests (the API's Starlette routes, with
a :class:`SealedPipeline` in place of the gateway), and the answer is encapsulated for the
client before it leaves the worker: the gateway only ever sees ciphertext and the token
counts it needs for accounting.

All of this runs on one asyncio event loop in a thread of its own; the model itself still
runs on the worker's runtime thread, reached through `submit`.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import threading
import time
from collections.abc import (
    Awaitable,
    Callable,
    MutableMapping,
)
from datetime import UTC
from typing import Any

import msgspec

from bastion.api.context import PIPELINE_STATE
from bastion.crypto import hpke, ohttp
from bastion.wire import bhttp
from bastion.wire.framing import MAX_MESSAGE_BYTES
from bastion.wire.protocol import (
    SEALED_FRAMING_ALLOWANCE,
    Message,
    RequestFailed,
    SealedChunk,
    SealedRequest,
    SealedResponse,
    SealingKeys,
    cancelled,
)
from bastion.worker.inner import (
    RunInline,
    SealedCall,
    SealedCaller,
    SealedPipeline,
    Usage,
)

logger = logging.getLogger("bastion.worker.sealed")

# Body bytes per chunk of a chunked answer, and the largest whole answer: both keep each
# IPC message far below the frame limit (MAX_MESSAGE_BYTES).
SEALED_CHUNK_BYTES = 1024 * 1024
# How long a cancelled sealed request waits for its inner job's report (the worker gives
# up on a job that ignores its cancellation sooner than this).
_ABANDONED_REPORT_WAIT_S = 10.0
MAX_WHOLE_ANSWER_BYTES = MAX_MESSAGE_BYTES - 64 * 1024


class SealedServer:
    """Serves the SealedRequests of one worker on an event loop thread of its own."""

    def __init__(
        self,
        app: Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]],
        pipeline: SealedPipeline,
        send: Callable[[Message], None],
    ) -> None:
        self._app = app
        self._pipeline = pipeline
        self._send = send
        self._keys: SealingKeys | None = None
        self._gateway_keys: dict[int, tuple[ohttp.GatewayKey, float | None]] = {}
        self._loop = asyncio.new_event_loop()
        # The runtime thread's own loop for serve_inline (created there on first use).
        self._inline_loop: asyncio.AbstractEventLoop | None = None
        # The last Date header accepted and its time: clients reuse one for a second.
        self._last_date: tuple[str, float] = ("", 0.0)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # Ids handed to the loop and not finished, and those cancelled meanwhile.
        self._submitted: set[int] = set()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._active = 0
        self._on_idle: Callable[[], None] | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bastion-sealed", daemon=True
        )
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return self._active

    # ------------------------------------------------------------------ any thread

    def set_keys(self, keys: SealingKeys) -> None:
        """Take a newer key set; an older or repeated version is ignored."""
        if self._keys is not None and keys.version <= self._keys.version:
            return
        gateway_keys = {
            key.key_id: (
                ohttp.GatewayKey(
                    key_id=key.key_id,
                    private_key=hpke.PrivateKey.from_bytes(key.kem_id, key.private_key),
                    suites=tuple((s.kdf_id, s.aead_id) for s in key.suites),
                ),
                key.not_after,
            )
            for key in keys.keys
        }
        self._pipeline.configure(keys)
        self._keys = keys
        self._gateway_keys = gateway_keys

    def serve_inline(self, request: SealedRequest, run_inline: RunInline) -> Message:
        """Serve a (non-chunked) sealed request on the calling thread, the runtime thread:
        no hand-over between threads. Returns the SealedResponse or RequestFailed."""
        if self._inline_loop is None:
            self._inline_loop = asyncio.new_event_loop()
        answers: list[Message] = []
        self._inline_loop.run_until_complete(self._serve(request, answers.append, run_inline))
        return answers[-1]

    def submit(self, request: SealedRequest) -> None:
        with self._lock:
            self._active += 1
            self._submitted.add(request.id)
        self._loop.call_soon_threadsafe(self._start, request)

    def cancel(self, request_id: int) -> bool:
        """Cancel the sealed request `request_id`; False if it is not one of ours."""
        with self._lock:
            if request_id not in self._submitted:
                return False
            # Not started yet: _start sees the mark. Started: its task is cancelled.
            self._cancelled.add(request_id)
        self._loop.call_soon_threadsafe(self._cancel_task, request_id)
        return True

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call `callback` (once) as soon as no sealed request is in flight."""
        with self._lock:
            if self._active:
                self._on_idle = callback
                return
        callback()

    # ------------------------------------------------------------------ loop thread

    def _start(self, request: SealedRequest) -> None:
        with self._lock:
            was_cancelled = request.id in self._cancelled
        if was_cancelled:
            self._send(cancelled(request.id))
            self._finished(request.id)
            return
        task = self._loop.create_task(self._serve(request, self._send))
        self._tasks[request.id] = task
        task.add_done_callback(lambda done: self._done(request.id, done))

    def _done(self, request_id: int, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            # Cancelled before it ran (_serve answers a cancellation once it has started).
            self._send(cancelled(request_id))
        self._finished(request_id)

    def _cancel_task(self, request_id: int) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def _finished(self, request_id: int) -> None:
        self._tasks.pop(request_id, None)
        with self._lock:
            self._submitted.discard(request_id)
            self._cancelled.discard(request_id)
            self._active -= 1
            callback = self._on_idle if self._active == 0 else None
            if callback is not None:
                self._on_idle = None
        if callback is not None:
            callback()

    async def _serve(
        self,
        request: SealedRequest,
        send: Callable[[Message], None],
        run_inline: RunInline | None = None,
    ) -> None:
        try:
            opened = self._open(request)
        except ohttp.OhttpError as exc:
            send(_refusal(request.id, exc))
            return
        plaintext, context = opened
        try:
            inner = bhttp.decode_request(
                plaintext,
                max_bytes=self._pipeline.limits.max_body_bytes + SEALED_FRAMING_ALLOWANCE,
            )
        except bhttp.BhttpError:
            inner = None
        exchange = _Exchange(request, context, send)
        usage = Usage()
        call = self._pipeline.for_request(
            SealedCaller(actions=frozenset(request.actions), identity=request.caller),
            usage,
            request.allowance,
            run_inline,
        )
        try:
            if inner is None:
                await exchange.problem(400, "about:blank", "The encrypted request is not valid.")
            elif (stale := self._date_problem(inner)) is not None:
                await exchange.problem(400, ohttp.DATE_PROBLEM_TYPE, stale)
            else:
                await self._app(_scope(inner, call), _receiver(inner.content), exchange.asgi_send)
                if not exchange.started:
                    await exchange.problem(500, "about:blank", "The request failed.")
        except asyncio.CancelledError:
            if usage.outstanding is not None:
                # Its inner job stops at its next check (or the worker exits, past a grace
                # period): wait for its report, so the cancellation carries the usage.
                await asyncio.wait({usage.outstanding}, timeout=_ABANDONED_REPORT_WAIT_S)
            send(
                cancelled(request.id, usage.prompt_tokens, usage.completion_tokens, usage.compute_s)
            )
            return
        except Exception as exc:
            # The type only: a message could quote the request.
            logger.error("a sealed request failed", extra={"exc_type": type(exc).__name__})
            if exchange.streamed_some:
                # Part of the answer has left: end without the final chunk, so that the
                # client sees the answer cut short rather than a complete-looking one.
                send(_failed(request.id))
                return
            exchange.restart()
            await exchange.problem(500, "about:blank", "The request failed.")
        exchange.finish(usage)

    def _open(self, request: SealedRequest) -> tuple[bytes, Any]:
        now = time.time()
        keys = {
            key_id: key
            for key_id, (key, not_after) in self._gateway_keys.items()
            if not_after is None or not_after > now
        }
        if request.chunked:
            return ohttp.decapsulate_chunked_request(keys, request.data)
        return ohttp.decapsulate_request(keys, request.data)

    def _date_problem(self, inner: bhttp.Request) -> str | None:
        """Why the inner request's Date is unacceptable, or None if it is within the window."""
        window = self._keys.date_window_s if self._keys is not None else 60.0
        value = inner.header("date")
        if value is None:
            return "The encrypted request has no Date header field."
        last_value, last_time = self._last_date
        if value == last_value:
            sent = last_time
        else:
            try:
                parsed = email.utils.parsedate_to_datetime(value)
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=UTC)
                sent = parsed.timestamp()
            except (TypeError, ValueError, OverflowError):
                # A year of 20 digits, say: out of any clock's range.
                return "The encrypted request's Date header field is not a valid date."
            self._last_date = (value, sent)
        if abs(time.time() - sent) > window:
            return "date field in request outside of acceptable range"
        return None


class _Exchange:
    """The answer to one sealed request: buffered (message/ohttp-res) or chunked."""

    def __init__(self, request: SealedRequest, context: Any, send: Callable[[Message], None]):
        self._id = request.id
        self._chunked = request.chunked
        self._context = context
        self._send = send
        self.started = False
        self._status = 500
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._encoder = bhttp.ResponseEncoder()
        self._pending = b""
        # A chunked answer of which a chunk has left the worker.
        self.streamed_some = False

    async def asgi_send(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            self._status = int(message["status"])
            self._headers = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in message.get("headers", [])
            ]
            if self._chunked:
                # Sealed with the first piece of body: until then it can still be replaced.
                self._pending = self._encoder.head(self._status, _chunk_headers(self._headers))
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if not self._chunked:
                self._body.append(body)
                return
            # Each message stays well under the IPC frame limit, however big the body.
            for start in range(0, len(body), SEALED_CHUNK_BYTES):
                piece = self._encoder.body(body[start : start + SEALED_CHUNK_BYTES])
                self._send(SealedChunk(id=self._id, data=self._seal_chunk(piece)))

    async def problem(self, status: int, problem_type: str, title: str) -> None:
        """Answer with an RFC 9457 problem document, carrying the server's Date."""
        body = msgspec.json.encode({"type": problem_type, "title": title})
        await self.asgi_send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"date", email.utils.formatdate(usegmt=True).encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await self.asgi_send({"type": "http.response.body", "body": body})

    def _seal_chunk(self, plaintext: bytes) -> bytes:
        nonce = self._start_chunks()
        data: bytes = nonce + self._context.seal_chunk(self._pending + plaintext)
        self._pending = b""
        return data

    def _start_chunks(self) -> bytes:
        """The response nonce, which precedes the first chunk (b"" after that)."""
        if self.streamed_some:
            return b""
        self.streamed_some = True
        nonce: bytes = self._context.start()
        return nonce

    def restart(self) -> None:
        """Forget an answer begun but not sent (a whole answer, or nothing streamed yet)."""
        self.started = False
        self._body = []
        self._pending = b""
        self._encoder = bhttp.ResponseEncoder()

    def finish(self, usage: Usage) -> None:
        if self._chunked:
            nonce = self._start_chunks()
            data = nonce + self._context.seal_final(self._pending + self._encoder.end())
            self._pending = b""
        else:
            response = bhttp.Response(
                status=self._status, headers=tuple(self._headers), content=b"".join(self._body)
            )
            message = bhttp.encode_response(response)
            if len(message) > MAX_WHOLE_ANSWER_BYTES:
                # It would not fit in one IPC frame: say so, encrypted, instead.
                message = bhttp.encode_response(_too_large())
            data = self._context.seal(message)
        self._send(
            SealedResponse(
                id=self._id,
                data=data,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                compute_s=usage.compute_s,
                queue_s=usage.queue_s,
                batch_size=usage.batch_size,
            )
        )


def _too_large() -> bhttp.Response:
    body = msgspec.json.encode(
        {
            "error": {
                "message": "The answer is too large to send whole; ask for it with chunked "
                "OHTTP (message/ohttp-chunked-req).",
                "type": "server_error",
                "code": "answer_too_large",
                "param": None,
            }
        }
    )
    return bhttp.Response(status=500, headers=(("content-type", "application/json"),), content=body)


def _failed(request_id: int) -> RequestFailed:
    return RequestFailed(
        id=request_id,
        status=500,
        code="runtime_error",
        message="The model failed to process the request.",
    )


def _chunk_headers(headers: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    # An indeterminate-length message carries its own framing.
    return tuple((name, value) for name, value in headers if name.lower() != "content-length")


def _refusal(request_id: int, exc: ohttp.OhttpError) -> RequestFailed:
    """A failed decapsulation: the gateway answers it unencrypted, revealing only its kind."""
    if isinstance(exc, ohttp.UnknownKey | ohttp.UnsupportedSuite):
        code = "ohttp_key"
    elif isinstance(exc, ohttp.MalformedMessage):
        code = "ohttp_malformed"
    else:
        code = "ohttp_decrypt"
    return RequestFailed(
        id=request_id, status=400, code=code, message="The request could not be decrypted."
    )


def _scope(inner: bhttp.Request, pipeline: SealedCall) -> dict[str, Any]:
    """The ASGI scope of an inner request; its state carries the request's own pipeline."""
    path, _, query = inner.path.partition("?")
    headers = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in inner.headers
        if name not in ("content-length", "host", "authorization")
    ]
    headers.append((b"content-length", str(len(inner.content)).encode()))
    if inner.authority:
        headers.append((b"host", inner.authority.encode("latin-1")))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": inner.method,
        "scheme": inner.scheme or "https",
        "path": path,
        "raw_path": path.encode("latin-1", errors="replace"),
        "query_string": query.encode("latin-1", errors="replace"),
        "root_path": "",
        "headers": headers,
        "client": None,
        "server": None,
        "state": {PIPELINE_STATE: pipeline},
    }


def _receiver(content: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": content, "more_body": False}
        # The client of an inner request never disconnects; a cancelled task ends it.
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive
