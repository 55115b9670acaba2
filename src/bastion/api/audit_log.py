"""Admin routes of the audit log: browse records, fetch checkpoints and proofs, verify.

Admins see every record; a tenant's admins only their tenant's records (checkpoints,
proofs and verification span all tenants, so they are for admins). Each read of records is
itself recorded (`admin.read`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from bastion.api.context import authenticate, json_response, services_of
from bastion.api.denials import admin_route, remember_caller
from bastion.api.services import Services
from bastion.audit import merkle
from bastion.audit.events import ADMIN_READ, Event
from bastion.audit.log import AuditLogError, iso_time
from bastion.audit.note import b64encode
from bastion.audit.writer import AuditWriter, VerificationRunning
from bastion.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from bastion.identity.grants import (
    TENANT_NAME_PATTERN,
    TENANT_NOT_FOUND,
    is_global_admin,
    not_found,
)
from bastion.identity.principal import Principal

DEFAULT_PAGE = 100
MAX_PAGE = 1000
# What the database's BIGINT columns hold.
MAX_INT = 2**63 - 1


async def _caller(
    request: Request, *, global_only: bool
) -> tuple[Services, Principal, AuditWriter]:
    services = services_of(request)
    principal = await authenticate(request)
    services.gateway.authorize(principal, "admin")
    remember_caller(request, principal)
    if global_only and not is_global_admin(principal):
        raise PermissionDenied("The audit log's checkpoints and proofs are for admin keys.")
    audit = services.control.audit
    if audit is None:
        raise NotFound("This server keeps no audit log.")
    return services, principal, audit


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer.", param=name) from None
    if not 0 <= number <= MAX_INT:
        raise InvalidRequest(f"{name} must lie between 0 and 2^63-1.", param=name)
    return number


def _tenant(request: Request) -> str | None:
    value = request.query_params.get("tenant")
    if value is not None and not TENANT_NAME_PATTERN.fullmatch(value):
        raise InvalidRequest("tenant is not a tenant name.", param="tenant")
    return value


async def list_records(request: Request) -> Response:
    services, principal, audit = await _caller(request, global_only=False)
    tenant = _tenant(request)
    if not is_global_admin(principal):
        if tenant not in (None, principal.tenant_name):
            raise not_found(principal, TENANT_NOT_FOUND)
        tenant = principal.tenant_name
    after = _int(request, "after")
    since = _int(request, "since_ms")
    until = _int(request, "until_ms")
    limit = min(_int(request, "limit", DEFAULT_PAGE) or DEFAULT_PAGE, MAX_PAGE)
    await asyncio.to_thread(audit.flush)
    records = await asyncio.to_thread(
        lambda: audit.log.records(
            after_seq=after, since_ms=since, until_ms=until, tenant=tenant, limit=limit
        )
    )
    services.gateway.events.emit(
        Event(
            kind=ADMIN_READ,
            actor=principal.key_id,
            tenant=tenant,
            target="audit",
            detail={"records": len(records)},
        )
    )
    return json_response(
        {
            "data": [r.fields() for r in records],
            "next_after": records[-1].seq if len(records) == limit else None,
        }
    )


async def list_checkpoints(request: Request) -> Response:
    _, _, audit = await _caller(request, global_only=True)
    after = _int(request, "after")
    limit = min(_int(request, "limit", DEFAULT_PAGE) or DEFAULT_PAGE, MAX_PAGE)
    rows = await asyncio.to_thread(lambda: audit.log.checkpoints(after_size=after, limit=limit))
    verifier = await asyncio.to_thread(audit.log.own_verifier)
    return json_response(
        {
            "key": verifier.encode() if verifier else None,
            "data": [
                {"size": c.size, "signed_at": iso_time(c.at_ms), "note": c.note} for c in rows
            ],
            "next_after": rows[-1].size if len(rows) == limit else None,
        }
    )


async def latest_checkpoint(request: Request) -> Response:
    """The latest signed checkpoint as a note (text/plain), the form witnesses fetch."""
    _, _, audit = await _caller(request, global_only=True)
    latest = await asyncio.to_thread(audit.log.latest_checkpoint)
    if latest is None:
        raise NotFound("No checkpoint is signed yet.")
    return PlainTextResponse(latest.note)


async def inclusion_proof(request: Request) -> Response:
    _, _, audit = await _caller(request, global_only=True)
    index = _int(request, "index")
    if index is None:
        raise InvalidRequest("index is required.", param="index")
    latest = await asyncio.to_thread(audit.log.latest_checkpoint)
    size = _int(request, "size", latest.size if latest else None)
    if size is None or index >= size:
        raise InvalidRequest("index must lie inside a signed tree size.", param="index")

    def prove() -> dict[str, Any]:
        record = audit.log.records(after_seq=index - 1, limit=1)
        if not record or record[0].seq != index:
            raise NotFound(f"Record {index} is not in the log (pruned or never written).")
        try:
            leaves = audit.log.leaves(size)
            proof = merkle.inclusion_proof(index, leaves)
        except (AuditLogError, ValueError):
            raise InvalidRequest(
                f"The log holds no tree of {size} records with record {index} in it.",
                param="size",
            ) from None
        signed = audit.log.checkpoint_at(size)
        return {
            "index": index,
            "size": size,
            "entry": record[0].entry,
            "leaf_hash": b64encode(record[0].leaf_hash),
            "root": b64encode(merkle.root_hash(leaves)),
            "proof": [b64encode(node) for node in proof],
            "checkpoint": signed.note if signed is not None else None,
        }

    return json_response(await asyncio.to_thread(prove))


async def verification(request: Request) -> Response:
    """GET: the last scheduled verification; POST: verify the whole log now."""
    _, _, audit = await _caller(request, global_only=True)
    if request.method == "POST":
        try:
            report = await asyncio.to_thread(lambda: audit.verify(wait=False))
        except VerificationRunning:
            raise Conflict("A verification of the audit log is running; retry later.") from None
        if report is None:
            return json_response({"ok": True, "size": 0, "problems": []})
        return json_response(report.as_dict())
    last = audit.last_verify
    return json_response({"last": last.as_dict() if last is not None else None})


routes = [
    admin_route("/admin/v1/audit/records", list_records, methods=["GET"]),
    admin_route("/admin/v1/audit/checkpoints", list_checkpoints, methods=["GET"]),
    admin_route("/admin/v1/audit/checkpoint", latest_checkpoint, methods=["GET"]),
    admin_route("/admin/v1/audit/proof", inclusion_proof, methods=["GET"]),
    admin_route("/admin/v1/audit/verify", verification, methods=["GET", "POST"]),
]
