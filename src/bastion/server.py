"""Running the gateway: wire the components, then serve with uvicorn (uvloop, httptools)."""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable

from bastion.api.app import create_app
from bastion.api.services import Services
from bastion.audit.alerts import AlertRules, RecentAlerts, load_rules
from bastion.audit.events import SERVER_STARTED, Event, EventSink, FanOutSink
from bastion.audit.webhooks import WebhookNotifier, webhook_secret
from bastion.bootstrap import Home
from bastion.config import Settings
from bastion.errors import ConfigurationError
from bastion.gateway.auth import Authenticator
from bastion.gateway.control import ControlPlane
from bastion.gateway.gateway import Gateway
from bastion.gateway.protection import ProtectionDesk
from bastion.gateway.sealing import (
    RedisReplayGuard,
    SealingState,
    local_replay_guard,
    replay_window_s,
)
from bastion.gateway.sso import single_sign_on
from bastion.listeners import plan, serve_all, uvicorn_server, warn_exposure
from bastion.models.bundle_store import BundleStore
from bastion.models.watermark_secret import WatermarkSecret
from bastion.observability.metrics import AlertMetrics, Metrics, MetricsEventSink
from bastion.protection.monitor import monitor_policy_of
from bastion.quotas.limiter import Limiter
from bastion.quotas.redis import POLICIES, RedisLimiter, RedisLink
from bastion.quotas.usage import UsageMeter
from bastion.sandboxes.factory import Sandboxes, make_sandbox
from bastion.supervision.supervisor import Supervisor

logger = logging.getLogger("bastion.server")


def build_alerts(
    settings: Settings, metrics: Metrics, recent: RecentAlerts | None = None
) -> tuple[EventSink, list[Callable[[], None]]]:
    """The security alert rules, and the webhook they hand alerts to (docs/alerts.md), with
    what to close when the server stops (the webhook delivers what is queued, for 5 s).
    Alerts are also kept in `recent`, if given (the console shows them)."""
    rules = load_rules(settings.alert_rules)
    counts = AlertMetrics(metrics, rules)
    notify = [counts.fired] if recent is None else [counts.fired, recent.add]
    if settings.alert_webhook_url is None:
        return AlertRules(rules, notify), []
    secret = webhook_secret(settings.alert_webhook_secret, settings.alert_webhook_secret_file)
    notifier = WebhookNotifier(settings.alert_webhook_url, secret, on_outcome=counts.delivery)
    counts.dead_letters_from(lambda: len(notifier.dead_letters))
    alerts = AlertRules(rules, [*notify, notifier.submit])
    return alerts, [functools.partial(notifier.close, 5.0)]


def build_shared_state(
    settings: Settings, metrics: Metrics
) -> tuple[Limiter | None, SealingState, list[Callable[[], None]]]:
    """With BASTION_REDIS_URL, the limiter and the OHTTP replay guard that gateways share
    in Redis (docs/scaling.md), over one client, and what to close when the server stops;
    without it, None (this process's limiter) and this process's replay guard."""
    if settings.redis_url is None:
        return None, SealingState(settings), []
    if settings.redis_failure_policy not in POLICIES:
        raise ConfigurationError(
            f"BASTION_REDIS_FAILURE_POLICY must be {' or '.join(POLICIES)}, "
            f"not {settings.redis_failure_policy!r}."
        )
    if settings.redis_timeout_s <= 0 or settings.redis_lease_ttl_s <= 0:
        raise ConfigurationError(
            "BASTION_REDIS_TIMEOUT_S and BASTION_REDIS_LEASE_TTL_S must be positive."
        )
    try:
        link = RedisLink.connect(
            settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            policy=settings.redis_failure_policy,
        )
    except ValueError as exc:
        # Never the URL itself in the message: it may hold the password.
        raise ConfigurationError("BASTION_REDIS_URL is not a valid Redis URL.") from exc
    # A Redis that is down now is an outage like a later one (logged; the policy applies).
    link.check()
    metrics.redis_available.set_function(lambda: 1.0 if link.available else 0.0)
    prefix = settings.redis_key_prefix
    limiter = RedisLimiter(link, prefix=prefix, lease_ttl_s=settings.redis_lease_ttl_s)
    replays = RedisReplayGuard(
        link, local_replay_guard(settings), replay_window_s(settings), prefix=prefix
    )
    return limiter, SealingState(settings, replays=replays), [limiter.close, link.close]


def build_services(home: Home, metrics: Metrics) -> Services:
    """Every service the server runs, each built once, wired to the ones it needs."""
    settings = home.settings
    # Single sign-on (docs/sso.md), checked first: bad settings stop the start here.
    sso = single_sign_on(settings, home.db)
    recent_alerts = RecentAlerts()
    alerts, closers = build_alerts(settings, metrics, recent_alerts)
    if sso is not None:
        closers = [*closers, sso.close]
    limiter, sealing, shared_closers = build_shared_state(settings, metrics)
    closers = [*closers, *shared_closers]
    recorded = FanOutSink(home.events, MetricsEventSink(metrics))
    events = FanOutSink(recorded, alerts)
    if settings.cluster is not None:
        # Workers on a cluster's nodes (docs/scaling.md); Ray is imported only then.
        from bastion.cluster.ray import build_ray_sandbox

        placed, cluster_closers = build_ray_sandbox(settings, home.db, home.keyring)
        sandboxes = Sandboxes(placed, settings)
        closers = [*closers, *cluster_closers]
    else:
        sandboxes = Sandboxes(make_sandbox(settings), settings)
    supervisor = Supervisor(settings, sandboxes, events)
    tokens = sso.verifier if sso is not None else None
    # Failed sign-ins reach the logs and the audit log rate-limited, but the alert rules
    # every one: a flood must not hide a targeted key id.
    authenticator = Authenticator(home.db, home.hasher, recorded, alerts=alerts, tokens=tokens)
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
    gateway = Gateway(
        settings,
        authenticator,
        supervisor,
        events,
        metrics,
        meter,
        limiter=limiter,
        protection=desk,
        sealing=sealing,
    )
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
        audit=home.audit,
        closers=closers,
    )
    if home.audit is not None:
        # The audit log's own events (a failed verification, a prune) reach every sink.
        home.audit.on_event = events.emit
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
        recent_alerts=recent_alerts,
        sso=sso,
    )


def serve(home: Home) -> None:
    """Serve until SIGINT/SIGTERM, then drain in-flight requests and stop the workers."""
    settings = home.settings
    # The listeners (TLS files, admin address) are checked before anything starts.
    listeners = plan(settings)
    warn_exposure(listeners)
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
    if home.audit is None:
        logger.warning(
            "UNSAFE: the audit log is off (BASTION_AUDIT_ENABLED=false): security events "
            "and admin changes leave no tamper-evident record"
        )
    origins = settings.listeners().cors_origins
    servers = [
        uvicorn_server(
            listener,
            create_app(services, serving=listener.serving, cors_origins=origins),
            settings,
        )
        for listener in listeners
    ]
    home.events.emit(
        Event(
            kind=SERVER_STARTED,
            detail={
                "host": settings.host,
                "port": settings.port,
                "listeners": " ".join(listener.url for listener in listeners),
            },
        )
    )
    # On SIGTERM/SIGINT every listener stops accepting and waits for its in-flight
    # requests, then the lifespan shutdown (which drains and stops the workers) runs once,
    # then the signal is raised again (bastion.listeners.serve_all).
    # Everything alive by now (modules, routes, settings) lives as long as the process;
    # freezing it keeps the cyclic garbage collector from rescanning it under load, which
    # otherwise shows as latency spikes.
    gc.collect()
    gc.freeze()
    serve_all(servers)
