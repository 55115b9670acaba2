"""Pages that manage who may call Bastion: tenants, API keys, quotas, console sessions.

Each goes through the service the admin API uses (identity/service.py, quotas/store.py)
with the session's principal, so the same rules hold: an admin manages every tenant; a
tenant's admin sees and changes its own tenant only, and another tenant is "not found".
The services record every change (the audit log names the session's principal); reads of
keys are recorded as the admin API records them. A key's secret appears once, in the
answer to the POST that made it, and is kept nowhere.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response

from bastion.console.credentials import (
    ENDED_BY_ADMIN,
    ENDED_REVOKED,
    ENDED_TENANT_DISABLED,
    may_end,
)
from bastion.console.visits import Visit
from bastion.errors import InvalidRequest, NotFound
from bastion.identity.principal import (
    ACTIONS,
    ALLOWED_ACTIONS,
    ROLE_ADMIN,
    ROLE_CONSUMER,
    ROLE_TENANT_ADMIN,
)
from bastion.identity.service import KeyInfo
from bastion.quotas.store import DEFAULT_TENANT, KEY, LIMIT_FIELDS, TENANT

# ---------------------------------------------------------------- tenants


async def tenants(visit: Visit) -> Response:
    identity = visit.services.identity
    found = await asyncio.to_thread(identity.list_tenants, visit.principal)
    return visit.render("tenants.html", "tenants", tenants=found)


async def tenant(visit: Visit) -> Response:
    name = visit.request.path_params["name"]
    identity, quotas = visit.services.identity, visit.services.quotas
    info = await asyncio.to_thread(identity.get_tenant, visit.principal, name)
    keys = await asyncio.to_thread(identity.list_keys, visit.principal, name)
    visit.record_read("keys", name, len(keys))
    quota = await asyncio.to_thread(quotas.get, visit.principal, TENANT, name)
    return visit.render(
        "tenant.html",
        "tenants",
        tenant=info,
        keys=keys,
        quota=quota,
        limit_fields=LIMIT_FIELDS,
        now=datetime.now(UTC),
    )


async def create_tenant(visit: Visit) -> Response:
    name = visit.form.get("name").strip()
    created = await asyncio.to_thread(visit.services.identity.create_tenant, visit.principal, name)
    await visit.services.control.refresh()
    return visit.back("/console/tenants", ok=f"Tenant {created.name} created.")


async def disable_tenant(visit: Visit) -> Response:
    name = visit.request.path_params["name"]
    info = await asyncio.to_thread(visit.services.identity.disable_tenant, visit.principal, name)
    # Its people's console sessions end now (each would end at its next request anyway).
    ended = visit.console.sessions.end_where(
        lambda s: s.principal.tenant_id == info.id, ENDED_TENANT_DISABLED
    )
    visit.ended(ended, ENDED_TENANT_DISABLED)
    await visit.services.control.refresh()
    return visit.back("/console/tenants", ok=f"Tenant {name} disabled: its keys stop working.")


# ---------------------------------------------------------------- keys


def _key_state(key: KeyInfo, now: datetime) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and now >= key.expires_at:
        return "expired"
    return "active"


async def keys(visit: Visit) -> Response:
    identity = visit.services.identity
    tenant = visit.query("tenant")
    found = await asyncio.to_thread(identity.list_keys, visit.principal, tenant)
    visit.record_read("keys", tenant, len(found))
    choices = await asyncio.to_thread(identity.list_tenants, visit.principal)
    now = datetime.now(UTC)
    roles = [ROLE_CONSUMER, ROLE_TENANT_ADMIN] + ([ROLE_ADMIN] if visit.is_admin else [])
    grantable = [a for a in ACTIONS if a in ALLOWED_ACTIONS[visit.principal.role]]
    if not visit.is_admin:
        grantable = [a for a in grantable if a in visit.principal.actions]
    return visit.render(
        "keys.html",
        "keys",
        keys=[(k, _key_state(k, now)) for k in found],
        tenant=tenant,
        tenants=[t for t in choices if not t.disabled],
        roles=roles,
        actions=grantable,
    )


def _expiry(text: str) -> datetime | None:
    """A datetime-local field's value (taken as UTC), or an ISO 8601 time with a zone."""
    text = text.strip()
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest("The expiry must be a date and time.", param="expires_at") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


async def create_key(visit: Visit) -> Response:
    form = visit.form
    models = [m for m in form.get("models").replace(",", " ").split() if m]
    actions = form.all("actions")
    identity = visit.services.identity
    info, token = await asyncio.to_thread(
        lambda: identity.create_key(
            visit.principal,
            tenant=form.get("tenant").strip(),
            role=form.get("role", ROLE_CONSUMER),
            models=models or None,
            actions=actions or None,
            expires_at=_expiry(form.get("expires_at")),
            name=form.get("name") or None,
        )
    )
    await visit.services.control.refresh()
    return visit.render("key_created.html", "keys", status=201, key=info, token=token)


async def revoke_key(visit: Visit) -> Response:
    key_id = visit.request.path_params["key_id"]
    info = await asyncio.to_thread(visit.services.identity.revoke_key, visit.principal, key_id)
    ended = visit.console.sessions.end_where(lambda s: s.principal.key_id == info.id, ENDED_REVOKED)
    visit.ended(ended, ENDED_REVOKED)
    await visit.services.control.refresh()
    return visit.back("/console/keys", ok=f"Key {info.id} revoked.")


async def rotate_key(visit: Visit) -> Response:
    key_id = visit.request.path_params["key_id"]
    info, token = await asyncio.to_thread(
        visit.services.identity.rotate_key, visit.principal, key_id
    )
    ended = visit.console.sessions.end_where(lambda s: s.principal.key_id == key_id, ENDED_REVOKED)
    visit.ended(ended, ENDED_REVOKED)
    await visit.services.control.refresh()
    return visit.render("key_created.html", "keys", status=201, key=info, token=token)


# ---------------------------------------------------------------- quotas


async def quotas(visit: Visit) -> Response:
    tenant = visit.query("tenant")
    rows = await asyncio.to_thread(visit.services.quotas.list, visit.principal, tenant)
    return visit.render(
        "quotas.html",
        "quotas",
        quotas=rows,
        tenant=tenant,
        limit_fields=LIMIT_FIELDS,
        default_tenant=DEFAULT_TENANT,
    )


def _quota_changes(visit: Visit, kind: str) -> dict[str, int | float | None]:
    """Every limit of the form: a number sets it, a blank clears it."""
    changes: dict[str, int | float | None] = {}
    for name in LIMIT_FIELDS:
        text = visit.form.get(name).strip().replace(",", "").replace("_", "")
        try:
            changes[name] = int(text) if text else None
        except ValueError:
            raise InvalidRequest(f"{name} must be a whole number.", param=name) from None
    if kind == TENANT:
        text = visit.form.get("weight").strip()
        try:
            changes["weight"] = float(text) if text else None
        except ValueError:
            raise InvalidRequest("weight must be a number.", param="weight") from None
    return changes


async def set_quota(visit: Visit) -> Response:
    kind = visit.form.get("kind")
    if kind not in (TENANT, KEY):
        raise InvalidRequest("A quota is set on a tenant or on a key.", param="kind")
    subject = visit.form.get("subject").strip()
    changes = _quota_changes(visit, kind)
    store = visit.services.quotas
    await asyncio.to_thread(store.set, visit.principal, kind, subject, changes)
    await visit.services.control.refresh()
    return visit.back("/console/quotas", ok=f"Quota of {kind} {subject} saved.")


async def remove_quota(visit: Visit) -> Response:
    kind, subject = visit.form.get("kind"), visit.form.get("subject")
    await asyncio.to_thread(visit.services.quotas.remove, visit.principal, kind, subject)
    await visit.services.control.refresh()
    return visit.back("/console/quotas", ok=f"Quota of {kind} {subject} removed.")


# ---------------------------------------------------------------- console sessions


def _session_rows(visit: Visit) -> list[dict[str, Any]]:
    return [
        {"session": s, "current": s is visit.session}
        for s in visit.console.sessions.active()
        if s is visit.session or may_end(visit.principal, s.principal)
    ]


async def sessions(visit: Visit) -> Response:
    return visit.render("sessions.html", "sessions", rows=_session_rows(visit))


async def end_session(visit: Visit) -> Response:
    """End one session, or (everywhere) every session of the same key or SSO user."""
    short_id = visit.request.path_params["session"]
    target = next(
        (row["session"] for row in _session_rows(visit) if row["session"].short_id == short_id),
        None,
    )
    if target is None:
        raise NotFound("No console session has this id.")
    owner = target.principal.key_id
    if visit.form.get("everywhere"):
        ended = visit.console.sessions.end_where(
            lambda s: s.principal.key_id == owner and may_end(visit.principal, s.principal),
            ENDED_BY_ADMIN,
        )
    else:
        visit.console.sessions.end(target, ENDED_BY_ADMIN)
        ended = [target]
    visit.ended(ended, ENDED_BY_ADMIN)
    noun = "session" if len(ended) == 1 else "sessions"
    return visit.back("/console/sessions", ok=f"{len(ended)} {noun} of {owner} ended.")
