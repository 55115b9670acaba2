"""The app a worker runs decrypted end-to-end encrypted requests through.

It holds the same inference routes and error rendering as the gateway's app, served by a
:class:`~bastion.api.pipeline.Pipeline` of the worker's instead of the gateway. It
imports nothing of the gateway's own machinery (database, admin, metrics), so the worker
that opens sealed requests stays small.

A worker serves one inner request after another on its runtime thread, so the layers of a
Starlette app (two exception middlewares, a router that tries each route's pattern in
turn, the exception wrapper of each route) are a sizeable share of each request's time.
:class:`SealedApp` takes a request for a route without path parameters, by the method
that route allows, straight to the route's endpoint, and renders what the endpoint raises
with the app's own exception handlers, as those layers would; everything else (the OIP
routes, whose paths hold parameters, an unknown path, a method a route does not allow)
goes through the Starlette app itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive, Scope, Send

from bastion.api import oip, openai
from bastion.api.errors import (
    Handler,
    handle_bastion_error,
    handle_http_exception,
    handler_for,
)
from bastion.errors import BastionError

# The routes an end-to-end encrypted request may reach: inference, nothing else.
SEALED_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    }
)


class SealedApp:
    """The sealed routes as one ASGI app; see the module docstring."""

    def __init__(self, app: Starlette, handlers: Mapping[type[Exception], Handler]) -> None:
        self.app = app
        self.state = app.state
        self._handlers = dict(handlers)
        # Path -> (route, its methods), for the routes without path parameters.
        self._direct: dict[str, tuple[Route, frozenset[str]]] = {
            route.path: (route, frozenset(route.methods))
            for route in app.routes
            if isinstance(route, Route)
            and route.methods
            and not route.param_convertors
            and inspect.iscoroutinefunction(route.endpoint)
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        direct = self._direct.get(scope["path"])
        if direct is None or scope["method"] not in direct[1]:
            await self.app(scope, receive, send)
            return
        route = direct[0]
        endpoint: Callable[[Request], Awaitable[Response]] = route.endpoint
        # What Starlette and its router would have put in the scope.
        scope["app"] = self.app
        scope.setdefault("router", self.app.router)
        scope["route"] = route
        scope["endpoint"] = endpoint
        scope["path_params"] = {}
        request = Request(scope, receive, send)
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            response = await endpoint(request)
            await response(scope, receive, sender)
        except Exception as exc:
            handler = handler_for(self._handlers, exc)
            if handler is None:
                # As Starlette's ServerErrorMiddleware does, once its 500 is sent: the
                # caller (worker/sealed.py) answers an encrypted 500 instead.
                raise
            if started:
                raise RuntimeError("an error after the response started") from exc
            await (await handler(request, exc))(scope, receive, sender)
            # A reused exception instance would otherwise pile up tracebacks.
            exc.__traceback__ = None


def create_sealed_app() -> SealedApp:
    """The inference routes only. Each request brings its own pipeline in its ASGI scope
    state (api/context.py's PIPELINE_STATE): the worker's, with that request's context."""
    routes: list[BaseRoute] = [
        route
        for route in (*oip.routes, *openai.routes)
        if isinstance(route, Route) and route.path in SEALED_PATHS
    ]
    handlers: dict[type[Exception], Handler] = {
        BastionError: handle_bastion_error,
        HTTPException: handle_http_exception,
    }
    app = Starlette(routes=routes, exception_handlers=dict(handlers))
    return SealedApp(app, handlers)
