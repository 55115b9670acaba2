"""Admin routes record their refusals: a tenant's admin reaching beyond its tenant, or a
key without the role, leaves an `auth.denied` event (alerts count them as escalation
attempts), whichever service refused it.

A tenant's admin naming another tenant, or a key of another tenant, gets the 404 of a
missing one (:class:`~bastion.errors.OutOfScope`), so that it cannot probe which exist;
the refusal is recorded all the same, with the reason ``cross_tenant``. The record says
nothing of whether the target exists either: it is the same for a missing one, since a
tenant's admins read their tenant's audit records.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.api.context import services_of
from bastion.audit.events import ACCESS_DENIED, Event
from bastion.errors import OutOfScope, PermissionDenied
from bastion.identity.principal import Principal

Endpoint = Callable[[Request], Awaitable[Response]]
_STATE_KEY = "admin_principal"
# The reason of a refusal answered as "not found" (a tenant or key beyond the caller's).
REASON_CROSS_TENANT = "cross_tenant"


def remember_caller(request: Request, principal: Principal) -> None:
    """Called once the caller may use the admin API at all: refusals after it are its."""
    request.scope.setdefault("state", {})[_STATE_KEY] = principal


def admin_route(path: str, endpoint: Endpoint, methods: Sequence[str]) -> Route:
    async def recorded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except PermissionDenied:
            _record(request, path, {})
            raise
        except OutOfScope:
            _record(request, path, {"reason": REASON_CROSS_TENANT})
            raise

    return Route(path, recorded, methods=list(methods), name=endpoint.__name__)


def _record(request: Request, path: str, detail: dict[str, str]) -> None:
    principal = request.scope.get("state", {}).get(_STATE_KEY)
    if isinstance(principal, Principal):
        services_of(request).gateway.events.emit(
            Event(
                kind=ACCESS_DENIED,
                outcome="failure",
                actor=principal.key_id,
                tenant=principal.tenant_name,
                target=path,
                detail={"action": "admin", "method": request.method, **detail},
            )
        )
