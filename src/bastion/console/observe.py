"""Pages that show what Bastion is doing: overview, models, usage, security, audit log.

Admins see everything; a tenant's admins see their tenant's usage, security events and
audit records, and the models their credential may use (without the details the admin
API keeps for admins: integrity, protection policy, sandbox). Reads of usage and of the
audit log are recorded, as the admin API records them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.responses import Response

from bastion.api.admin import model_view
from bastion.audit.alerts import Alert
from bastion.audit.events import (
    ACCESS_DENIED,
    AUDIT_VERIFY_FAILED,
    AUTH_FAILED,
    AUTH_THROTTLED,
    CONSOLE_SIGNED_IN,
    CONSOLE_SIGNED_OUT,
    KEY_REVOKED,
    MODEL_INTEGRITY_FAILED,
    OHTTP_REFUSED,
    PROTECT_EXTRACTION_SUSPECTED,
    PROTECT_KEY_BLOCKED,
    PROTECT_KEY_THROTTLED,
    TENANT_DISABLED,
    WORKER_CRASHED,
)
from bastion.audit.log import AuditRecord
from bastion.audit.writer import AuditWriter, VerificationRunning
from bastion.console.charts import Chart, days_from, stacked_by_day
from bastion.console.visits import Visit
from bastion.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from bastion.identity.grants import TENANT_NOT_FOUND, not_found
from bastion.models.bundle_store import BUNDLE_OPTION
from bastion.models.registry import ModelRecord
from bastion.protection.policy import policy_view
from bastion.quotas.usage import usage_report
from bastion.sandboxes.base import SANDBOX_OPTION

# Event kinds the security page shows beside every failure.
SECURITY_KINDS = frozenset(
    {
        AUTH_FAILED,
        ACCESS_DENIED,
        AUTH_THROTTLED,
        PROTECT_EXTRACTION_SUSPECTED,
        PROTECT_KEY_BLOCKED,
        PROTECT_KEY_THROTTLED,
        MODEL_INTEGRITY_FAILED,
        WORKER_CRASHED,
        AUDIT_VERIFY_FAILED,
        OHTTP_REFUSED,
        CONSOLE_SIGNED_IN,
        CONSOLE_SIGNED_OUT,
        KEY_REVOKED,
        TENANT_DISABLED,
    }
)
# How many of the newest records the security page looks through, and shows at most.
SECURITY_SCAN = 2000
SECURITY_SHOWN = 100
AUDIT_PAGE = 50
USAGE_PERIODS = {"7d": 7, "14d": 14, "30d": 30, "90d": 90}
USAGE_METRICS = {
    "total_tokens": "tokens",
    "requests": "requests",
    "compute_seconds": "compute seconds",
    "refused": "refused requests",
}


def _audit(visit: Visit) -> AuditWriter | None:
    return visit.services.control.audit


def _tenant_scope(visit: Visit) -> str | None:
    """The tenant a page is limited to: a tenant's admin's own; for an admin, the one the
    query names (or None, all)."""
    asked = visit.query("tenant")
    if visit.is_admin:
        return asked
    if asked not in (None, visit.principal.tenant_name):
        raise not_found(visit.principal, TENANT_NOT_FOUND)
    return visit.principal.tenant_name


def _entry(record: AuditRecord) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(record.entry)
    return {
        "seq": record.seq,
        "at_ms": record.at_ms,
        "action": record.action,
        "outcome": record.outcome,
        "actor": record.actor,
        "tenant": record.tenant,
        "target": record.target,
        "detail": fields.get("detail", {}),
    }


def _alerts_for(visit: Visit, alerts: Iterable[Alert]) -> list[Alert]:
    if visit.is_admin:
        return list(alerts)
    own = visit.principal.tenant_name
    return [a for a in alerts if a.event.get("tenant") == own]


async def _security_records(visit: Visit, tenant: str | None) -> list[dict[str, Any]]:
    audit = _audit(visit)
    if audit is None:
        return []

    def read() -> list[AuditRecord]:
        audit.flush()
        return audit.log.records(tenant=tenant, newest_first=True, limit=SECURITY_SCAN)

    records = await asyncio.to_thread(read)
    chosen = [r for r in records if r.outcome == "failure" or r.action in SECURITY_KINDS]
    return [_entry(r) for r in chosen[:SECURITY_SHOWN]]


# ---------------------------------------------------------------- overview


async def overview(visit: Visit) -> Response:
    services = visit.services
    tenants = await asyncio.to_thread(services.identity.list_tenants, visit.principal)
    records = await asyncio.to_thread(services.registry.list)
    visible = [r for r in records if visit.is_admin or visit.principal.can_see_model(r.name)]
    ready = sum(1 for r in visible if services.supervisor.status(r.name).state == "ready")
    day_ago = datetime.now(UTC).timestamp() - 86400
    alerts = [a for a in _alerts_for(visit, services.recent_alerts.latest()) if a.last_at > day_ago]
    tenant = None if visit.is_admin else visit.principal.tenant_name
    events = await _security_records(visit, tenant)
    audit = _audit(visit)
    size = await asyncio.to_thread(audit.log.size) if audit is not None and visit.is_admin else None
    return visit.render(
        "overview.html",
        "overview",
        tenants=tenants,
        models_total=len(visible),
        models_ready=ready,
        alerts=alerts,
        events=events[:8],
        audit_size=size,
        last_verify=audit.last_verify if audit is not None else None,
    )


# ---------------------------------------------------------------- models


def _model_details(visit: Visit, record: ModelRecord) -> dict[str, Any]:
    services = visit.services
    view = model_view(services.supervisor, record)
    version = record.options.get(BUNDLE_OPTION)
    bundles = services.control.bundles
    bundle: dict[str, Any] | None = None
    if version is not None and bundles is not None:
        try:
            found = bundles.get(record.name, str(version))
            bundle = {
                "version": found.version,
                "signer": found.signer,
                "files": len(found.files),
                "bytes": found.total_bytes,
            }
        except Exception as exc:  # a bundle that cannot be read is shown as such
            bundle = {"version": str(version), "error": type(exc).__name__}
    return {
        **view,
        "bundle": bundle,
        "policy": policy_view(record.options),
        "sandbox": str(record.options.get(SANDBOX_OPTION) or services.supervisor.sandbox.name),
    }


async def models(visit: Visit) -> Response:
    records = await asyncio.to_thread(visit.services.registry.list)
    if visit.is_admin:
        rows = await asyncio.to_thread(lambda: [_model_details(visit, r) for r in records])
    else:
        supervisor = visit.services.supervisor
        rows = [model_view(supervisor, r) for r in records if visit.principal.can_see_model(r.name)]
    return visit.render("models.html", "models", models=rows)


async def set_model_state(visit: Visit) -> Response:
    visit.principal.require_admin()
    name = visit.request.path_params["name"]
    state = visit.form.get("state")
    if state not in ("loaded", "unloaded"):
        raise InvalidRequest("A model is loaded or unloaded.", param="state")
    registry = visit.services.registry
    await asyncio.to_thread(registry.set_desired_state, visit.principal, name, state)
    await visit.services.control.refresh()
    verb = "load" if state == "loaded" else "unload"
    return visit.back("/console/models", ok=f"Model {name} asked to {verb}.")


# ---------------------------------------------------------------- usage


def _charts(
    rows: list[dict[str, Any]], days: list[str], metric: str, by_tenant: bool
) -> list[Chart]:
    unit = USAGE_METRICS[metric]
    charts: list[Chart] = []
    if by_tenant:
        per_tenant: dict[str, dict[str, float]] = {}
        for row in rows:
            day = per_tenant.setdefault(row["tenant"], {})
            day[row["period"]] = day.get(row["period"], 0.0) + float(row[metric])
        charts.append(stacked_by_day(f"All tenants: {unit} per day", days, per_tenant, unit))
    for tenant in sorted({row["tenant"] for row in rows}):
        per_model: dict[str, dict[str, float]] = {}
        for row in rows:
            if row["tenant"] == tenant:
                day = per_model.setdefault(row["model"], {})
                day[row["period"]] = day.get(row["period"], 0.0) + float(row[metric])
        charts.append(stacked_by_day(f"{tenant}: {unit} per day, by model", days, per_model, unit))
    return charts


async def usage(visit: Visit) -> Response:
    services = visit.services
    tenant = _tenant_scope(visit)
    model = visit.query("model")
    period = visit.query("since") or "7d"
    metric = visit.query("metric") or "total_tokens"
    if period not in USAGE_PERIODS or metric not in USAGE_METRICS:
        raise InvalidRequest("Unknown period or metric.")
    today = datetime.now(UTC).date()
    start = today - timedelta(days=USAGE_PERIODS[period] - 1)
    since = datetime(start.year, start.month, start.day, tzinfo=UTC)
    # What this gateway metered in the last seconds is written first.
    await asyncio.to_thread(services.meter.flush)
    rows = await asyncio.to_thread(
        lambda: usage_report(services.db, since=since, tenant=tenant, model=model, group="day")
    )
    visit.record_read("usage", tenant, len(rows))
    days = days_from(start, today)
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        total = totals.setdefault((row["tenant"], row["model"]), dict.fromkeys(USAGE_METRICS, 0.0))
        for name in USAGE_METRICS:
            total[name] += float(row[name])
    return visit.render(
        "usage.html",
        "usage",
        charts=_charts(rows, days, metric, by_tenant=visit.is_admin and tenant is None),
        totals=sorted(totals.items()),
        periods=list(USAGE_PERIODS),
        period=period,
        metrics=USAGE_METRICS,
        metric=metric,
        tenant=tenant,
        model=model,
    )


# ---------------------------------------------------------------- security


async def security(visit: Visit) -> Response:
    tenant = None if visit.is_admin else visit.principal.tenant_name
    events = await _security_records(visit, tenant)
    visit.record_read("audit", tenant, len(events))
    alerts = _alerts_for(visit, visit.services.recent_alerts.latest())
    return visit.render(
        "security.html",
        "security",
        events=events,
        alerts=alerts,
        audit_on=_audit(visit) is not None,
        scanned=SECURITY_SCAN,
    )


# ---------------------------------------------------------------- audit log


def _number(text: str | None) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise InvalidRequest("Record numbers are whole numbers.")
    return int(text)


async def audit(visit: Visit) -> Response:
    writer = _audit(visit)
    if writer is None:
        raise NotFound("This server keeps no audit log (BASTION_AUDIT_ENABLED=false).")
    tenant = _tenant_scope(visit)
    before = _number(visit.query("before"))

    def read() -> list[AuditRecord]:
        writer.flush()
        return writer.log.records(
            tenant=tenant, before_seq=before, newest_first=True, limit=AUDIT_PAGE
        )

    records = await asyncio.to_thread(read)
    visit.record_read("audit", tenant, len(records))
    checkpoint = verifier = size = None
    if visit.is_admin:
        checkpoint = await asyncio.to_thread(writer.log.latest_checkpoint)
        found = await asyncio.to_thread(writer.log.own_verifier)
        verifier = found.encode() if found is not None else None
        size = await asyncio.to_thread(writer.log.size)
    return visit.render(
        "audit.html",
        "audit",
        records=[_entry(r) for r in records],
        older=records[-1].seq if len(records) == AUDIT_PAGE else None,
        tenant=tenant,
        checkpoint=checkpoint,
        verifier=verifier,
        size=size,
        last_verify=writer.last_verify if visit.is_admin else None,
    )


async def verify_audit(visit: Visit) -> Response:
    if not visit.is_admin:
        raise PermissionDenied("Verifying the whole audit log is for admins.")
    writer = _audit(visit)
    if writer is None:
        raise NotFound("This server keeps no audit log (BASTION_AUDIT_ENABLED=false).")
    # As the admin API does: the writer's own check (signatures, records' MACs), which
    # reports a failure as an event and an alert.
    try:
        report = await asyncio.to_thread(lambda: writer.verify(wait=False))
    except VerificationRunning:
        raise Conflict("A verification of the audit log is running; retry later.") from None
    if report is None:
        return visit.back("/console/audit", ok="The audit log holds nothing to verify yet.")
    if report.ok:
        return visit.back("/console/audit", ok=f"The audit log verifies: {report.size} records.")
    return visit.back(
        "/console/audit", error="The audit log does not verify: " + report.problems[0]
    )
