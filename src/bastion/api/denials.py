"""Admin routes record their refusals: a tenant's admin reaching beyond its tenant, or a
key without the role, leaves an `auth.denied` event (alerts count them as escalation
attempts), whichever service refused it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.api.context import services_of
from bastion.audit.events import ACCESS_DENIED, Event
from bastion.errors import PermissionDenied
from bastion.identity.principal import Principal

Endpoint = Callable[[Request], Awaitable[Response]]
_STATE_KEY = "admin_principal"


def remember_caller(request: Request, principal: Principal) -> None:
    """Called once the caller may use the admin API at all: refusals after it are its."""
    request.scope.setdefault("state", {})[_STATE_KEY] = principal


def admin_route(path: str, endpoint: Endpoint, methods: Sequence[str]) -> Route:
    async def recorded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except PermissionDenied:
            principal = request.scope.get("state", {}).get(_STATE_KEY)
            if isinstance(principal, Principal):
                services_of(request).gateway.events.emit(
                    Event(
                        kind=ACCESS_DENIED,
                        outcome="failure",
                        actor=principal.key_id,
                        tenant=principal.tenant_name,
                        target=path,
                        detail={"action": "admin", "method": request.method},
                    )
                )
            raise

    return Route(path, recorded, methods=list(methods), name=endpoint.__name__)
