"""Connection limits uvicorn lacks: a cap on open connections, and timeouts for clients
that send their request too slowly or stop reading the answer.

uvicorn closes a kept-alive connection only once it has been idle for a while after an
answer; a connection that never sends a whole request, sends its headers a byte at a time
(slowloris), or never reads the answer it asked for stays open, holding memory and a
place, for ever. :func:`protocol_class` gives uvicorn a protocol that:

- closes a new connection at once when ``max_connections`` are open;
- gives each request ``header_timeout_s`` from its first byte (from the connection's
  opening, for the first one) to finish its headers, then closes the connection;
- gives a client ``send_timeout_s`` to take what was written to it while the socket's
  buffer is full, then aborts the connection, which ends the answer and frees it.

The body's own deadline is the route's (``body_timeout_s``, see ``api/body.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("bastion.transport")


def protocol_class(
    *, max_connections: int, header_timeout_s: float, send_timeout_s: float
) -> type[HttpToolsProtocol]:
    """An httptools protocol class for uvicorn with these limits."""

    class BoundedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._send_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                logger.warning("too many connections; one refused", extra={"open": max_connections})
                transport.abort()
                return
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.transport is None:
                return  # refused in connection_made: uvicorn never knew it
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # A kept-alive connection's next request starts its own header clock.
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()
            super().data_received(data)

        def on_headers_complete(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
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

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def _too_slow_to_read(self) -> None:
            self._send_timer = None
            if not self.transport.is_closing():
                logger.info("a client stopped reading its answer; connection closed")
                # abort(): close() would wait for the unread buffer to drain.
                self.transport.abort()

        def _disarm(self) -> None:
            for timer in (self._header_timer, self._send_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._send_timer = None

    return BoundedHttpProtocol
