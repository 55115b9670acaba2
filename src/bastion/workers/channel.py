"""The gateway's side of one worker's IPC channel.

The gateway binds a ZeroMQ DEALER socket in the worker's private directory and the worker
connects to it. One receive task decodes every message the worker sends and routes it: the
first Ready or LoadFailed to :attr:`WorkerChannel.control`, heartbeats to
:attr:`WorkerChannel.last_seen`, and replies to the request they answer. The worker is
untrusted: anything it sends that does not fit the protocol (undecodable bytes, oversized
messages, replies of the wrong kind, a second connection, more unread output than allowed)
is a *fault*. A fault ends the channel: every pending request raises
:class:`~bastion.errors.WorkerCrashed` at once, and the supervisor replaces the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from bastion.errors import ModelUnavailable, WorkerCrashed
from bastion.workers.protocol import (
    Cancel,
    Embed,
    EmbedResult,
    FromWorker,
    Generate,
    GenerateResult,
    Heartbeat,
    Infer,
    InferResult,
    LoadFailed,
    Ready,
    RequestFailed,
    TextDelta,
    ToWorker,
    decode_from_worker,
    encode,
)

logger = logging.getLogger("bastion.workers.channel")

MiB = 1024 * 1024
# Largest message accepted from a worker; ZeroMQ drops the connection on a bigger one,
# so a hostile worker cannot make the gateway allocate without bound.
MAX_MESSAGE_BYTES = 64 * MiB
_SEND_HWM = 1_000
_RECEIVE_HWM = 10_000
WORKER_CRASHED_MESSAGE = "The model's worker stopped; retry shortly."

WorkRequest = Generate | Embed | Infer
Reply = TextDelta | GenerateResult | EmbedResult | InferResult | RequestFailed
_FINAL_TYPES: Mapping[type[WorkRequest], type[Reply]] = {
    Generate: GenerateResult,
    Embed: EmbedResult,
    Infer: InferResult,
}


class _Pending:
    """The replies of one request not yet read by its caller (None: the worker is gone)."""

    __slots__ = ("final_type", "finished", "queue", "streams")

    def __init__(self, request: WorkRequest) -> None:
        self.final_type = _FINAL_TYPES[type(request)]
        self.streams = isinstance(request, Generate)
        self.finished = False
        self.queue: asyncio.Queue[tuple[Reply, int] | None] = asyncio.Queue()

    def accepts(self, reply: FromWorker) -> bool:
        if isinstance(reply, TextDelta):
            return self.streams
        return isinstance(reply, self.final_type | RequestFailed)


class WorkerChannel:
    """One bound socket, its receive task, and the requests waiting on it.

    Create it inside the running event loop whose tasks will use it.
    """

    def __init__(
        self,
        context: zmq.asyncio.Context,
        endpoint: str,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_buffered_bytes: int | None = None,
        retry_after_s: int = 1,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._on_fault = on_fault
        self._context = context
        self._max_message_bytes = max_message_bytes
        # Replies the worker sent but the callers have not read yet, across all requests.
        self._max_buffered_bytes = max_buffered_bytes or 4 * max_message_bytes
        self._buffered_bytes = 0
        self._retry_after_s = retry_after_s
        loop = asyncio.get_running_loop()
        #: Resolves with the worker's first Ready or LoadFailed.
        self.control: asyncio.Future[Ready | LoadFailed] = loop.create_future()
        #: Resolves with the reason once the channel faults (the worker is treated as gone).
        self.faulted: asyncio.Future[str] = loop.create_future()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._fault_reason: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        #: Monotonic time of the worker's last message; None until its first.
        self.last_seen: float | None = None
        #: Requests the worker last said it holds (from its heartbeat).
        self.worker_in_flight = 0

    def open(self) -> None:
        """Bind the socket and start receiving."""
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, _SEND_HWM)
        socket.setsockopt(zmq.RCVHWM, _RECEIVE_HWM)
        socket.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
        self._monitor = socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        socket.bind(self.endpoint)
        self._socket = socket
        self._tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._watch_connections()),
        ]

    @property
    def in_flight(self) -> int:
        """Requests sent on this channel and not yet answered."""
        return len(self._pending)

    @property
    def fault_reason(self) -> str | None:
        return self._fault_reason

    # ------------------------------------------------------------------ sending

    async def send(self, message: ToWorker) -> None:
        """Send a control message; raises WorkerCrashed if the channel faults first."""
        socket = self._require_socket()
        try:
            future = asyncio.ensure_future(socket.send(encode(message)))
        except zmq.ZMQError as exc:
            raise self._crashed() from exc
        if not future.done():
            try:
                waiting: set[asyncio.Future[Any]] = {future, self.faulted}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                future.cancel()
                raise
            if not future.done():
                future.cancel()
                raise self._crashed()
        if future.cancelled() or future.exception() is not None:
            raise self._crashed()

    def send_nowait(self, message: ToWorker) -> None:
        """Queue a message without waiting; it is lost if the channel is closing."""
        if self._socket is None or self._socket.closed:
            return
        try:
            future = asyncio.ensure_future(self._socket.send(encode(message)))
        except zmq.ZMQError:
            return
        future.add_done_callback(_retrieve_outcome)

    # ------------------------------------------------------------------ requests

    async def request(self, message: WorkRequest) -> AsyncGenerator[Reply, None]:
        """Send `message` and yield its TextDeltas, then its result or RequestFailed.

        The channel numbers requests itself; the `id` of `message` is replaced. Closing the
        iterator early (the client left, a timeout) tells the worker to cancel the request.
        """
        if self._fault_reason is not None:
            raise self._crashed()
        if self._draining:
            raise ModelUnavailable(
                "The model is being stopped; retry shortly.", retry_after_s=self._retry_after_s
            )
        request_id = next(self._ids)
        pending = _Pending(message)
        self._pending[request_id] = pending
        self._idle.clear()
        finished = False
        try:
            await self.send(msgspec.structs.replace(message, id=request_id))
            while True:
                item = await pending.queue.get()
                if item is None:
                    raise self._crashed()
                reply, size = item
                self._buffered_bytes -= size
                if isinstance(reply, TextDelta):
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
                self._forget(request_id)
                if self._fault_reason is None:
                    self.send_nowait(Cancel(id=request_id))

    def _forget(self, request_id: int) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            while not pending.queue.empty():
                item = pending.queue.get_nowait()
                if item is not None:
                    self._buffered_bytes -= item[1]
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
        for pending in self._pending.values():
            pending.queue.put_nowait(None)
        if self._on_fault is not None:
            self._on_fault(reason)

    def _crashed(self) -> WorkerCrashed:
        return WorkerCrashed(WORKER_CRASHED_MESSAGE, retry_after_s=self._retry_after_s)

    # ------------------------------------------------------------------ receiving

    async def _receive(self) -> None:
        socket = self._require_socket()
        while self._fault_reason is None:
            try:
                frames = await socket.recv_multipart()
            except zmq.ZMQError as exc:
                self.fail(f"the worker's socket failed (errno {exc.errno})")
                return
            if len(frames) != 1:
                self.fail("the worker sent a multi-part message")
                return
            try:
                message = decode_from_worker(frames[0])
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.fail("the worker sent a message that does not decode")
                return
            self.last_seen = time.monotonic()
            self._route(message, len(frames[0]))

    def _route(self, message: FromWorker, size: int) -> None:
        if isinstance(message, Heartbeat):
            self.worker_in_flight = message.in_flight
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
            return
        if not pending.accepts(message):
            self.fail(f"the worker sent an unexpected {type(message).__name__}")
            return
        self._buffered_bytes += size
        if self._buffered_bytes > self._max_buffered_bytes:
            self.fail("the worker sent more output than the gateway buffers")
            return
        pending.finished = not isinstance(message, TextDelta)
        pending.queue.put_nowait((message, size))

    async def _watch_connections(self) -> None:
        """Treat a dropped or second connection as a fault (ZeroMQ would hide both)."""
        assert self._monitor is not None
        connections = 0
        while True:
            try:
                frames = await self._monitor.recv_multipart()
            except zmq.ZMQError:
                return
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_ACCEPTED:
                connections += 1
                if connections > 1:
                    self.fail("a second connection reached the worker's socket")
            elif event == zmq.EVENT_DISCONNECTED:
                # Also how ZeroMQ reports a message over MAXMSGSIZE: it drops the peer.
                self.fail("the worker's connection closed")
            elif event == zmq.EVENT_MONITOR_STOPPED:
                return

    def _require_socket(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            raise RuntimeError("WorkerChannel.open() was not called")
        return self._socket

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Fail what is pending, stop the tasks and close the sockets."""
        if self._socket is not None:
            self.fail("the channel was closed")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._socket is not None and not self._socket.closed:
            with contextlib.suppress(zmq.ZMQError):
                self._socket.disable_monitor()
            self._socket.close(linger=0)
        if self._monitor is not None and not self._monitor.closed:
            self._monitor.close(linger=0)


def _retrieve_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
