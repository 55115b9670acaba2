"""Connection limits uvicorn lacks: a cap on open connections, timeouts for clients that
send their request too slowly or stop reading the answer, and word to the application
when a client leaves before its answer.

uvicorn closes a kept-alive connection only once it has been idle for a while after an
answer; a connection that never sends a whole request, sends its headers a byte at a time
(slowloris), or never reads the answer it asked for stays open, holding memory and a
place, for ever. :func:`protocol_class` gives uvicorn a protocol that:

- closes a new connection at its accept, before any TLS handshake, when
  ``max_connections`` are open (those still in their handshake included);
- speaks the TLS of uvicorn's config itself (below), giving the handshake
  ``min(HANDSHAKE_TIMEOUT_S, header_timeout_s)``;
- gives each request ``header_timeout_s`` from its first byte (from the connection's
  accept, for the first one, the TLS handshake included) to finish its headers, then
  closes the connection: one sweep a second looks at every connection (so the clock is a
  second coarse), and nothing is armed per request;
- gives a client ``send_timeout_s`` to take what was written to it while the socket's
  buffer is full, then aborts the connection, which ends the answer and frees it;
- calls the functions a request put in ``scope["state"][ON_CLIENT_LEFT]`` (a list) when
  its connection is lost: ``api/access.py`` cancels the request then;
- lets the app write a whole answer's status line, headers and body in one system call
  (one segment for the client to read) where uvicorn makes two: ``scope["state"][WRITES]``
  holds the head until the body comes (api/fast.py uses it);
- tells the app when a request's whole body is in (``scope["state"][BODY_RECEIVED]``), so
  that reading it arms no deadline.

The body's own deadline is the route's (``body_timeout_s``, see ``api/body.py``).

Why the protocol does the TLS: a server made by ``loop.create_server(ssl=...)`` (as
uvicorn makes it) calls the protocol's ``connection_made`` only once the handshake is
done, tells it nothing of a connection whose handshake fails, and (from uvicorn) gives the
handshake asyncio's default 60 s: a client that connected and sent nothing held a socket
for a minute, counted toward no cap and on no header clock. So the listener binds plain
TCP (``bastion.listeners.ListenerServer``), and at each accept the protocol wraps the
connection in the event loop's own SSL protocol, as that server would, but knowing from
then on that the connection is there and, when its handshake ends, how.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import functools
import logging
import ssl
from collections.abc import Callable
from typing import Any

import uvloop
import uvloop.loop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import is_ssl

from bastion.api.body import BODY_RECEIVED

logger = logging.getLogger("bastion.transport")

# The key, in a request's scope["state"], of its connection's list of functions to call
# when the connection is lost.
ON_CLIENT_LEFT = "bastion.on_client_left"
# The key, in a request's scope["state"], of its connection's HeldWrites.
WRITES = "bastion.writes"
# The largest body written in one piece with the head before it (a copy of both).
_JOINED_BYTES = 64 * 1024
# How often the connections are looked at for headers that take too long.
SWEEP_S = 1.0
# The longest a TLS handshake may take (header_timeout_s, if shorter).
HANDSHAKE_TIMEOUT_S = 10.0


def protocol_class(
    *, max_connections: int, header_timeout_s: float, send_timeout_s: float
) -> type[HttpToolsProtocol]:
    """An httptools protocol class for uvicorn with these limits. With an SSL context in
    uvicorn's config, it speaks TLS on the plain TCP connections it is given."""
    sweep_s = min(SWEEP_S, header_timeout_s / 4)
    handshake_timeout_s = min(HANDSHAKE_TIMEOUT_S, header_timeout_s)
    # The server's connections (uvicorn's own set), once the first one is made.
    sweeping: list[set[Any]] = []
    # The connections in their TLS handshake: each holds a place toward max_connections.
    handshaking: set[BoundedHttpProtocol] = set()

    def sweep(loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        now = loop.time()
        for connection in list(connections):
            if isinstance(connection, BoundedHttpProtocol):
                connection.check_headers(now)
        loop.call_later(sweep_s, sweep, loop, connections)

    class BoundedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # When the headers now awaited began (loop time), or None between them.
            self._headers_since: float | None = None
            self._send_timer: asyncio.TimerHandle | None = None
            self._on_lost: list[Callable[[], None]] = []
            self._writes: HeldWrites | None = None
            # When the connection was accepted (loop time), and whether it is in its TLS
            # handshake.
            self._accepted = 0.0
            self._handshaking = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if self._handshaking:
                # Called again, by the SSL protocol: the handshake is done.
                self._handshaking = False
                handshaking.discard(self)
            else:
                # The accept.
                self._accepted = self.loop.time()
                if len(self.connections) + len(handshaking) >= max_connections:
                    logger.warning(
                        "too many connections; one refused", extra={"open": max_connections}
                    )
                    transport.abort()
                    return
                context = self.config.ssl
                if context is not None and not is_ssl(transport):
                    self._start_tls(transport, context)
                    return
            super().connection_made(transport)
            self._writes = HeldWrites(transport)
            # The first request's headers are due header_timeout_s after the accept.
            self._headers_since = self._accepted
            if not sweeping:
                sweeping.append(self.connections)
                self.loop.call_later(sweep_s, sweep, self.loop, self.connections)

        def _start_tls(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
            """Wrap the accepted connection in the loop's SSL protocol, as a TLS server of
            the loop's own would: it calls connection_made again once the handshake is
            done, or closes the connection if the handshake fails or takes too long."""
            waiter = self.loop.create_future()
            secure = _ssl_protocol(self.loop)(
                self.loop,
                self,
                context,
                waiter,
                server_side=True,
                ssl_handshake_timeout=handshake_timeout_s,
            )
            self._handshaking = True
            handshaking.add(self)
            waiter.add_done_callback(functools.partial(self._handshake_ended, transport))
            transport.set_protocol(secure)
            secure.connection_made(transport)

        def _handshake_ended(
            self, transport: asyncio.Transport, waiter: asyncio.Future[None]
        ) -> None:
            if not waiter.cancelled():
                waiter.exception()  # retrieved: asyncio would log it as never retrieved
            if self._handshaking:
                # It failed, took too long or the client left; uvicorn never knew it.
                self._handshaking = False
                handshaking.discard(self)
                transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.transport is None:
                return  # refused in connection_made, or never through its handshake
            self._headers_since = None
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            super().connection_lost(exc)
            on_lost, self._on_lost = self._on_lost, []
            for function in on_lost:
                function()

        def on_headers_complete(self) -> None:
            self._headers_since = None
            state = self.scope["state"]
            state[ON_CLIENT_LEFT] = self._on_lost
            super().on_headers_complete()
            writes = self._writes
            if writes is not None and self.cycle is not None and self.cycle.scope is self.scope:
                # The cycle writes through it; it holds nothing unless the app asks.
                self.cycle.transport = writes  # type: ignore[assignment]
                state[WRITES] = writes

        def on_message_complete(self) -> None:
            super().on_message_complete()
            # The whole body is here: reading it cannot wait (api/body.py arms no deadline).
            self.scope["state"][BODY_RECEIVED] = True

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(send_timeout_s, self._too_slow_to_read)

        def resume_writing(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            super().resume_writing()

        def _unsupported_upgrade_warning(self) -> None:
            # uvicorn's warnings that a WebSocket library is missing, for every request
            # with an Upgrade header: Bastion serves no WebSockets (ws="none") and answers
            # such a request as plain HTTP, and any client could fill the log with them.
            pass

        def check_headers(self, now: float) -> None:
            """Close the connection if the headers it owes are late."""
            if self._headers_since is None:
                between = self.cycle is None or self.cycle.response_complete
                if between and self.timeout_keep_alive_task is None:
                    # Bytes came after an answer (uvicorn's keep-alive clock stops at the
                    # first): the next request's headers' clock starts now, within a
                    # sweep of that byte.
                    self._headers_since = now
            elif now - self._headers_since > header_timeout_s:
                self._headers_since = None
                if not self.transport.is_closing():
                    self.transport.close()

        def _too_slow_to_read(self) -> None:
            self._send_timer = None
            if not self.transport.is_closing():
                logger.info("a client stopped reading its answer; connection closed")
                # abort(): close() would wait for the unread buffer to drain.
                self.transport.abort()

    return BoundedHttpProtocol


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The SSL protocol class of `loop`'s own TLS servers: uvloop's, or asyncio's."""
    if isinstance(loop, uvloop.Loop):
        # Not in uvloop's type stubs; the same signature as asyncio's.
        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
    return asyncio.sslproto.SSLProtocol


class HeldWrites:
    """A connection's transport as its requests' cycles write to it. Once the app calls
    :meth:`hold`, the next write (an answer's head) is held until the write after it (the
    body), which takes it along: one system call. The app that holds must write the body
    at once and then :meth:`release` (which writes nothing when the body took the head
    along). Closing writes what is held first; aborting drops it."""

    __slots__ = ("_held", "_hold_next", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._held: bytes | None = None
        self._hold_next = False

    def hold(self) -> None:
        """Hold the next write until the one after it (or release())."""
        self._hold_next = True

    def release(self) -> None:
        """Write what is held, if anything; hold nothing more."""
        self._hold_next = False
        held = self._held
        if held is not None:
            self._held = None
            if not self.transport.is_closing():
                self.transport.write(held)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= _JOINED_BYTES:
                self.transport.write(held + data)
                return
            # A big body is not copied to join it: two writes, as uvicorn makes them.
            self.transport.write(held)
            self.transport.write(data)
        elif self._hold_next:
            self._hold_next = False
            self._held = bytes(data)
        else:
            self.transport.write(data)

    def close(self) -> None:
        self.release()
        self.transport.close()

    def abort(self) -> None:
        self._held = None
        self._hold_next = False
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)
