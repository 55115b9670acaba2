"""Running the gateway: wire the components, then serve with uvicorn (uvloop, httptools)."""

from __future__ import annotations

import gc
import ipaddress
import logging

import uvicorn

from bastion.api.app import create_app
from bastion.api.services import Services
from bastion.api.transport import protocol_class
from bastion.audit.events import SERVER_STARTED, Event, FanOutSink
from bastion.bootstrap import Home
from bastion.gateway.auth import Authenticator
from bastion.gateway.control import ControlPlane
from bastion.gateway.gateway import Gateway
from bastion.gateway.protection import ProtectionDesk
from bastion.models.bundle_store import BundleStore
from bastion.models.watermark_secret import WatermarkSecret
from bastion.observability.metrics import Metrics, MetricsEventSink
from bastion.protection.monitor import monitor_policy_of
from bastion.quotas.usage import UsageMeter
from bastion.sandboxes.factory import Sandboxes, make_sandbox
from bastion.supervision.supervisor import Supervisor

logger = logging.getLogger("bastion.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_services(home: Home, metrics: Metrics) -> Services:
    """Every service the server runs, each built once, wired to the ones it needs."""
    settings = home.settings
    events = FanOutSink(home.events, MetricsEventSink(metrics))
    sandboxes = Sandboxes(make_sandbox(settings), settings)
    supervisor = Supervisor(settings, sandboxes, events)
    authenticator = Authenticator(home.db, home.hasher, events)
    # Journaled in the home, so that a gateway killed between flushes loses no usage.
    meter = UsageMeter(home.db, journal_dir=settings.home / "usage")
    desk = ProtectionDesk(
        events,
        metrics,
        policy_of=lambda model, tenant, key: monitor_policy_of(
            gateway.protection_options(model, tenant, key)
        ),
        clear_worker=supervisor.clear_risk,
    )
    supervisor.on_notice = desk.notice
    gateway = Gateway(settings, authenticator, supervisor, events, metrics, meter, protection=desk)
    control = ControlPlane(
        settings,
        home.db,
        gateway,
        authenticator,
        home.registry,
        home.quotas,
        supervisor,
        home.ohttp_keys,
        meter,
        events,
        BundleStore(settings.home, home.keyring),
        WatermarkSecret(settings.home, home.keyring),
    )
    return Services(
        settings=settings,
        db=home.db,
        gateway=gateway,
        control=control,
        identity=home.identity,
        registry=home.registry,
        quotas=home.quotas,
        supervisor=supervisor,
        meter=meter,
        metrics=metrics,
    )


def serve(home: Home) -> None:
    """Serve until SIGINT/SIGTERM, then drain in-flight requests and stop the workers."""
    settings = home.settings
    if not is_loopback(settings.host):
        logger.warning(
            "listening on a non-loopback address: every client that can reach it can try keys",
            extra={"host": settings.host},
        )
    metrics = Metrics()
    services = build_services(home, metrics)
    sandbox = services.supervisor.sandbox
    if sandbox.name == "none":
        logger.warning(
            "UNSAFE: workers run as plain subprocesses without a sandbox "
            "(--unsafe-no-sandbox): model code can read the master key and reach the network"
        )
    else:
        # Starts one empty sandbox (bubblewrap) or builds the worker image and removes
        # the containers of a previous server (Docker): trouble shows now, not per model.
        sandbox.check()
    app = create_app(services)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools, with a cap on connections and timeouts for slow or stalled clients.
        http=protocol_class(
            max_connections=settings.max_connections,
            header_timeout_s=settings.header_timeout_s,
            send_timeout_s=settings.send_timeout_s,
        ),
        timeout_keep_alive=max(1, round(settings.keepalive_timeout_s)),
        # Bastion does not use the client's address; X-Forwarded-* from a local process
        # is not trusted (and its middleware costs every request a layer).
        proxy_headers=False,
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
    )
    server = uvicorn.Server(config)
    home.events.emit(
        Event(kind=SERVER_STARTED, detail={"host": settings.host, "port": settings.port})
    )
    # On SIGTERM/SIGINT uvicorn stops accepting, waits for in-flight requests, runs the
    # lifespan shutdown (which drains and stops the workers), then re-raises the signal.
    # Everything alive by now (modules, routes, settings) lives as long as the process;
    # freezing it keeps the cyclic garbage collector from rescanning it under load, which
    # otherwise shows as latency spikes.
    gc.collect()
    gc.freeze()
    server.run()
