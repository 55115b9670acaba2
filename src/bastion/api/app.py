"""The app factory: wires routes, error handlers and middleware; holds no logic."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from bastion.api import admin, health, oip, openai, sealed
from bastion.api.access import AccessLog
from bastion.api.errors import handle_bastion_error, handle_http_exception
from bastion.api.fast import FastPath
from bastion.api.headers import CrossOrigin
from bastion.api.services import Services
from bastion.api.serving import Serving
from bastion.console import routes as console
from bastion.console.state import Console
from bastion.errors import BastionError


def routes_of(serving: Serving) -> list[BaseRoute]:
    # Inference routes first (encrypted, then plaintext): Starlette tries routes in order,
    # and they are the hot path.
    inference = [*sealed.routes, *oip.routes, *openai.routes]
    if serving is Serving.PUBLIC:
        return [*inference, *health.routes]
    if serving is Serving.ADMIN:
        return [*health.probes, *admin.routes, *console.routes]
    return [*inference, *health.routes, *admin.routes, *console.routes]


def create_app(
    services: Services, *, serving: Serving = Serving.ALL, cors_origins: tuple[str, ...] = ()
) -> ASGIApp:
    """Build the ASGI app of a listener; the control plane starts and stops with the
    lifespan of the app that serves inference (the admin app, which runs beside it on
    the same event loop, has none).

    The inference routes are served by api/fast.py's FastPath, in front of the Starlette
    app (its `app`), which serves the rest; both answer alike. With `cors_origins`, the
    inference routes answer those origins' cross-origin requests (api/headers.py)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.control.start()
        try:
            yield
        finally:
            await services.control.stop()

    app = Starlette(
        routes=routes_of(serving),
        middleware=[
            Middleware(AccessLog, metrics=services.metrics, before_answer=services.meter.sync)
        ],
        exception_handlers={
            BastionError: handle_bastion_error,
            HTTPException: handle_http_exception,
        },
        lifespan=None if serving is Serving.ADMIN else lifespan,
    )
    app.state.services = services
    # Which routes the OpenAPI document lists (api/health.py).
    app.state.serving = serving
    if serving is not Serving.PUBLIC and isinstance(services, Services):
        # The console's sessions and sign-ins in progress live with the app serving it
        # (a test's stand-in services serve no console).
        app.state.console = Console.of(services)
    # The pipeline of the inference routes (api/context.py's pipeline_of).
    app.state.gateway = services.gateway
    app.state.body_timeout_s = services.settings.body_timeout_s
    front = FastPath(app, services.metrics, before_answer=services.meter.sync)
    if cors_origins and serving is not Serving.ADMIN:
        return CrossOrigin(front, cors_origins)
    return front
