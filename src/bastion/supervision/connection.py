"""The gateway's end of one worker's Unix socket: listen, accept the worker once, move frames.

The gateway listens on a socket file (mode 0600) in the worker's private 0700 directory
and accepts exactly one connection, whose peer it checks with SO_PEERCRED
(:mod:`bastion.supervision.peer`); then it stops listening and removes the file, so nothing
else can connect. A connection that arrives before the worker's pid is known is held,
unread, until :meth:`WorkerConnection.expect_peer` checks it.

Bytes from the worker are cut into frames (:mod:`bastion.wire.framing`), decoded and
handed to `on_message` synchronously, in the same callback that read them. Anything that
breaks the rules (another process, a second connection, an oversized or undecodable frame,
the connection closing) is reported once to `on_fault`, after which the connection is
dropped and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import cast

import msgspec

from bastion.supervision.peer import PeerRejected, check_peer, peer_credentials
from bastion.supervision.remote import WorkerPort
from bastion.wire.framing import FrameDecoder, FrameTooLarge
from bastion.wire.protocol import FromWorker, decode_from_worker

# Frames queued for one write are written early once they add up to this much.
_FLUSH_BYTES = 256 * 1024


class WorkerConnection:
    """One listening socket and the one connection it accepts.

    Create it inside the running event loop that will use it.
    """

    def __init__(
        self,
        path: str,
        *,
        max_message_bytes: int,
        on_message: Callable[[FromWorker, int], None],
        on_fault: Callable[[str], None],
    ) -> None:
        self.path = path
        self.max_message_bytes = max_message_bytes
        self._on_message = on_message
        self._on_fault = on_fault
        self._loop = asyncio.get_running_loop()
        self._server: asyncio.AbstractServer | None = None
        self._listening = False
        self._protocol: _Protocol | None = None
        self._transport: asyncio.Transport | None = None
        # Who may connect: set by expect_peer; until then a connection waits, unread.
        self._peer_rule: tuple[int | None, int] | None = None
        self.verified = False
        self.closed = False
        #: Set while frames may be written: the peer is verified and the transport is not
        #: paused. Also set once closed, so that waiting writers wake up (and see `closed`).
        self.writable = asyncio.Event()
        self._outbox: list[bytearray] = []
        self._outbox_bytes = 0
        #: Monotonic time of the worker's last message; None until its first.
        self.last_seen: float | None = None
        # A remote worker: the port its connection arrives on, and its pinned certificate.
        self._remote: tuple[WorkerPort, str] | None = None

    def expect_certificate(self, port: WorkerPort, fingerprint: str) -> None:
        """A worker on another host (instead of :meth:`open` and :meth:`expect_peer`): its
        connection arrives on `port`, presenting the certificate with `fingerprint`, which
        the port checked before handing it here."""
        self._remote = (port, fingerprint)
        port.expect(fingerprint, self)

    def adopt(self, transport: asyncio.Transport) -> asyncio.Protocol:
        """The worker port's connection with this worker's certificate: the protocol that
        takes its bytes from here on."""
        if self._protocol is not None or self.closed:
            transport.abort()
            return _Refused(self)
        self._protocol = _Protocol(self)
        self._protocol.connection_made(transport)
        return self._protocol

    async def open(self) -> None:
        """Listen on the socket path, readable and writable by the gateway's user only."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            # Nobody can connect before listen(), so the mode is right before it matters.
            os.chmod(self.path, 0o600)
            listener.listen(1)
            listener.setblocking(False)
            self._server = await self._loop.create_unix_server(self._new_protocol, sock=listener)
        except BaseException:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            raise
        self._listening = True

    def expect_peer(self, pid: int | None, *, uid: int | None = None) -> None:
        """Accept the connection only from `pid` or a descendant of it.

        `pid` None means the sandbox cannot tell the worker's pid; any process running as
        `uid` (default: the gateway's own) is then accepted. A connection that arrived
        before this call is checked now.
        """
        self._peer_rule = (pid, os.getuid() if uid is None else uid)
        if self._transport is not None and not self.verified:
            self._verify()

    def write(self, frame: bytearray) -> None:
        """Queue `frame`; frames queued in one turn of the event loop leave together.

        Many requests are woken by one read, and each sends its next frame: writing them
        at the end of the turn takes one system call instead of one each.
        """
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        if self._outbox_bytes >= _FLUSH_BYTES:
            # Past this much, write now so that the transport's flow control sees it.
            self._flush()

    def close(self) -> None:
        """Stop listening and drop the connection; nothing more is read or written."""
        self.closed = True
        self.writable.set()
        self._stop_listening()
        if self._remote is not None:
            port, fingerprint = self._remote
            port.forget(fingerprint)
        self._outbox = []
        if self._transport is not None:
            self._transport.abort()

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        self._outbox_bytes = 0
        if outbox and not self.closed and self._transport is not None:
            self._transport.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))

    def _fault(self, reason: str) -> None:
        if not self.closed:
            self.close()
            self._on_fault(reason)

    # ------------------------------------------------------------------ accepting

    def _new_protocol(self) -> asyncio.Protocol:
        if self._protocol is None and not self.closed:
            self._protocol = _Protocol(self)
            return self._protocol
        return _Refused(self)

    def _connection_made(self, transport: asyncio.Transport) -> None:
        # One connection only: nothing else can reach the socket from here on.
        self._stop_listening()
        self._transport = transport
        if self._remote is not None:
            # The port matched its certificate to the one issued for this worker.
            self.verified = True
            self.writable.set()
            return
        if self._peer_rule is None:
            # The worker's pid is not known yet; hold its messages until it is.
            transport.pause_reading()
        else:
            self._verify()

    def _verify(self) -> None:
        assert self._transport is not None and self._peer_rule is not None
        pid, uid = self._peer_rule
        try:
            sock = self._transport.get_extra_info("socket")
            check_peer(peer_credentials(sock), pid=pid, uid=uid)
        except PeerRejected as exc:
            self._fault(str(exc))
            return
        except OSError:
            self._fault("the worker's connection has no readable credentials")
            return
        self.verified = True
        self.writable.set()
        if self._protocol is not None:
            self._protocol.release()

    def _stop_listening(self) -> None:
        if not self._listening:
            return
        self._listening = False
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _pause_writing(self) -> None:
        if not self.closed:
            self.writable.clear()

    def _resume_writing(self) -> None:
        self.writable.set()


class _Protocol(asyncio.Protocol):
    """The worker's connection: cuts its bytes into frames and routes each one at once."""

    def __init__(self, connection: WorkerConnection) -> None:
        self._connection = connection
        self._decoder = FrameDecoder(connection.max_message_bytes)
        self._transport: asyncio.Transport | None = None
        # What arrived before the peer was checked: uvloop starts reading right after
        # connection_made even if it paused reading there, so at most one chunk.
        self._held: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._connection._connection_made(self._transport)

    def release(self) -> None:
        """The peer passed its check: handle what it sent meanwhile, then read on."""
        held, self._held = self._held, []
        for data in held:
            self.data_received(data)
        if self._transport is not None and not self._connection.closed:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        connection = self._connection
        if connection.closed:
            return
        if not connection.verified:
            self._held.append(data)
            if self._transport is not None:
                self._transport.pause_reading()
            return
        try:
            bodies = self._decoder.feed(data)
        except FrameTooLarge as exc:
            connection._fault(f"the worker announced a message of {exc.size} bytes, over the limit")
            return
        if not bodies:
            return
        connection.last_seen = time.monotonic()
        on_message = connection._on_message
        for body in bodies:
            try:
                message = decode_from_worker(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                connection._fault("the worker sent a message that does not decode")
                return
            on_message(message, len(body))
            if connection.closed:
                return

    def eof_received(self) -> bool:
        self._connection._fault("the worker's connection closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection._fault("the worker's connection closed")

    def pause_writing(self) -> None:
        self._connection._pause_writing()

    def resume_writing(self) -> None:
        self._connection._resume_writing()


class _Refused(asyncio.Protocol):
    """Any connection after the first: dropped, and a fault."""

    def __init__(self, connection: WorkerConnection) -> None:
        self._connection = connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
        self._connection._fault("a second connection reached the worker's socket")
