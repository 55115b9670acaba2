"""The gateway's side of one worker's IPC channel: requests, their replies, and faults.

A :class:`WorkerChannel` owns the worker's socket (:mod:`bastion.supervision.connection`) and
routes every message the worker sends as it arrives: the first Ready or LoadFailed to
:attr:`WorkerChannel.control`, heartbeats to :attr:`WorkerChannel.worker_in_flight`, and
replies to the request they answer. Sending never waits on the hot path: a frame is
queued on the transport at once, and callers wait only while the worker is not (yet)
connected or its socket's send buffer is full.

The worker is untrusted: anything it sends that does not fit the protocol (undecodable
bytes, a frame over the size limit, replies of the wrong kind, more unread output than
allowed), a connection from another process or a second connection is a *fault*. A fault
ends the channel: every pending request raises :class:`~bastion.errors.WorkerCrashed` at
once, and the supervisor replaces the worker.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path

import msgspec

from bastion.errors import ModelUnavailable, PayloadTooLarge, WorkerCrashed
from bastion.supervision.connection import WorkerConnection
from bastion.supervision.remote import WorkerPort
from bastion.wire.framing import (
    HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    encode_frame,
)
from bastion.wire.protocol import (
    Cancel,
    Embed,
    EmbedResult,
    ExtractionRisk,
    FromWorker,
    Generate,
    GenerateResult,
    Heartbeat,
    Infer,
    InferResult,
    LoadFailed,
    Notice,
    Ready,
    RequestFailed,
    SealedChunk,
    SealedRequest,
    SealedResponse,
    TextDelta,
    ToWorker,
    WatermarkRecord,
    WorkRequest,
)

logger = logging.getLogger("bastion.supervision.channel")

WORKER_CRASHED_MESSAGE = "The model's worker stopped; retry shortly."

Reply = (
    TextDelta | SealedChunk | GenerateResult | EmbedResult | InferResult | SealedResponse
) | RequestFailed
_FINAL_TYPES: Mapping[type[WorkRequest], type[Reply]] = {
    Generate: GenerateResult,
    Embed: EmbedResult,
    Infer: InferResult,
    SealedRequest: SealedResponse,
}
_PARTIAL_TYPES: Mapping[type[WorkRequest], type[Reply] | None] = {
    Generate: TextDelta,
    Embed: None,
    Infer: None,
    SealedRequest: SealedChunk,
}
# Called with a request's final reply as soon as it arrives, whether or not its caller is
# still reading: usage is settled even when the client has gone.
Settle = Callable[[Reply], None]
# Requests closed before their final reply, whose usage is still to be settled.
_MAX_UNSETTLED = 4096


class _Pending:
    """The replies of one request not yet read by its caller (None: the worker is gone)."""

    __slots__ = ("final_type", "finished", "loop", "partial_type", "replies", "settle", "waiter")

    def __init__(
        self, request: WorkRequest, loop: asyncio.AbstractEventLoop, settle: Settle | None
    ) -> None:
        self.settle = settle
        self.final_type = _FINAL_TYPES[type(request)]
        self.partial_type = _PARTIAL_TYPES[type(request)]
        self.finished = False
        self.loop = loop
        self.replies: collections.deque[tuple[Reply, int] | None] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def accepts(self, reply: FromWorker) -> bool:
        if isinstance(reply, TextDelta | SealedChunk):
            return type(reply) is self.partial_type
        return isinstance(reply, self.final_type | RequestFailed)

    def put(self, item: tuple[Reply, int] | None) -> None:
        self.replies.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> tuple[Reply, int] | None:
        while not self.replies:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.replies.popleft()


class WorkerChannel:
    """One listening socket, the worker's connection, and the requests waiting on it.

    Create it inside the running event loop whose tasks will use it, then :meth:`open` it
    before starting the worker and :meth:`expect_peer` once the worker's pid is known.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_buffered_bytes: int | None = None,
        retry_after_s: int = 1,
        on_fault: Callable[[str], None] | None = None,
        on_notice: Callable[[Notice], None] | None = None,
    ) -> None:
        #: The socket path the worker connects to (its ``--endpoint``).
        self.endpoint = str(Path(path))
        self._on_fault = on_fault
        # Where the worker's protection notices go (the gateway's protection desk).
        self._on_notice = on_notice
        # Replies the worker sent but the callers have not read yet, across all requests.
        self._max_buffered_bytes = max_buffered_bytes or 4 * max_message_bytes
        self._buffered_bytes = 0
        self._retry_after_s = retry_after_s
        self._loop = asyncio.get_running_loop()
        #: Resolves with the worker's first Ready or LoadFailed.
        self.control: asyncio.Future[Ready | LoadFailed] = self._loop.create_future()
        #: Resolves with the reason once the channel faults (the worker is treated as gone).
        self.faulted: asyncio.Future[str] = self._loop.create_future()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        # Request id -> settle callback of requests closed before their final reply.
        self._unsettled: dict[int, Settle] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._fault_reason: str | None = None
        self._opened = False
        self._connection = WorkerConnection(
            self.endpoint,
            max_message_bytes=max_message_bytes,
            on_message=self._route,
            on_fault=self.fail,
        )
        #: Requests the worker last said it holds (from its heartbeat).
        self.worker_in_flight = 0

    async def open(self) -> None:
        """Listen on the socket path for the worker's one connection."""
        await self._connection.open()
        self._opened = True

    def expect_certificate(self, port: WorkerPort, fingerprint: str) -> None:
        """A worker on another host (instead of :meth:`open` and :meth:`expect_peer`): it
        connects to `port` with the certificate whose SHA-256 fingerprint is given."""
        self._connection.expect_certificate(port, fingerprint)
        self._opened = True

    def expect_peer(self, pid: int | None, *, uid: int | None = None) -> None:
        """Accept the connection only from `pid` or a descendant of it.

        `pid` None means the sandbox cannot tell the worker's pid; any process running as
        `uid` (default: the gateway's own) is then accepted. A connection that arrived
        before this call is checked now.
        """
        self._connection.expect_peer(pid, uid=uid)

    @property
    def last_seen(self) -> float | None:
        """Monotonic time of the worker's last message; None until its first."""
        return self._connection.last_seen

    @property
    def in_flight(self) -> int:
        """Requests sent on this channel and not yet answered."""
        return len(self._pending)

    @property
    def fault_reason(self) -> str | None:
        return self._fault_reason

    # ------------------------------------------------------------------ sending

    async def send(self, message: ToWorker) -> None:
        """Send a control message; raises WorkerCrashed if the channel faults first.

        Waits for the worker's (verified) connection, and while the socket's send buffer
        is full; otherwise the message is queued at once and written at the end of the
        event loop's current turn.
        """
        await self._send_frame(self._frame(message))

    def send_nowait(self, message: ToWorker) -> None:
        """Send a message without waiting; it is lost if the worker is not connected."""
        if self._fault_reason is None and self._connection.verified:
            self._connection.write(self._frame(message))

    async def _send_frame(self, frame: bytearray) -> None:
        connection = self._connection
        if not connection.writable.is_set():
            await connection.writable.wait()
        if self._fault_reason is not None or connection.closed:
            raise self._crashed()
        connection.write(frame)

    def _frame(self, message: ToWorker) -> bytearray:
        frame = encode_frame(message)
        # The worker reads frames up to the default limit; it would drop a bigger one.
        if len(frame) - HEADER_BYTES > MAX_MESSAGE_BYTES:
            raise PayloadTooLarge("The request is too large for the model's worker.")
        return frame

    # ------------------------------------------------------------------ requests

    async def request(
        self, message: WorkRequest, settle: Settle | None = None
    ) -> AsyncGenerator[Reply, None]:
        """Send `message` and yield its TextDeltas, then its result or RequestFailed.

        The channel numbers requests itself; the `id` of `message` is replaced. Closing the
        iterator early (the client left, a timeout) tells the worker to cancel the request;
        the worker still reports the work it did, and `settle` gets that final reply when
        it arrives (as it gets every final reply, read or not).
        """
        request_id, pending, frame = self._register(message, settle)
        finished = sent = False
        try:
            await self._send_frame(frame)
            sent = True
            while True:
                item = pending.replies.popleft() if pending.replies else await pending.get()
                if item is None:
                    raise self._crashed()
                reply, size = item
                self._buffered_bytes -= size
                if isinstance(reply, TextDelta | SealedChunk):
                    yield reply
                    continue
                # Unregister before handing over the result, so a caller that stops
                # iterating here does not hold a slot until the generator is collected.
                finished = True
                self._forget(request_id)
                yield reply
                return
        finally:
            if not finished:
                self._abandon(request_id, pending, sent)

    async def call(self, message: WorkRequest, settle: Settle | None = None) -> Reply:
        """Send `message` and return its result or RequestFailed (its TextDeltas, if any,
        are skipped): :meth:`request` read to its end, without an async generator.
        Cancelled before the final reply, it tells the worker to cancel the request, and
        `settle` still gets the final reply when it arrives."""
        request_id, pending, frame = self._register(message, settle)
        finished = sent = False
        try:
            connection = self._connection
            if (
                connection.writable.is_set()
                and self._fault_reason is None
                and not connection.closed
            ):
                connection.write(frame)  # _send_frame()'s way when it need not wait
            else:
                await self._send_frame(frame)
            sent = True
            replies = pending.replies
            while True:
                if not replies:
                    # _Pending.get(), in this frame.
                    waiter = pending.waiter = self._loop.create_future()
                    try:
                        await waiter
                    finally:
                        pending.waiter = None
                    continue
                item = replies.popleft()
                if item is None:
                    raise self._crashed()
                reply, size = item
                self._buffered_bytes -= size
                if isinstance(reply, TextDelta | SealedChunk):
                    continue
                finished = True
                self._forget(request_id)
                return reply
        finally:
            if not finished:
                self._abandon(request_id, pending, sent)

    def _register(
        self, message: WorkRequest, settle: Settle | None
    ) -> tuple[int, _Pending, bytearray]:
        """Number a new request, frame it and wait for its replies (or refuse it now)."""
        if self._fault_reason is not None:
            raise self._crashed()
        if self._draining:
            raise ModelUnavailable(
                "The model is being stopped; retry shortly.", retry_after_s=self._retry_after_s
            )
        request_id = next(self._ids)
        frame = self._frame(msgspec.structs.replace(message, id=request_id))
        pending = _Pending(message, self._loop, settle)
        self._pending[request_id] = pending
        self._idle.clear()
        return request_id, pending, frame

    def _abandon(self, request_id: int, pending: _Pending, sent: bool) -> None:
        """A request ended before its final reply was read (cancelled, failed)."""
        self._forget(request_id)
        # A request whose final reply already arrived has nothing left to cancel; one
        # never sent (cancelled while waiting to send) has nothing to settle.
        if self._fault_reason is None and not pending.finished and sent:
            settle = pending.settle
            if settle is not None:
                self._unsettled[request_id] = settle
                if len(self._unsettled) > _MAX_UNSETTLED:
                    del self._unsettled[next(iter(self._unsettled))]
            self.send_nowait(Cancel(id=request_id))

    def _forget(self, request_id: int) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            for item in pending.replies:
                if item is not None:
                    self._buffered_bytes -= item[1]
            pending.replies.clear()
        if not self._pending:
            self._idle.set()

    def start_draining(self) -> None:
        """Refuse new requests (ModelUnavailable); those already sent go on."""
        self._draining = True

    async def wait_idle(self) -> None:
        """Wait until no request is pending."""
        await self._idle.wait()

    # ------------------------------------------------------------------ faults

    def fail(self, reason: str, *, retry_after_s: int | None = None) -> None:
        """Mark the worker as gone: every pending request raises WorkerCrashed now."""
        if retry_after_s is not None:
            self._retry_after_s = retry_after_s
        if self._fault_reason is not None:
            return
        self._fault_reason = reason
        if not self.faulted.done():
            self.faulted.set_result(reason)
        self._connection.close()
        self._unsettled.clear()
        for pending in self._pending.values():
            pending.put(None)
        if self._on_fault is not None:
            self._on_fault(reason)

    def _crashed(self) -> WorkerCrashed:
        return WorkerCrashed(WORKER_CRASHED_MESSAGE, retry_after_s=self._retry_after_s)

    # ------------------------------------------------------------------ receiving

    def _route(self, message: FromWorker, size: int) -> None:
        if isinstance(message, Heartbeat):
            self.worker_in_flight = message.in_flight
            return
        if isinstance(message, ExtractionRisk | WatermarkRecord):
            if self._on_notice is not None:
                try:
                    self._on_notice(message)
                except Exception as exc:
                    # A notice is bookkeeping: it never takes the worker's requests down.
                    logger.warning(
                        "a protection notice failed", extra={"exc_type": type(exc).__name__}
                    )
            return
        if isinstance(message, Ready | LoadFailed):
            if self.control.done():
                self.fail(f"the worker sent an unexpected {type(message).__name__}")
            else:
                self.control.set_result(message)
            return
        pending = self._pending.get(message.id)
        if pending is None or pending.finished:
            # The answer to a request that was cancelled or already ended.
            if not isinstance(message, TextDelta | SealedChunk):
                settle = self._unsettled.pop(message.id, None)
                if settle is not None:
                    _settle(settle, message)
            return
        if not pending.accepts(message):
            self.fail(f"the worker sent an unexpected {type(message).__name__}")
            return
        self._buffered_bytes += size
        if self._buffered_bytes > self._max_buffered_bytes:
            self.fail("the worker sent more output than the gateway buffers")
            return
        pending.finished = not isinstance(message, TextDelta | SealedChunk)
        # Settled before the caller is woken: the usage (and its journal entry) comes
        # before the answer can leave.
        if pending.finished and pending.settle is not None:
            _settle(pending.settle, message)
        pending.put((message, size))

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Fail what is pending, stop listening and drop the connection."""
        if self._opened:
            self.fail("the channel was closed")
        self._connection.close()


def _settle(settle: Settle, reply: Reply) -> None:
    """Account a reply; a failure there is logged, never a fault of the channel."""
    try:
        settle(reply)
    except Exception as exc:
        logger.error("settling a request's usage failed", extra={"exc_type": type(exc).__name__})
