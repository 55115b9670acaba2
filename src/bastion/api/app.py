"""The app factory: wires routes, error handlers and middleware; holds no logic."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from bastion.api import admin, health, oip, openai, sealed
from bastion.api.access import AccessLog
from bastion.api.errors import handle_bastion_error, handle_http_exception
from bastion.api.fast import FastPath
from bastion.api.services import Services
from bastion.errors import BastionError


def create_app(services: Services) -> FastPath:
    """Build the ASGI app; the control plane starts and stops with the app's lifespan.

    The inference routes are served by api/fast.py's FastPath, in front of the Starlette
    app (its `app`), which serves the rest; both answer alike."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.control.start()
        try:
            yield
        finally:
            await services.control.stop()

    app = Starlette(
        # Inference routes first (encrypted, then plaintext): Starlette tries routes in order,
        # and they are the hot path.
        routes=[*sealed.routes, *oip.routes, *openai.routes, *health.routes, *admin.routes],
        middleware=[
            Middleware(AccessLog, metrics=services.metrics, before_answer=services.meter.sync)
        ],
        exception_handlers={
            BastionError: handle_bastion_error,
            HTTPException: handle_http_exception,
        },
        lifespan=lifespan,
    )
    app.state.services = services
    # The pipeline of the inference routes (api/context.py's pipeline_of).
    app.state.gateway = services.gateway
    app.state.body_timeout_s = services.settings.body_timeout_s
    return FastPath(app, services.metrics, before_answer=services.meter.sync)
