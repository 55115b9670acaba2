"""The one interface every security-relevant event goes through.

Callers build an :class:`Event` and hand it to an :class:`EventSink`. One sink writes one
JSON log line per event; the tamper-evident audit log (:mod:`bastion.audit.log`) appends it
to the database, behind the same interface. Event fields are metadata only: ids, names,
statuses and reasons, never payloads, prompts, completions or secrets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

# The kinds of event Bastion emits. Keep names stable: operators alert on them.
AUTH_FAILED = "auth.failed"
ACCESS_DENIED = "auth.denied"
TENANT_CREATED = "tenant.created"
TENANT_DISABLED = "tenant.disabled"
KEY_CREATED = "key.created"
KEY_REVOKED = "key.revoked"
KEY_ROTATED = "key.rotated"
MODEL_REGISTERED = "model.registered"
MODEL_LOAD_REQUESTED = "model.load_requested"
MODEL_UNLOAD_REQUESTED = "model.unload_requested"
MODEL_LOADED = "model.loaded"
MODEL_FAILED = "model.failed"
MODEL_INTEGRITY_FAILED = "model.integrity_failed"
MODEL_UNLOADED = "model.unloaded"
MODEL_REMOVED = "model.removed"
# Places at a model's worker were held past the deadline (leaked) and taken back.
MODEL_STALLED = "model.stalled"
WORKER_CRASHED = "worker.crashed"
WORKER_RESTARTED = "worker.restarted"
SERVER_STARTED = "server.started"
SERVER_STOPPED = "server.stopped"
HOME_INITIALISED = "home.initialised"
OHTTP_KEY_CREATED = "ohttp_key.created"
OHTTP_KEY_ROTATED = "ohttp_key.rotated"
OHTTP_KEY_RETIRED = "ohttp_key.retired"
OHTTP_REFUSED = "ohttp.refused"
QUOTA_CHANGED = "quota.changed"
# A model's protection policy (what its answers reveal) was changed.
PROTECT_POLICY_CHANGED = "protect.policy_changed"
PROTECT_EXTRACTION_SUSPECTED = "protect.extraction_suspected"
PROTECT_KEY_BLOCKED = "protect.key_blocked"
PROTECT_KEY_THROTTLED = "protect.key_throttled"
PROTECT_KEY_CLEARED = "protect.key_cleared"
PROTECT_OVERRIDE_CHANGED = "protect.override_changed"
# A client (address or key id) was refused for a while after repeated failed sign-ins.
AUTH_THROTTLED = "auth.throttled"
# An administrator read data that the audit trail must show was read (keys, usage, audit).
ADMIN_READ = "admin.read"
# Someone signed in to the admin console, or their console session ended (signed out,
# ended by an admin, or its key or tenant stopped working).
CONSOLE_SIGNED_IN = "console.signed_in"
CONSOLE_SIGNED_OUT = "console.signed_out"
# The audit log's own events: records pruned past the retention (with a signed note),
# and a verification that found the log tampered with.
AUDIT_PRUNED = "audit.pruned"
AUDIT_VERIFY_FAILED = "audit.verify_failed"

#: Every kind above: what alert rules may watch (a rules file naming another is refused).
EVENT_KINDS = frozenset(
    {
        AUTH_FAILED,
        ACCESS_DENIED,
        TENANT_CREATED,
        TENANT_DISABLED,
        KEY_CREATED,
        KEY_REVOKED,
        KEY_ROTATED,
        MODEL_REGISTERED,
        MODEL_LOAD_REQUESTED,
        MODEL_UNLOAD_REQUESTED,
        MODEL_LOADED,
        MODEL_FAILED,
        MODEL_INTEGRITY_FAILED,
        MODEL_UNLOADED,
        MODEL_REMOVED,
        MODEL_STALLED,
        WORKER_CRASHED,
        WORKER_RESTARTED,
        SERVER_STARTED,
        SERVER_STOPPED,
        HOME_INITIALISED,
        OHTTP_KEY_CREATED,
        OHTTP_KEY_ROTATED,
        OHTTP_KEY_RETIRED,
        OHTTP_REFUSED,
        QUOTA_CHANGED,
        PROTECT_POLICY_CHANGED,
        PROTECT_EXTRACTION_SUSPECTED,
        PROTECT_KEY_BLOCKED,
        PROTECT_KEY_THROTTLED,
        PROTECT_KEY_CLEARED,
        PROTECT_OVERRIDE_CHANGED,
        AUTH_THROTTLED,
        ADMIN_READ,
        CONSOLE_SIGNED_IN,
        CONSOLE_SIGNED_OUT,
        AUDIT_PRUNED,
        AUDIT_VERIFY_FAILED,
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """One security-relevant fact. `detail` holds metadata only, never payloads or secrets."""

    kind: str
    outcome: str = "success"
    actor: str | None = None
    tenant: str | None = None
    target: str | None = None
    detail: Mapping[str, str | int | float | bool | None] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


class LogEventSink:
    """Writes each event as one JSON line on the `bastion.events` logger."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("bastion.events")

    def emit(self, event: Event) -> None:
        record = {
            "event": event.kind,
            "outcome": event.outcome,
            "at": round(event.at, 3),
            "actor": event.actor,
            "tenant": event.tenant,
            "target": event.target,
            "detail": dict(event.detail),
        }
        level = logging.INFO if event.outcome == "success" else logging.WARNING
        # The fields travel as structured extras, so the JSON formatter emits them as keys.
        self._logger.log(level, event.kind, extra=record)


class MemoryEventSink:
    """Keeps events in a list; for tests and for fan-out to several sinks."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


class FanOutSink:
    """Hands every event to several sinks, in order."""

    def __init__(self, *sinks: EventSink) -> None:
        self._sinks = sinks

    def emit(self, event: Event) -> None:
        for sink in self._sinks:
            sink.emit(event)


def emit_change(
    events: EventSink,
    kind: str,
    actor: str,
    target: str | None = None,
    *,
    tenant: str | None = None,
    detail: Mapping[str, str | int | float | bool | None] | None = None,
    at: float,
) -> None:
    """Emit the event of a successful change that `actor` made to `target`.

    The services that change state (identity, model registry) all record their changes
    this way; `at` comes from their injectable clock, so tests see the time they set.
    """
    events.emit(
        Event(kind=kind, actor=actor, tenant=tenant, target=target, detail=detail or {}, at=at)
    )
