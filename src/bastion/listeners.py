"""The gateway's listeners: the address, routes and TLS of each, and serving them all on
one event loop with one lifespan.

By default one listener serves every route. With ``BASTION_ADMIN_LISTEN`` the admin API
has a listener of its own (the health probes too), which may require client
certificates; the public listener then answers admin routes 404. Both are uvicorn servers
on the same event loop, over the same services: the control plane starts once before
either accepts a connection and stops once after both have stopped accepting and drained
(:func:`serve_all`). Each listener's answers carry api/headers.py's security headers, HSTS
on a TLS one.

A TLS listener binds plain TCP (:class:`ListenerServer`): its protocol
(``api/transport.py``) speaks the TLS, so that it counts a connection from its accept and
gives its handshake a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.types import ASGIApp
from uvicorn.config import STARTUP_FAILURE
from uvicorn.lifespan.off import LifespanOff
from uvicorn.lifespan.on import LifespanOn
from uvicorn.server import HANDLED_SIGNALS

from bastion.api.headers import security_headers
from bastion.api.serving import Serving
from bastion.api.transport import protocol_class
from bastion.config import Settings
from bastion.tls import server_context

logger = logging.getLogger("bastion.server")


@dataclass(frozen=True, slots=True)
class Listener:
    """One address the gateway answers on: the routes it serves and its TLS, if any."""

    host: str
    port: int
    serving: Serving
    tls: ssl.SSLContext | None = None
    # Whether the TLS context requires client certificates (mutual TLS).
    client_certificates: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}"


def plan(settings: Settings) -> list[Listener]:
    """The listeners `settings` ask for, the one serving inference first; ConfigurationError
    if the settings do not fit together or a TLS file cannot be used."""
    config = settings.listeners()
    tls = server_context(*config.tls) if config.tls is not None else None
    if config.admin is None:
        return [Listener(settings.host, settings.port, Serving.ALL, tls)]
    admin_tls = tls
    if config.tls is not None and config.admin_client_ca is not None:
        admin_tls = server_context(*config.tls, client_ca=config.admin_client_ca)
    host, port = config.admin
    return [
        Listener(settings.host, settings.port, Serving.PUBLIC, tls),
        Listener(host, port, Serving.ADMIN, admin_tls, config.admin_client_ca is not None),
    ]


def warn_exposure(listeners: list[Listener]) -> None:
    """Log what an operator should know about where the gateway listens."""
    for listener in listeners:
        where = {"listener": listener.serving.value, "url": listener.url}
        if is_loopback(listener.host):
            continue
        if listener.serving is Serving.ADMIN:
            logger.warning(
                "the ADMIN listener is on a non-loopback address: every client that can "
                "reach it can try admin keys"
                + ("" if listener.client_certificates else " (no client certificates required)"),
                extra=where,
            )
        else:
            logger.warning(
                "listening on a non-loopback address: every client that can reach it can try keys",
                extra=where,
            )
        if listener.tls is None:
            logger.warning(
                "TLS is off on a non-loopback address: keys and data cross the network in the "
                "clear (--tls-cert, --tls-key)",
                extra=where,
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ListenerServer(uvicorn.Server):
    """uvicorn's server, binding plain TCP even for a TLS listener.

    uvicorn's Server.startup hands its config's SSL context to ``loop.create_server``,
    whose server tells the protocol of a connection only once its handshake is done, and
    nothing of one whose handshake fails or never ends (within asyncio's default 60 s).
    api/transport.py's protocol speaks that context's TLS itself, from the accept; this
    startup is uvicorn's for a host and port, without the ``ssl`` argument.
    """

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # A listener has a host and port only (no sockets given, no fd, no Unix socket).
        assert sockets is None and self.config.uds is None and self.config.fd is None
        # A no-op under serve_all, which runs the one lifespan itself.
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config
        loop = asyncio.get_running_loop()

        def connection() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
            )
            return protocol

        try:
            server = await loop.create_server(
                connection,
                host=config.host,
                port=config.port,
                backlog=config.backlog,
            )
        except OSError as exc:
            logger.error("cannot listen: %s", exc)
            await self.lifespan.shutdown()
            sys.exit(STARTUP_FAILURE)
        self.servers = [server]
        assert server.sockets is not None
        # "https://" where the config has an SSL context.
        self._log_started_message(server.sockets)
        self.started = True


def uvicorn_server(listener: Listener, app: ASGIApp, settings: Settings) -> uvicorn.Server:
    """A uvicorn server for `listener` (it does not run the app's lifespan: serve_all does)."""
    context = listener.tls

    def ssl_context(
        config: uvicorn.Config, default: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        # The context bastion.tls built, as it is (uvicorn's ssl_* options would build a
        # context of their own).
        assert context is not None
        return context

    config = uvicorn.Config(
        app,
        host=listener.host,
        port=listener.port,
        loop="uvloop",
        # httptools, with a cap on connections and timeouts for slow or stalled clients;
        # it speaks the TLS of ssl_context_factory's context (ListenerServer).
        http=protocol_class(
            max_connections=settings.max_connections,
            header_timeout_s=settings.header_timeout_s,
            send_timeout_s=settings.send_timeout_s,
        ),
        # Bastion serves no WebSockets: an upgrade request is answered as the HTTP request
        # it also is, with the security headers (uvicorn's WebSocket protocols, which
        # would answer it instead, write none of them).
        ws="none",
        timeout_keep_alive=max(1, round(settings.keepalive_timeout_s)),
        # A client is known by the connection's address: X-Forwarded-* is not trusted
        # (docs/tls.md, behind a reverse proxy), and its middleware would cost every
        # request a layer.
        proxy_headers=False,
        lifespan="on" if listener.serving is not Serving.ADMIN else "off",
        access_log=False,
        log_config=None,
        server_header=False,
        # Written by uvicorn at the head of every answer, errors and its own included.
        headers=security_headers(tls=context is not None),
        ssl_context_factory=None if context is None else ssl_context,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
    )
    return ListenerServer(config)


def serve_all(servers: list[uvicorn.Server]) -> None:
    """Serve on every server until SIGINT/SIGTERM, on one event loop.

    The first server's app holds the lifespan: it starts before any server accepts a
    connection, and stops once every server has stopped accepting and its requests are
    done (each within its graceful shutdown time). Then the signal is raised again, as
    uvicorn does, so the process ends as the signal says."""
    factory = servers[0].config.get_loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(servers))


async def _serve(servers: list[uvicorn.Server]) -> None:
    with _signals(servers):
        await _serve_until_exit(servers)


async def _serve_until_exit(servers: list[uvicorn.Server]) -> None:
    first = servers[0].config
    if not first.loaded:
        first.load()
    lifespan = LifespanOn(first)
    for server in servers:
        if not server.config.loaded:
            server.config.load()
        # Each server only listens; the one lifespan is run here.
        server.lifespan = LifespanOff(server.config)
        # Its default headers (the security headers) set before it accepts a connection,
        # not at its main loop's first turn: another server may start in between.
        await server.on_tick(0)
    await lifespan.startup()
    if lifespan.should_exit:
        sys.exit(STARTUP_FAILURE)
    try:
        for server in servers:
            # Binds, or exits if it cannot (the finally below still stops the lifespan).
            await server.startup()
            if any(s.should_exit for s in servers):
                break
        else:
            await _until_one_exits(servers)
        # Every listener stops accepting at once, then all drain together.
        started = [s for s in servers if s.started]
        for server in started:
            for listening in server.servers:
                listening.close()
        await asyncio.gather(*(s.shutdown() for s in started))
    finally:
        if not any(s.force_exit for s in servers):
            await lifespan.shutdown()


async def _until_one_exits(servers: list[uvicorn.Server]) -> None:
    """Run the servers' main loops (each keeps its Date header current) until one ends."""
    loops = [asyncio.ensure_future(s.main_loop()) for s in servers]
    await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*loops)


@contextlib.contextmanager
def _signals(servers: list[uvicorn.Server]) -> Iterator[None]:
    """uvicorn's signal handling (Server.capture_signals), for every server at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    captured: list[int] = []

    def handle_exit(sig: int, frame: FrameType | None) -> None:
        captured.append(sig)
        for server in servers:
            server.handle_exit(sig, frame)

    original = {sig: signal.signal(sig, handle_exit) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for handled, previous in original.items():
            signal.signal(handled, previous)
    # Ended by a signal: raise it again now that these handlers are gone.
    for sig in reversed(captured):
        signal.raise_signal(sig)
