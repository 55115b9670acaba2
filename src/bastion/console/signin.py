"""Signing in and out: with an API key, or through the OpenID Connect provider.

A key is checked by the gateway's own authentication, through the throttle of failed
attempts, so a failed console sign-in is an ``auth.failed`` event and counts towards a
lock-out like any other. Only admin and tenant-admin credentials get a session; anyone
else is refused and recorded (``auth.denied``). A new session gets a new random cookie
(never one the browser brought), and its sign-in is recorded (``console.signed_in``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from bastion.api.context import AUTH_THROTTLE_STATE
from bastion.api.services import Services
from bastion.audit.events import ACCESS_DENIED, AUTH_FAILED, CONSOLE_SIGNED_IN, Event
from bastion.console.credentials import (
    ENDED_MESSAGES,
    SIGNED_OUT,
    require_console_role,
    require_key,
    signed_in_user,
)
from bastion.console.guard import (
    CSRF_FIELD,
    PRE_SESSION_COOKIE,
    PRE_SESSION_MAX_AGE_S,
    SESSION_COOKIE,
    SSO_COOKIE,
    PreSession,
    check_same_origin,
    clear_cookie,
    is_tls,
    read_cookie,
    read_form,
    set_cookie,
)
from bastion.console.sessions import BY_KEY, BY_SSO
from bastion.console.state import Console, console_of
from bastion.console.visits import Visit, signed_out, to_sign_in
from bastion.errors import (
    AuthenticationError,
    AuthThrottled,
    BastionError,
    PermissionDenied,
    TokenRejected,
)
from bastion.identity.principal import Principal

HOME = "/console"


def _sign_in_page(
    request: Request, console: Console, *, error: str | None = None, status: int = 200
) -> Response:
    """The sign-in page, with a fresh pre-session cookie and its form's token."""
    value = PreSession.new_value()
    notice = ENDED_MESSAGES.get(request.query_params.get("ended", ""))
    response = console.pages.render(
        "sign_in.html",
        {
            "token": console.pre_session.token(value),
            "sso": console.oidc is not None,
            "notice": notice,
            "error": error,
            "plain_http": not is_tls(request),
        },
        status,
    )
    set_cookie(
        response,
        request,
        PRE_SESSION_COOKIE,
        value,
        max_age=PRE_SESSION_MAX_AGE_S,
        strict=True,
    )
    return response


async def sign_in_page(request: Request) -> Response:
    console = console_of(request)
    if console.sessions.find(read_cookie(request, SESSION_COOKIE)) is not None:
        return RedirectResponse(HOME, status_code=303)
    return _sign_in_page(request, console)


async def sign_in(request: Request) -> Response:
    """POST of the key form."""
    console = console_of(request)
    console.warn_plain_http(request)
    try:
        check_same_origin(request)
        form = await read_form(request)
        console.pre_session.check(
            read_cookie(request, PRE_SESSION_COOKIE), form.get(CSRF_FIELD) or None
        )
    except PermissionDenied as exc:
        return _sign_in_page(request, console, error=exc.message, status=403)
    except BastionError as exc:
        return _sign_in_page(request, console, error=exc.message, status=exc.status)
    services = console.services
    try:
        principal = await _authenticate(request, services, form.get("key").strip())
        try:
            require_key(principal)
            require_console_role(principal)
        except PermissionDenied:
            _denied(services, principal)
            raise
    except AuthThrottled as exc:
        wait = exc.headers.get("retry-after", "a few")
        message = f"Too many failed sign-ins from here: try again in {wait} seconds."
        return _sign_in_page(request, console, error=message, status=429)
    except (AuthenticationError, PermissionDenied) as exc:
        return _sign_in_page(request, console, error=exc.message, status=exc.status)
    response = RedirectResponse(HOME, status_code=303)
    _start_session(request, console, principal, BY_KEY, response)
    return response


async def _authenticate(request: Request, services: Services, key: str) -> Principal:
    """The key's principal, as the gateway authenticates any request (and throttles its
    failures by the client's address)."""
    authorization = f"Bearer {key}"
    throttle = getattr(request.app.state, AUTH_THROTTLE_STATE, None)
    if throttle is None:
        return await services.gateway.authenticate(authorization)
    principal: Principal = await throttle.authenticate(
        services.gateway.authenticate, authorization, request.scope.get("client")
    )
    return principal


def _denied(services: Services, principal: Principal) -> None:
    services.gateway.events.emit(
        Event(
            kind=ACCESS_DENIED,
            outcome="failure",
            actor=principal.key_id,
            tenant=principal.tenant_name,
            target=HOME,
            detail={"action": "console", "role": principal.role},
        )
    )


def _start_session(
    request: Request, console: Console, principal: Principal, method: str, response: Response
) -> None:
    value, session = console.sessions.create(principal, method)
    console.services.gateway.events.emit(
        Event(
            kind=CONSOLE_SIGNED_IN,
            actor=principal.key_id,
            tenant=principal.tenant_name,
            detail={"session": session.short_id, "method": method, "role": principal.role},
        )
    )
    set_cookie(
        response,
        request,
        SESSION_COOKIE,
        value,
        max_age=int(console.sessions.max_age_s),
        strict=True,
    )
    clear_cookie(response, request, PRE_SESSION_COOKIE)


async def sso_start(request: Request) -> Response:
    """Send the browser to the provider, the sign-in bound to it by a cookie."""
    console = console_of(request)
    client = console.oidc
    if client is None:
        return _sign_in_page(request, console, error="Single sign-on is not set up.", status=404)
    console.warn_plain_http(request)
    try:
        # Reads the provider's discovery document the first time: in a thread.
        started = await asyncio.to_thread(client.start)
    except TokenRejected:
        message = "The identity provider cannot be reached; try again later."
        return _sign_in_page(request, console, error=message, status=503)
    response = RedirectResponse(started.url, status_code=303)
    set_cookie(
        response,
        request,
        SSO_COOKIE,
        console.pending.add(started),
        max_age=PRE_SESSION_MAX_AGE_S,
        strict=False,
    )
    return response


async def sso_callback(request: Request) -> Response:
    """The provider's redirect back: finish the sign-in this browser started."""
    console = console_of(request)
    client = console.oidc
    if client is None:
        return _sign_in_page(request, console, error="Single sign-on is not set up.", status=404)
    started = console.pending.take(read_cookie(request, SSO_COOKIE))
    if started is None:
        message = "This sign-in was not started here, or took too long: please start again."
        return _sign_in_page(request, console, error=message, status=400)
    services = console.services
    callback: dict[str, Any] = dict(request.query_params)
    try:
        principal = await asyncio.to_thread(client.finish, started, callback)
    except TokenRejected as exc:
        services.gateway.events.emit(
            Event(
                kind=AUTH_FAILED,
                outcome="failure",
                detail={"reason": exc.reason or "malformed", "credential": "oidc"},
            )
        )
        return _sign_in_page(request, console, error=exc.message, status=401)
    try:
        require_console_role(principal)
    except PermissionDenied as exc:
        _denied(services, principal)
        return _sign_in_page(request, console, error=exc.message, status=403)
    # Not a redirect: after a cross-site navigation (the provider's redirect here), a
    # browser would not send the new SameSite=Strict cookie with the redirect's request.
    # This page goes on to the console from this origin.
    response = console.pages.render("signed_in.html", {"home": HOME})
    _start_session(request, console, signed_in_user(principal), BY_SSO, response)
    clear_cookie(response, request, SSO_COOKIE)
    return response


async def sign_out(visit: Visit) -> Response:
    visit.console.sessions.end(visit.session, SIGNED_OUT)
    visit.emit(signed_out(visit.session, SIGNED_OUT))
    return to_sign_in(visit.request, SIGNED_OUT)


async def static_file(request: Request) -> Response:
    console = console_of(request)
    answer = console.assets.answer(
        request.path_params["name"], request.headers.get("if-none-match")
    )
    if answer is None:
        return console.pages.render(
            "bare_error.html", {"status_code": 404, "message": "No such file."}, 404
        )
    return answer
