"""Admin routes over the same service layer the CLI uses: tenants, keys, models."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from bastion.api import audit_log
from bastion.api.body import decode_json
from bastion.api.context import authenticate, json_response, services_of
from bastion.api.denials import admin_route, remember_caller
from bastion.api.schemas import KeyCreate, ProtectionUpdate, QuotaUpdate, TenantCreate
from bastion.api.services import Services
from bastion.audit.events import ADMIN_READ, Event
from bastion.errors import InvalidRequest, NotFound
from bastion.identity.grants import TENANT_NOT_FOUND, is_global_admin, not_found
from bastion.identity.principal import Principal
from bastion.identity.service import IdentityService
from bastion.models.overrides import ALL_MODELS, OverrideStore
from bastion.models.registry import ModelRecord
from bastion.models.risk import RiskBoard
from bastion.models.status import PublishedStatus
from bastion.protection.policy import policy_view
from bastion.quotas.store import KEY, TENANT
from bastion.quotas.usage import parse_since, usage_report
from bastion.supervision.supervisor import Supervisor


def _identity(request: Request) -> IdentityService:
    return services_of(request).identity


async def _admin(request: Request) -> tuple[Services, Principal]:
    services = services_of(request)
    principal = await authenticate(request)
    services.gateway.authorize(principal, "admin")
    remember_caller(request, principal)
    return services, principal


def parse_expiry(value: str | None) -> datetime | None:
    """An ISO 8601 timestamp with a time zone, as UTC, or None; InvalidRequest (400) if it
    is not one or lies outside 1970-9998."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            "expires_at must be an ISO 8601 timestamp.", param="expires_at"
        ) from None
    if parsed.tzinfo is None:
        raise InvalidRequest("expires_at must include a time zone.", param="expires_at")
    try:
        utc = parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        utc = None
    if utc is None or not _EARLIEST_EXPIRY <= utc <= _LATEST_EXPIRY:
        raise InvalidRequest(
            "expires_at must lie between 1970 and 9998.", param="expires_at"
        ) from None
    return utc


_EARLIEST_EXPIRY = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST_EXPIRY = datetime(9998, 12, 31, tzinfo=UTC)


# ---------------------------------------------------------------- tenants


async def list_tenants(request: Request) -> Response:
    _, principal = await _admin(request)
    tenants = await asyncio.to_thread(_identity(request).list_tenants, principal)
    return json_response({"data": [t.to_dict() for t in tenants]})


async def create_tenant(request: Request) -> Response:
    services, principal = await _admin(request)
    body = await decode_json(request, TenantCreate, services.settings.max_body_bytes)
    tenant = await asyncio.to_thread(_identity(request).create_tenant, principal, body.name)
    return json_response(tenant.to_dict(), status=201)


async def disable_tenant(request: Request) -> Response:
    _, principal = await _admin(request)
    name = request.path_params["name"]
    tenant = await asyncio.to_thread(_identity(request).disable_tenant, principal, name)
    return json_response(tenant.to_dict())


# ---------------------------------------------------------------- keys


async def list_keys(request: Request) -> Response:
    _, principal = await _admin(request)
    tenant = request.query_params.get("tenant")
    keys = await asyncio.to_thread(_identity(request).list_keys, principal, tenant)
    _record_read(request, principal, "keys", tenant, len(keys))
    return json_response({"data": [k.to_dict() for k in keys]})


def _record_read(
    request: Request, principal: Principal, target: str, tenant: str | None, count: int
) -> None:
    """An admin read of data the audit trail must show was read (who read which keys)."""
    services_of(request).gateway.events.emit(
        Event(
            kind=ADMIN_READ,
            actor=principal.key_id,
            tenant=tenant,
            target=target,
            detail={"records": count},
        )
    )


async def create_key(request: Request) -> Response:
    services, principal = await _admin(request)
    body = await decode_json(request, KeyCreate, services.settings.max_body_bytes)
    expires_at = parse_expiry(body.expires_at)
    info, token = await asyncio.to_thread(
        lambda: _identity(request).create_key(
            principal,
            tenant=body.tenant,
            role=body.role,
            models=body.models,
            actions=body.actions,
            expires_at=expires_at,
            name=body.name,
        )
    )
    # The new key is usable at once (the gateway knows every key id in memory).
    await services_of(request).control.refresh()
    return json_response({**info.to_dict(), "key": token}, status=201)


async def revoke_key(request: Request) -> Response:
    _, principal = await _admin(request)
    key_id = request.path_params["key_id"]
    info = await asyncio.to_thread(_identity(request).revoke_key, principal, key_id)
    await services_of(request).control.refresh()
    return json_response(info.to_dict())


async def rotate_key(request: Request) -> Response:
    _, principal = await _admin(request)
    key_id = request.path_params["key_id"]
    info, token = await asyncio.to_thread(_identity(request).rotate_key, principal, key_id)
    await services_of(request).control.refresh()
    return json_response({**info.to_dict(), "key": token}, status=201)


# ---------------------------------------------------------------- models


def model_view(supervisor: Supervisor, record: ModelRecord) -> dict[str, Any]:
    status = supervisor.status(record.name)
    return {
        "name": record.name,
        "runtime": record.runtime,
        "description": record.description,
        "desired_state": record.desired_state,
        "state": status.state,
        "detail": status.detail,
        "restarts": status.restarts,
        "capabilities": list(status.metadata.capabilities) if status.metadata else [],
    }


async def list_models(request: Request) -> Response:
    services, principal = await _admin(request)
    principal.require_admin()
    records = await asyncio.to_thread(services.registry.list)
    return json_response({"data": [model_view(services.supervisor, r) for r in records]})


def replica_views(supervisor: Supervisor, name: str) -> list[dict[str, Any]]:
    """Each of the model's replicas on this gateway, in a stable order (none if it is not
    loaded here): its state, its worker's pid and the requests it holds."""
    statuses = supervisor.replica_statuses(name)
    in_flight = supervisor.replica_in_flight(name)
    return [
        {
            "state": status.state,
            "detail": status.detail,
            "pid": status.pid,
            "restarts": status.restarts,
            "in_flight": held,
        }
        for status, held in zip(statuses, in_flight, strict=True)
    ]


def gateway_views(rows: list[PublishedStatus]) -> list[dict[str, Any]]:
    """The model's state as each gateway sharing the database last published it."""
    return [
        {
            "gateway": row.gateway,
            "state": row.state,
            "detail": row.detail,
            "restarts": row.restarts,
            "since": row.since.isoformat(),
            # Not confirmed lately: that gateway may be gone.
            "stale": row.stale(),
        }
        for row in rows
    ]


async def get_model(request: Request) -> Response:
    """One model as this gateway serves it, with its replicas here and its state on every
    gateway sharing the database."""
    services, principal = await _admin(request)
    principal.require_admin()
    record = await asyncio.to_thread(services.registry.get, request.path_params["name"])
    board = services.control.status_board
    published = await asyncio.to_thread(board.rows, record.name)
    view = model_view(services.supervisor, record)
    view["replicas"] = replica_views(services.supervisor, record.name)
    view["gateway"] = board.gateway
    view["gateways"] = gateway_views(published)
    return json_response(view)


async def _set_state(request: Request, state: str) -> Response:
    services, principal = await _admin(request)
    principal.require_admin()
    name = request.path_params["name"]
    record = await asyncio.to_thread(services.registry.set_desired_state, principal, name, state)
    await services.control.refresh()
    return json_response(model_view(services.supervisor, record), status=202)


async def load_model(request: Request) -> Response:
    return await _set_state(request, "loaded")


async def unload_model(request: Request) -> Response:
    return await _set_state(request, "unloaded")


# ---------------------------------------------------------------- quotas and usage

_QUOTA_KINDS = {"tenants": TENANT, "keys": KEY}


def _quota_subject(request: Request) -> tuple[str, str]:
    kind = _QUOTA_KINDS.get(request.path_params["kind"])
    if kind is None:
        raise NotFound("Quotas are set on /admin/v1/quotas/tenants/… or /admin/v1/quotas/keys/….")
    return kind, request.path_params["subject"]


async def list_quotas(request: Request) -> Response:
    services, principal = await _admin(request)
    tenant = request.query_params.get("tenant")
    rows = await asyncio.to_thread(services.quotas.list, principal, tenant)
    return json_response({"data": [q.to_dict() for q in rows]})


async def get_quota(request: Request) -> Response:
    services, principal = await _admin(request)
    kind, subject = _quota_subject(request)
    quota = await asyncio.to_thread(services.quotas.get, principal, kind, subject)
    return json_response(quota.to_dict())


async def update_quota(request: Request) -> Response:
    services, principal = await _admin(request)
    kind, subject = _quota_subject(request)
    body = await decode_json(request, QuotaUpdate, services.settings.max_body_bytes)
    quota = await asyncio.to_thread(services.quotas.set, principal, kind, subject, body.changes())
    await services.control.refresh()
    return json_response(quota.to_dict())


async def remove_quota(request: Request) -> Response:
    services, principal = await _admin(request)
    kind, subject = _quota_subject(request)
    await asyncio.to_thread(services.quotas.remove, principal, kind, subject)
    await services.control.refresh()
    return Response(status_code=204)


# ---------------------------------------------------------------- model protection


def _protection_view(record: ModelRecord) -> dict[str, Any]:
    return {"model": record.name, **policy_view(record.options)}


async def list_protection(request: Request) -> Response:
    """Every model's protection policy, and the extraction risk of the keys using them."""
    services, principal = await _admin(request)
    principal.require_admin()
    records = await asyncio.to_thread(services.registry.list)
    tenant = request.query_params.get("tenant")
    risks = await asyncio.to_thread(RiskBoard(services.db).read, tenant=tenant)
    overrides = await asyncio.to_thread(OverrideStore(services.db, services.gateway.events).list)
    _record_read(request, principal, "extraction-risk", tenant, len(risks))
    return json_response(
        {
            "models": [_protection_view(r) for r in records],
            "keys": [r.as_dict() for r in risks],
            "overrides": [o.as_dict() for o in overrides],
        }
    )


_OVERRIDE_KINDS = {"tenants": "tenant", "keys": "key"}


def _override_subject(request: Request) -> tuple[str, str, str]:
    kind = _OVERRIDE_KINDS.get(request.path_params["kind"])
    if kind is None:
        raise NotFound("Overrides are under /admin/v1/protection/overrides/tenants|keys/….")
    return kind, request.path_params["subject"], request.path_params["model"]


async def update_override(request: Request) -> Response:
    """A tenant's or key's own protection settings on a model (or * for every model)."""
    services, principal = await _admin(request)
    body = await decode_json(request, ProtectionUpdate, services.settings.max_body_bytes)
    kind, subject, model = _override_subject(request)
    principal.require_admin()
    if model != ALL_MODELS:
        await asyncio.to_thread(services.registry.get, model)
    changes = {k.removeprefix("protect."): v for k, v in body.changes().items()}
    store = OverrideStore(services.db, services.gateway.events)
    override = await asyncio.to_thread(store.set, principal, kind, subject, model, changes)
    await services.control.refresh()
    return json_response(override.as_dict())


async def remove_override(request: Request) -> Response:
    services, principal = await _admin(request)
    kind, subject, model = _override_subject(request)
    store = OverrideStore(services.db, services.gateway.events)
    await asyncio.to_thread(store.remove, principal, kind, subject, model)
    await services.control.refresh()
    return Response(status_code=204)


async def update_protection(request: Request) -> Response:
    services, principal = await _admin(request)
    body = await decode_json(request, ProtectionUpdate, services.settings.max_body_bytes)
    name = request.path_params["model"]
    record = await asyncio.to_thread(
        services.registry.set_protection, principal, name, body.changes()
    )
    await services.control.refresh()
    return json_response(_protection_view(record))


async def clear_protection_key(request: Request) -> Response:
    """Lift an API key's extraction blocks and forget its scores (?model= one model)."""
    services, principal = await _admin(request)
    key_id = request.path_params["key_id"]
    model = request.query_params.get("model")
    board = RiskBoard(services.db, services.gateway.events)
    cleared = await asyncio.to_thread(board.clear, principal, key_id, model)
    if not cleared:
        raise NotFound(f"The key '{key_id}' has no extraction record.")
    await services.control.refresh()
    return json_response({"key_id": key_id, "cleared": cleared})


async def get_usage(request: Request) -> Response:
    """Metered usage; admins see every tenant, a tenant's admins their own."""
    services, principal = await _admin(request)
    query = request.query_params
    tenant = query.get("tenant")
    if not is_global_admin(principal):
        if tenant not in (None, principal.tenant_name):
            # Another tenant is "not found", like one that does not exist.
            raise not_found(principal, TENANT_NOT_FOUND)
        tenant = principal.tenant_name
    now = datetime.now(UTC)
    since = parse_since(query.get("since", "24h"), now)
    until = parse_since(query["until"], now) if "until" in query else None
    # What this gateway metered in the last seconds is written first.
    await asyncio.to_thread(services.meter.flush)
    rows = await asyncio.to_thread(
        lambda: usage_report(
            services.db,
            since=since,
            until=until,
            tenant=tenant,
            model=query.get("model"),
            group=query.get("group", "total"),
        )
    )
    _record_read(request, principal, "usage", tenant, len(rows))
    return json_response({"since": since.isoformat(), "data": rows})


routes = [
    admin_route("/admin/v1/tenants", list_tenants, methods=["GET"]),
    admin_route("/admin/v1/tenants", create_tenant, methods=["POST"]),
    admin_route("/admin/v1/tenants/{name}/disable", disable_tenant, methods=["POST"]),
    admin_route("/admin/v1/keys", list_keys, methods=["GET"]),
    admin_route("/admin/v1/keys", create_key, methods=["POST"]),
    admin_route("/admin/v1/keys/{key_id}/revoke", revoke_key, methods=["POST"]),
    admin_route("/admin/v1/keys/{key_id}", revoke_key, methods=["DELETE"]),
    admin_route("/admin/v1/keys/{key_id}/rotate", rotate_key, methods=["POST"]),
    admin_route("/admin/v1/models", list_models, methods=["GET"]),
    admin_route("/admin/v1/models/{name}", get_model, methods=["GET"]),
    admin_route("/admin/v1/models/{name}/load", load_model, methods=["POST"]),
    admin_route("/admin/v1/models/{name}/unload", unload_model, methods=["POST"]),
    admin_route("/admin/v1/quotas", list_quotas, methods=["GET"]),
    admin_route("/admin/v1/quotas/{kind}/{subject}", get_quota, methods=["GET"]),
    admin_route("/admin/v1/quotas/{kind}/{subject}", update_quota, methods=["PATCH", "PUT"]),
    admin_route("/admin/v1/quotas/{kind}/{subject}", remove_quota, methods=["DELETE"]),
    admin_route("/admin/v1/usage", get_usage, methods=["GET"]),
    admin_route("/admin/v1/protection", list_protection, methods=["GET"]),
    admin_route("/admin/v1/protection/models/{model}", update_protection, methods=["PATCH", "PUT"]),
    admin_route("/admin/v1/protection/keys/{key_id}", clear_protection_key, methods=["DELETE"]),
    admin_route(
        "/admin/v1/protection/overrides/{kind}/{subject}/{model}",
        update_override,
        methods=["PATCH", "PUT"],
    ),
    admin_route(
        "/admin/v1/protection/overrides/{kind}/{subject}/{model}",
        remove_override,
        methods=["DELETE"],
    ),
    *audit_log.routes,
]
