"""Connection limits uvicorn lacks: a cap on open connections, timeouts for clients that
send their request too slowly or stop reading the answer, and word to the application
when a client leaves before its answer.

uvicorn closes a kept-alive connection only once it has been idle for a while after an
answer; a connection that never sends a whole request, sends its headers a byte at a time
(slowloris), or never reads the answer it asked for stays open, holding memory and a
place, for ever. :func:`protocol_class` gives uvicorn a protocol that:

- closes a new connection at once when ``max_connections`` are open;
- gives each request ``header_timeout_s`` from its first byte (from the connection's
  opening, for the first one) to finish its headers, then closes the connection: one
  sweep a second looks at every connection (so the clock is a second coarse), and
  nothing is armed per request;
- gives a client ``send_timeout_s`` to take what was written to it while the socket's
  buffer is full, then aborts the connection, which ends the answer and frees it;
- calls the functions a request put in ``scope["state"][ON_CLIENT_LEFT]`` (a list) when
  its connection is lost: ``api/access.py`` cancels the request then.

The body's own deadline is the route's (``body_timeout_s``, see ``api/body.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("bastion.transport")

# The key, in a request's scope["state"], of its connection's list of functions to call
# when the connection is lost.
ON_CLIENT_LEFT = "bastion.on_client_left"
# How often the connections are looked at for headers that take too long.
SWEEP_S = 1.0


def protocol_class(
    *, max_connections: int, header_timeout_s: float, send_timeout_s: float
) -> type[HttpToolsProtocol]:
    """An httptools protocol class for uvicorn with these limits."""
    sweep_s = min(SWEEP_S, header_timeout_s / 4)
    # The server's connections (uvicorn's own set), once the first one is made.
    sweeping: list[set[Any]] = []

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

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                logger.warning("too many connections; one refused", extra={"open": max_connections})
                transport.abort()
                return
            super().connection_made(transport)
            self._headers_since = self.loop.time()
            if not sweeping:
                sweeping.append(self.connections)
                self.loop.call_later(sweep_s, sweep, self.loop, self.connections)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.transport is None:
                return  # refused in connection_made: uvicorn never knew it
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
            self.scope["state"][ON_CLIENT_LEFT] = self._on_lost
            super().on_headers_complete()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(send_timeout_s, self._too_slow_to_read)

        def resume_writing(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            super().resume_writing()

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
