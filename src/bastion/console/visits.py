"""One request to a signed-in page, from the session cookie to the rendered answer.

:func:`page` makes a route of a handler. Before the handler runs, the session is found
(none, or timed out: back to the sign-in page), its credential is checked again
(credentials.py: a revoked key or a disabled tenant ends the session), and a POST is
checked for its origin and its form's CSRF token. The handler gets a :class:`Visit`.

What the services refuse is answered here, in one place: a refusal of rights is recorded
(``auth.denied``, as the admin API records it) and shown as a 403 page; a missing or
foreign tenant or key is a 404 page (recorded as well, for a tenant's admin: OutOfScope);
a form the services find wrong goes back to its page with the message (the page the route
names).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from bastion.api.denials import REASON_CROSS_TENANT
from bastion.api.services import Services
from bastion.audit.events import ACCESS_DENIED, ADMIN_READ, CONSOLE_SIGNED_OUT, Event
from bastion.console.credentials import (
    ENDED_TIMEOUT,
    SessionEnded,
    key_principal,
    sso_principal,
)
from bastion.console.guard import (
    CSRF_FIELD,
    SESSION_COOKIE,
    Form,
    check_same_origin,
    check_token,
    clear_cookie,
    is_tls,
    read_cookie,
    read_form,
)
from bastion.console.sessions import BY_KEY, Session
from bastion.console.state import Console, console_of
from bastion.errors import (
    BastionError,
    Conflict,
    InvalidRequest,
    NotFound,
    OutOfScope,
    PermissionDenied,
)
from bastion.identity.grants import is_global_admin
from bastion.identity.principal import Principal

SIGN_IN = "/console/sign-in"
# Where a form may ask to be sent back to: a console page, with a plain query.
_BACK = re.compile(r"/console(/[A-Za-z0-9_.-]+)*(\?[A-Za-z0-9_.=&%-]*)?")


@dataclass(slots=True)
class Visit:
    """A signed-in request: its session, the principal its credential gives now, and for
    a POST its (checked) form."""

    request: Request
    console: Console
    session: Session
    principal: Principal
    form: Form = field(default_factory=lambda: Form(()))

    @property
    def services(self) -> Services:
        return self.console.services

    @property
    def is_admin(self) -> bool:
        return is_global_admin(self.principal)

    def query(self, name: str) -> str | None:
        """A query parameter; None when absent or blank."""
        value = self.request.query_params.get(name, "").strip()
        return value or None

    def render(self, template: str, section: str, status: int = 200, **context: Any) -> Response:
        """A page of the signed-in console: `context` and what every page shows."""
        return self.console.pages.render(
            template,
            {
                "me": self.principal,
                "session": self.session,
                "csrf": self.session.csrf,
                "flashes": self.session.take_flashes(),
                "is_admin": self.is_admin,
                "section": section,
                "sso": self.session.method != BY_KEY,
                "plain_http": not is_tls(self.request),
                **context,
            },
            status,
        )

    def back(self, default: str, *, ok: str | None = None, error: str | None = None) -> Response:
        """303 to the page the form names in `back` (a console page), else `default`, with
        a message for it."""
        if ok:
            self.session.flash("ok", ok)
        if error:
            self.session.flash("error", error)
        asked = self.form.get("back")
        return RedirectResponse(asked if _BACK.fullmatch(asked) else default, status_code=303)

    def emit(self, event: Event) -> None:
        self.services.gateway.events.emit(event)

    def record_read(self, target: str, tenant: str | None, count: int) -> None:
        """An admin read the audit trail must show (who read which keys, usage, audit),
        as the admin API records it."""
        self.emit(
            Event(
                kind=ADMIN_READ,
                actor=self.principal.key_id,
                tenant=tenant,
                target=target,
                detail={"records": count, "via": "console"},
            )
        )

    def denied(self, path: str, detail: dict[str, str | int | float | bool | None]) -> None:
        """Record that this visit's principal was refused `path` (as the admin API does)."""
        self.emit(
            Event(
                kind=ACCESS_DENIED,
                outcome="failure",
                actor=self.principal.key_id,
                tenant=self.principal.tenant_name,
                target=path,
                detail={"action": "console", "method": self.request.method, **detail},
            )
        )

    def ended(self, sessions: Sequence[Session], reason: str) -> None:
        """Record that `sessions` were ended by this visit's principal."""
        for session in sessions:
            self.emit(signed_out(session, reason, by=self.principal.key_id))


Handler = Callable[[Visit], Awaitable[Response]]


def signed_out(session: Session, reason: str, *, by: str | None = None) -> Event:
    detail: dict[str, str | int | float | bool | None] = {
        "session": session.short_id,
        "method": session.method,
        "reason": reason,
    }
    if by is not None:
        detail["by"] = by
    return Event(
        kind=CONSOLE_SIGNED_OUT,
        actor=session.principal.key_id,
        tenant=session.principal.tenant_name,
        detail=detail,
    )


def to_sign_in(request: Request, reason: str | None) -> Response:
    """303 to the sign-in page (saying why, by a code it knows), the session cookie gone."""
    target = SIGN_IN if reason is None else f"{SIGN_IN}?ended={quote(reason)}"
    response = RedirectResponse(target, status_code=303)
    clear_cookie(response, request, SESSION_COOKIE)
    return response


async def current_principal(console: Console, session: Session) -> Principal:
    """What the session's credential gives now; SessionEnded if it no longer holds."""
    db = console.services.db
    if session.method == BY_KEY:
        now = datetime.now(UTC)
        return await asyncio.to_thread(key_principal, db, session.principal.key_id, now)
    return await asyncio.to_thread(sso_principal, db, session.principal)


def page(
    path: str, handler: Handler, *, methods: Sequence[str] = ("GET",), back: str | None = None
) -> Route:
    """A route of the signed-in console; a POST's refusals go back to `back` (a page)."""

    async def serve(request: Request) -> Response:
        console = console_of(request)
        cookie = read_cookie(request, SESSION_COOKIE)
        session = console.sessions.find(cookie)
        if session is None:
            reason = console.sessions.why_ended(cookie) or (ENDED_TIMEOUT if cookie else None)
            return to_sign_in(request, reason)
        try:
            session.principal = await current_principal(console, session)
        except SessionEnded as ended:
            console.sessions.end(session, ended.reason)
            console.services.gateway.events.emit(signed_out(session, ended.reason))
            return to_sign_in(request, ended.reason)
        # The access log's tenant label.
        request.scope.setdefault("state", {})["tenant"] = session.principal.tenant_name
        visit = Visit(request, console, session, session.principal)
        try:
            if request.method == "POST":
                check_same_origin(request)
                visit.form = await read_form(request)
                check_token(session.csrf, visit.form.get(CSRF_FIELD) or None)
            return await handler(visit)
        except PermissionDenied as exc:
            visit.denied(path, {"code": exc.code})
            if back is not None and exc.code != "csrf":
                return visit.back(back, error=exc.message)
            return error_page(visit, exc)
        except OutOfScope as exc:
            # Answered as a missing tenant or key is, and recorded as a refusal.
            visit.denied(path, {"reason": REASON_CROSS_TENANT})
            if back is not None and request.method == "POST":
                return visit.back(back, error=exc.message)
            return error_page(visit, exc)
        except (InvalidRequest, Conflict, NotFound) as exc:
            if back is not None and request.method == "POST":
                return visit.back(back, error=exc.message)
            return error_page(visit, exc)
        except BastionError as exc:
            return error_page(visit, exc)

    return Route(path, serve, methods=list(methods), name=f"console_{handler.__name__}")


def error_page(visit: Visit, exc: BastionError) -> Response:
    response = visit.render(
        "error.html", "", status=exc.status, status_code=exc.status, message=exc.message
    )
    if "retry-after" in exc.headers:
        response.headers["retry-after"] = exc.headers["retry-after"]
    return response
