"""Prometheus metrics. Labels are route, model, tenant and status: never keys or payloads."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

from bastion.audit.alerts import Alert, Rule
from bastion.audit.events import AUTH_THROTTLED, OHTTP_REFUSED, WORKER_RESTARTED, Event

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The scopes of authentication lock-outs (bastion.gateway.auth_throttle's, without importing
# the gateway).
AUTH_THROTTLE_SCOPES = ("address", "key")
# The outcomes of alert deliveries (bastion.audit.webhooks.OUTCOMES, without importing httpx).
ALERT_OUTCOMES = ("delivered", "retried", "dead_letter")

M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """The children of one labelled metric, by their label values, as the hot path gets
    them: ``labels()`` checks its arguments and takes the metric's lock on every call, a
    dict lookup does not. Label values must be strings (what ``labels()`` makes of them);
    the children are those the metric holds anyway (no label set is ever removed)."""

    __slots__ = ("_children", "metric")

    metric: M

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """The gateway's metrics, in a registry of its own (no process-wide global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "bastion_requests",
            "HTTP requests answered, by route, model, tenant and status.",
            ["route", "model", "tenant", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bastion_request_duration_seconds",
            "Time from request to the end of the answer.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.tokens = Counter(
            "bastion_tokens",
            "Tokens processed, by model, tenant and kind (prompt or completion).",
            ["model", "tenant", "kind"],
            registry=self.registry,
        )
        self.compute_seconds = Counter(
            "bastion_worker_compute_seconds",
            "Seconds workers spent running model code, by model and tenant.",
            ["model", "tenant"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "bastion_batch_size",
            "Requests by the size of the batch they ran in at the model's worker (1: alone).",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
            registry=self.registry,
        )
        self.queue_delay = Histogram(
            "bastion_worker_queue_seconds",
            "Time requests waited in their model worker's queue before their batch ran.",
            ["model"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1, 10),
            registry=self.registry,
        )
        self.dispatch_window = Gauge(
            "bastion_dispatch_window",
            "Requests a model's worker may hold at once (its adaptive in-flight window).",
            ["model"],
            registry=self.registry,
        )
        self.refused = Counter(
            "bastion_requests_refused",
            "Requests turned away by a quota or a full queue, by model, tenant and code "
            "(rate_limit_exceeded, tokens_limit_exceeded, concurrency_limit_exceeded, "
            "daily_budget_exceeded, payload_too_large, queue_full, limiter_unavailable).",
            ["model", "tenant", "code"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "bastion_auth_failures",
            "Requests refused for missing or invalid credentials.",
            registry=self.registry,
        )
        self.auth_throttled = Counter(
            "bastion_auth_throttled",
            "Lock-outs started by the throttle of failed authentication, by scope (address: "
            "a client address or IPv6 /64; key: wrong secrets for one key id).",
            ["scope"],
            registry=self.registry,
        )
        for scope in AUTH_THROTTLE_SCOPES:
            self.auth_throttled.labels(scope)
        self.worker_restarts = Counter(
            "bastion_worker_restarts",
            "Worker processes restarted after a crash or a missed heartbeat.",
            ["model"],
            registry=self.registry,
        )
        self.ohttp_refused = Counter(
            "bastion_ohttp_refused",
            "Encrypted requests refused before decryption or failing to decrypt, by reason "
            "(ohttp_key, ohttp_malformed, ohttp_decrypt, ohttp_replay).",
            ["reason"],
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "bastion_model_ready",
            "1 when the model's worker is ready to serve.",
            ["model"],
            registry=self.registry,
        )
        self.model_stalled = Gauge(
            "bastion_model_stalled",
            "1 while every place at the model's worker has been held past the deadline.",
            ["model"],
            registry=self.registry,
        )
        self.slots_reclaimed = Counter(
            "bastion_fair_queue_slots_reclaimed",
            "Places at a model's worker held past the deadline (leaked) and taken back.",
            ["model"],
            registry=self.registry,
        )
        # Per model only: a label per key would let the number of series grow without bound.
        self.extraction_risk = Gauge(
            "bastion_extraction_risk",
            "The highest extraction risk among the keys using the model (1: block level).",
            ["model"],
            registry=self.registry,
        )
        self.extraction_risk_reports = Histogram(
            "bastion_extraction_risk_reports",
            "Extraction risk scores reported by the model's monitor, one per key report.",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0),
            registry=self.registry,
        )
        self.protect_actions = Counter(
            "bastion_protect_actions",
            "Actions taken against suspected extraction (alert, throttle, block, refused).",
            ["model", "action"],
            registry=self.registry,
        )
        # Security alerts (audit/alerts.py) and their webhook deliveries (audit/webhooks.py).
        self.alerts_fired = Counter(
            "bastion_alerts_fired",
            "Security alerts fired, by rule and severity (info, warning, critical).",
            ["rule", "severity"],
            registry=self.registry,
        )
        self.alert_deliveries = Counter(
            "bastion_alert_deliveries",
            "Webhook deliveries of security alerts, by outcome: delivered, retried (one per "
            "retry), dead_letter (given up).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ALERT_OUTCOMES:
            self.alert_deliveries.labels(outcome)
        self.alert_dead_letters = Gauge(
            "bastion_alert_dead_letters",
            "Security alerts whose webhook delivery was given up, the latest of them kept in "
            "memory (all of them: bastion_alert_deliveries_total{outcome='dead_letter'}).",
            registry=self.registry,
        )
        # Set to read the link's state by the server when Redis is configured.
        self.redis_available = Gauge(
            "bastion_redis_available",
            "1 while the Redis that gateways share (BASTION_REDIS_URL) answers; 0 during an "
            "outage (its failure policy applies), or when no Redis is configured.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "bastion_in_flight_requests",
            "Requests being served now.",
            registry=self.registry,
        )
        # Counted by the request path (the event loop's thread) as a plain number, read
        # when the metrics are collected: no lock taken twice a request.
        self.serving = 0
        self.in_flight.set_function(lambda: self.serving)

        # The children the request path uses, by label values (see Children).
        self.requests_of = Children(self.requests)
        self.latency_of = Children(self.latency)
        self.tokens_of = Children(self.tokens)
        self.compute_seconds_of = Children(self.compute_seconds)
        self.batch_size_of = Children(self.batch_size)
        self.queue_delay_of = Children(self.queue_delay)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AlertMetrics:
    """Counts what the security alerts do: the callbacks the alert rules and the webhook
    notifier are given."""

    def __init__(self, metrics: Metrics, rules: Iterable[Rule] = ()) -> None:
        self._metrics = metrics
        # Every rule's series exists from the start, at 0, so that rate() sees the first.
        for rule in rules:
            metrics.alerts_fired.labels(rule.name, rule.severity)

    def fired(self, alert: Alert) -> None:
        self._metrics.alerts_fired.labels(alert.rule, alert.severity).inc()

    def delivery(self, outcome: str) -> None:
        self._metrics.alert_deliveries.labels(outcome).inc()

    def dead_letters_from(self, count: Callable[[], int]) -> None:
        """Read the dead letters held (the notifier's) when the metrics are collected."""
        self._metrics.alert_dead_letters.set_function(count)


class MetricsEventSink:
    """Counts the events that have a metric of their own (restarts, refused OHTTP,
    authentication lock-outs)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def emit(self, event: Event) -> None:
        if event.kind == WORKER_RESTARTED and event.target:
            self._metrics.worker_restarts.labels(event.target).inc()
        elif event.kind == OHTTP_REFUSED:
            self._metrics.ohttp_refused.labels(str(event.detail.get("reason"))).inc()
        elif event.kind == AUTH_THROTTLED:
            scope = event.detail.get("scope")
            if scope in AUTH_THROTTLE_SCOPES:
                # Lock-outs past the report's budget arrive as one event with their count.
                count = event.detail.get("count", 1)
                self._metrics.auth_throttled.labels(str(scope)).inc(
                    count if isinstance(count, int) else 1
                )
