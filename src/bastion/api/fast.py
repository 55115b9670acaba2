"""The inference routes' way in: straight to their endpoints, in front of the Starlette app.

Starlette serves a request through six layers (the app, its error middleware, the access
log, its exception middleware, the router trying each route's pattern in turn, the
route's exception wrapper), each with a send wrapper of its own; on the hot path of a
small inference request they took a fifth of the gateway's time. :class:`FastPath` takes
a request for an inference route (``POST`` to a path of an :func:`~bastion.api.admission.
inference` endpoint) itself, by a table of its paths (and a split of the path for those
with parameters, as the Open Inference Protocol's), and does what those layers do for it:

- the scope gets what the router gives it (``app``, ``router``, ``route``, ``endpoint``,
  ``path_params``), and the endpoint runs on a Starlette :class:`Request` as before;
- what the endpoint raises is answered by the app's own exception handlers, as the
  route's exception wrapper would (api/errors.py: the same status, headers and body); an
  error no handler takes is logged by type and answered 500, as the access log does;
- the access log line, the metrics sample and the end of a request whose client left
  are api/access.py's own (its ``finish`` and ``_Departure``);
- an admitted call's answer (a plain body) is sent as two messages straight to the
  server, its ``x-ratelimit-*`` headers added and its quotas settled afterwards, as
  api/admission.py's ``Settled`` does; a streamed answer goes through one send wrapper.

Everything else (other methods and paths, a path that only looks like an inference
route, an app mounted under a root path, lifespan) goes to the Starlette app unchanged.

Being the gateway's app, it also puts the server's throttle of failed authentication
(gateway/auth_throttle.py) where api/context.py's ``authenticate`` finds it, for every
route of both paths.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any, cast

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from bastion.api.access import (
    CLIENT_CLOSED,
    AccessLog,
    _Departure,
    _nothing,
    answer_unhandled,
    finish,
)
from bastion.api.admission import INFERENCE_MARK, Settled
from bastion.api.context import AUTH_THROTTLE_STATE
from bastion.api.errors import Handler, handler_for
from bastion.api.services import Services
from bastion.api.transport import ON_CLIENT_LEFT, WRITES, HeldWrites
from bastion.gateway.auth_throttle import AuthThrottle, ThrottlePolicy
from bastion.observability.metrics import Metrics

_WHOLE_CALL = Response.__call__


class _Template:
    """A route whose path has parameters, cut at its slashes: each part a literal, or
    None for a parameter (a plain one: a non-empty part without a slash)."""

    __slots__ = ("params", "parts", "route", "shadows")

    def __init__(self, route: Route, parts: tuple[str | None, ...], shadows: list[Route]) -> None:
        self.route = route
        self.parts = parts
        self.params = tuple((i, name) for i, name in enumerate(_param_names(route)) if name)
        # Routes before it in the router that may take some of its requests: where one
        # does, the request goes to the router.
        self.shadows = shadows

    def match(self, path: str, parts: list[str]) -> dict[str, Any] | None:
        for want, got in zip(self.parts, parts, strict=True):
            if want is None:
                if not got:
                    return None
            elif want != got:
                return None
        for route in self.shadows:
            if route.path_regex.match(path):
                return None
        return {name: parts[i] for i, name in self.params}


class FastPath:
    """The gateway's ASGI app: inference routes served directly, the rest by `app`."""

    def __init__(
        self, app: Starlette, metrics: Metrics, before_answer: Callable[[], None] | None = None
    ) -> None:
        self.app = app
        self.state = app.state
        self.metrics = metrics
        # Called as an answer starts, as the access log calls it.
        self.before_answer = before_answer or _nothing
        self._handlers: dict[type[Exception], Handler] = {}
        self._status_handlers: dict[int, Handler] = {}
        # (method, path) -> route, for templates without parameters.
        self._exact: dict[tuple[str, str], Route] = {}
        # (method, number of parts) -> templates with parameters, in the router's order.
        self._templates: dict[tuple[str, int], list[_Template]] = {}
        services = getattr(app.state, "services", None)
        if isinstance(services, Services):
            setattr(app.state, AUTH_THROTTLE_STATE, auth_throttle_of(services))
        if _plain_stack(app) and self._take_handlers(app):
            self._take_routes(app)

    def _take_handlers(self, app: Starlette) -> bool:
        """The exception handlers the route's wrapper would use (ExceptionMiddleware's
        tables); False if they are not all coroutines, or HTTPException has none of its
        own (the fast path is then off)."""
        for key, handler in app.exception_handlers.items():
            if key in (500, Exception):
                # ServerErrorMiddleware's: the access log answers unhandled errors first.
                continue
            if not inspect.iscoroutinefunction(handler):
                return False
            if isinstance(key, int):
                self._status_handlers[key] = handler
            else:
                self._handlers[key] = handler
        return HTTPException in self._handlers

    def _take_routes(self, app: Starlette) -> None:
        earlier: list[Route] = []
        for route in app.routes:
            if not isinstance(route, Route):
                # A mount or host could match anything after it: stop taking routes.
                return
            parts = _template_parts(route)
            if (
                getattr(route.endpoint, INFERENCE_MARK, False)
                and route.methods
                and inspect.iscoroutinefunction(route.endpoint)
                and _plain_route(route)
                and parts is not None
            ):
                for method in route.methods:
                    # Routes before it that take some of the same requests (by method too:
                    # one that only matches the path leaves the request to later routes).
                    before = [r for r in earlier if not r.methods or method in r.methods]
                    if None not in parts:
                        if not any(_full_match(r, method, route.path) for r in before):
                            self._exact.setdefault((method, route.path), route)
                    else:
                        shadows = [r for r in before if _may_overlap(r, parts)]
                        template = _Template(route, parts, shadows)
                        self._templates.setdefault((method, len(parts)), []).append(template)
            earlier.append(route)

    def match(self, scope: Scope) -> tuple[Route, dict[str, Any]] | None:
        """The inference route of an HTTP request and its path parameters, or None."""
        if scope.get("root_path"):
            return None
        method, path = scope["method"], scope["path"]
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        if not self._templates:
            return None
        parts = path.split("/")
        for template in self._templates.get((method, len(parts)), ()):
            params = template.match(path, parts)
            if params is not None:
                return template.route, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.match(scope) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        # Served here, in this frame (each frame in the chain that awaits the model's
        # reply is resumed when it comes).
        route, path_params = found
        start = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        # What Starlette and its router put in the scope.
        app = self.app
        scope["app"] = app
        if "router" not in scope:
            scope["router"] = app.router
        scope["route"] = route
        scope["endpoint"] = endpoint = route.endpoint
        scope["path_params"] = path_params
        request = Request(scope, receive, send)
        # What request.headers makes at its first use, with quicker lookups.
        request._headers = _IndexedHeaders(scope)
        exchange = _Exchange(send, _Departure(state.get(ON_CLIENT_LEFT)), self.before_answer)
        metrics = self.metrics
        metrics.serving += 1
        try:
            try:
                await self._respond(await endpoint(request), scope, receive, exchange)
            except Exception as exc:
                await self._answer_error(request, exc, scope, receive, exchange)
        except asyncio.CancelledError:
            if not exchange.departure.left():
                raise
            # The client left: nobody to answer. The route's own clean-up has run.
            exchange.status = CLIENT_CLOSED
        except Exception as exc:
            if not exchange.started:
                self.before_answer()
            if await answer_unhandled(scope, send, exc, exchange.started):
                exchange.status = 500
        finally:
            exchange.departure.stop()
            metrics.serving -= 1
            finish(
                metrics,
                scope["method"],
                route.path,
                state,
                exchange.status,
                time.perf_counter() - start,
            )

    async def _respond(
        self, response: Response, scope: Scope, receive: Receive, exchange: _Exchange
    ) -> None:
        if isinstance(response, Settled):
            try:
                exchange.extra = response.admission.headers()
                await self._send(response.answer, scope, receive, exchange)
            finally:
                # The answer is sent, or abandoned (the client left): settle.
                response.admission.close()
        else:
            await self._send(response, scope, receive, exchange)

    async def _send(
        self, response: Response, scope: Scope, receive: Receive, exchange: _Exchange
    ) -> None:
        if type(response).__call__ is not _WHOLE_CALL or response.background is not None:
            # A streamed answer (or one of another kind): it sends itself.
            await response(scope, receive, exchange.send)
            return
        # A whole answer: its two messages, as Response.__call__ sends them, written to
        # the socket at once (api/transport.py's HeldWrites) where the server allows.
        extra = exchange.extra
        status = exchange.status = response.status_code
        exchange.started = True
        if status >= 400:
            exchange.before_answer()
        writes: HeldWrites | None = scope["state"].get(WRITES)
        if writes is not None:
            writes.hold()
        try:
            await exchange.server(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [*response.raw_headers, *extra] if extra else response.raw_headers,
                }
            )
            # The answer is complete: the end of the request is no departure.
            exchange.departure.stop()
            await exchange.server({"type": "http.response.body", "body": response.body})
        finally:
            if writes is not None:
                writes.release()

    async def _answer_error(
        self, request: Request, exc: Exception, scope: Scope, receive: Receive, exchange: _Exchange
    ) -> None:
        """As Starlette's route wrapper: the app's handler answers, or it goes on up."""
        handler = None
        if isinstance(exc, HTTPException):
            handler = self._status_handlers.get(exc.status_code)
        if handler is None:
            handler = handler_for(self._handlers, exc)
        if handler is None:
            raise exc
        if exchange.started:
            raise RuntimeError("Caught handled exception, but response already started.") from exc
        response = await handler(request, exc)
        # The error answer goes out as the handler made it (Settled's headers are in it).
        exchange.extra = []
        await self._send(response, scope, receive, exchange)
        # Reused exception instances accumulate tracebacks across requests.
        exc.__traceback__ = None


def auth_throttle_of(services: Services) -> AuthThrottle:
    """The server's throttle of failed authentication, made on first use: one for all the
    apps of its listeners (each app has its own FastPath), so that an address or a key id
    locked out on one listener is locked out on all."""
    authenticator = services.gateway.authenticator
    if authenticator.throttle is None:
        authenticator.throttle = AuthThrottle(
            ThrottlePolicy.of(services.settings),
            authenticator,
            # Requests refused unchecked are failed sign-ins too.
            on_refused=services.metrics.auth_failures.inc,
        )
    return authenticator.throttle


class _IndexedHeaders(Headers):
    """A request's headers, looked up in a dict of each name's first value (the value
    Headers gives) rather than by a scan of the list per lookup: a request on the hot
    path looks up five or six."""

    def __init__(self, scope: Scope) -> None:
        # As Headers(scope=scope) does: a list of its own, in the scope too.
        raw = scope["headers"] = list(scope["headers"])
        self._list = raw
        # Reversed: where a name comes twice, the first value is the one left.
        self._first: dict[bytes, bytes] = dict(reversed(raw))

    def get(self, key: str, default: Any = None) -> Any:
        name = _NAMES.get(key)
        if name is None:
            name = _name(key)
        value = self._first.get(name)
        return default if value is None else value.decode("latin-1")

    def __getitem__(self, key: str) -> str:
        value = self._first.get(_NAMES.get(key) or _name(key))
        if value is None:
            raise KeyError(key)
        return value.decode("latin-1")

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, str) and (_NAMES.get(key) or _name(key)) in self._first


# Header names as looked up (the code's own strings), lowercased and encoded once.
_NAMES: dict[str, bytes] = {}


def _name(key: str) -> bytes:
    name = key.lower().encode("latin-1")
    if len(_NAMES) < 256:
        _NAMES[key] = name
    return name


class _Exchange:
    """One request's answer as it goes out: its status, whether it started, the headers
    to add (an admitted call's), and its client's departure."""

    __slots__ = ("before_answer", "departure", "extra", "server", "started", "status")

    def __init__(
        self, server: Send, departure: _Departure, before_answer: Callable[[], None]
    ) -> None:
        self.server = server
        self.departure = departure
        self.before_answer = before_answer
        self.extra: list[tuple[bytes, bytes]] = []
        self.started = False
        # Logged when nothing was sent (an error after which nothing could be).
        self.status = 500

    async def send(self, message: Message) -> None:
        """The send of an answer that sends itself (the access log's wrapper)."""
        if message["type"] == "http.response.start":
            status = self.status = message["status"]
            self.started = True
            if status >= 400:
                self.before_answer()
            if self.extra:
                message = {**message, "headers": [*message["headers"], *self.extra]}
        elif not message.get("more_body", False):
            # The answer is complete: the end of the request is no departure.
            self.departure.stop()
        await self.server(message)


def _plain_stack(app: Starlette) -> bool:
    """Whether the app's layers are those this path stands in for: the access log as its
    only middleware, no body limit of its own, a router without middleware."""
    router = app.router
    return (
        [m.cls for m in app.user_middleware] == [cast(Any, AccessLog)]
        and getattr(app, "max_body_size", None) is None
        and router.middleware_stack == router.app
    )


def _plain_route(route: Route) -> bool:
    """Whether the route runs its endpoint as Starlette's request_response does, with no
    middleware or body limit of its own in between."""
    return getattr(route.app, "__qualname__", "") == "request_response.<locals>.app"


def _template_parts(route: Route) -> tuple[str | None, ...] | None:
    """The route's path cut at its slashes, parameters as None; None if a parameter is
    not a whole part or not a plain string (the path convertor takes slashes)."""
    parts: list[str | None] = []
    for part in route.path.split("/"):
        if "{" not in part:
            parts.append(part)
            continue
        name = part[1:-1] if part.startswith("{") and part.endswith("}") else None
        if name is None or ":" in name or "{" in name or "}" in name:
            return None
        if name not in route.param_convertors:
            return None
        parts.append(None)
    return tuple(parts)


def _param_names(route: Route) -> list[str]:
    """The parameter name of each part of the route's path ('' for literals)."""
    return [part[1:-1] if part.startswith("{") else "" for part in route.path.split("/")]


def _may_overlap(route: Route, parts: tuple[str | None, ...]) -> bool:
    """Whether `route`'s path may match a path that `parts` (a template) matches."""
    theirs = _template_parts(route)
    if theirs is None:
        return True  # a convertor of its own (a path, say): it may
    return len(theirs) == len(parts) and all(
        a is None or b is None or a == b for a, b in zip(theirs, parts, strict=True)
    )


def _full_match(route: Route, method: str, path: str) -> bool:
    """Whether `route` would take this request in Starlette's router."""
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    match, _ = route.matches(scope)
    return match is Match.FULL
