"""The gateway's worker port: where replicas on other hosts connect, over mutual TLS 1.3.

A local worker connects to a Unix socket that only its own process may use (SO_PEERCRED,
:mod:`bastion.supervision.peer`). A replica on another host (placed by Ray,
:mod:`bastion.sandboxes.ray`) dials this port instead. The TLS context requires a client
certificate from the cluster's CA; beyond that, a connection is handed to a worker's
channel only if its certificate is the very one issued for a replica the gateway launched
and is waiting for (pinned by SHA-256 fingerprint), and only once: any other connection is
dropped before a byte of it is read, and counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from bastion.supervision.connection import WorkerConnection

logger = logging.getLogger("bastion.supervision.remote")
# A replica that connects but does not finish its handshake in this time is dropped.
HANDSHAKE_TIMEOUT_S = 10.0


class WorkerPort:
    """One TCP listener with TLS, shared by every remote worker of this gateway.

    Create and start it inside the running event loop that will use it."""

    def __init__(self, context: ssl.SSLContext, host: str, port: int) -> None:
        self._context = context
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop
        self._expected: dict[str, WorkerConnection] = {}
        self._starting: asyncio.Lock | None = None
        #: Connections refused since start (no pinned certificate, or one already used).
        self.refused = 0

    @property
    def address(self) -> tuple[str, int]:
        """The address it listens on (its port once started, if 0 was asked for)."""
        if self._server is not None and self._server.sockets:
            host, port = self._server.sockets[0].getsockname()[:2]
            return str(host), int(port)
        return self._host, self._port

    async def start(self) -> None:
        """Listen (once; later calls return at once)."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._server is None:
                await self._listen()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._server = await loop.create_server(
            lambda: _Inbound(self),
            self._host,
            self._port,
            ssl=self._context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
            reuse_address=True,
        )

    def close(self) -> None:
        """Stop listening (from any thread); connections already handed over stay."""
        server, self._server = self._server, None
        if server is not None:
            self._loop.call_soon_threadsafe(server.close)
        self._expected.clear()

    def expect(self, fingerprint: str, connection: WorkerConnection) -> None:
        """Hand the connection that presents the certificate with this fingerprint to
        `connection` (once)."""
        self._expected[fingerprint] = connection

    def forget(self, fingerprint: str) -> None:
        self._expected.pop(fingerprint, None)

    def _claim(self, transport: asyncio.Transport) -> WorkerConnection | None:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return None
        return self._expected.pop(hashlib.sha256(der).hexdigest(), None)


class _Inbound(asyncio.Protocol):
    """A connection to the worker port: claimed by the channel whose certificate it
    presents, then every event goes to that channel's protocol."""

    def __init__(self, port: WorkerPort) -> None:
        self._port = port
        self._target: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called once the TLS handshake completed: the client's certificate is known.
        stream = cast(asyncio.Transport, transport)
        connection = self._port._claim(stream)
        if connection is None:
            self._port.refused += 1
            peer = transport.get_extra_info("peername")
            logger.warning(
                "refused a connection to the worker port: not a replica this gateway awaits",
                extra={"peer": str(peer[0]) if peer else None},
            )
            stream.abort()
            return
        self._target = connection.adopt(stream)

    def data_received(self, data: bytes) -> None:
        if self._target is not None:
            self._target.data_received(data)

    def eof_received(self) -> bool | None:
        if self._target is not None:
            return self._target.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._target is not None:
            self._target.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._target is not None:
            self._target.pause_writing()

    def resume_writing(self) -> None:
        if self._target is not None:
            self._target.resume_writing()
