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
from bastion.errors import BastionError
from bastion.gateway.gateway import Gateway
from bastion.identity.service import IdentityService


def create_app(gateway: Gateway, identity: IdentityService) -> Starlette:
    """Build the ASGI app; the gateway starts and stops with the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = Starlette(
        # Inference routes first (encrypted, then plaintext): Starlette tries routes in order,
        # and they are the hot path.
        routes=[*sealed.routes, *oip.routes, *openai.routes, *health.routes, *admin.routes],
        middleware=[Middleware(AccessLog, metrics=gateway.metrics)],
        exception_handlers={
            BastionError: handle_bastion_error,
            HTTPException: handle_http_exception,
        },
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.identity = identity
    app.state.body_timeout_s = gateway.settings.body_timeout_s
    return app
