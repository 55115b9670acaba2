"""The app a worker runs decrypted end-to-end encrypted requests through.

It holds the same inference routes and error rendering as the gateway's app, served by a
:class:`~bastion.api.pipeline.Pipeline` of the worker's instead of the gateway. It
imports nothing of the gateway's own machinery (database, admin, metrics), so the worker
that opens sealed requests stays small.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Route

from bastion.api import oip, openai
from bastion.api.errors import handle_bastion_error, handle_http_exception
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


def create_sealed_app() -> Starlette:
    """The inference routes only. Each request brings its own pipeline in its ASGI scope
    state (api/context.py's PIPELINE_STATE): the worker's, with that request's context."""
    routes: list[BaseRoute] = [
        route
        for route in (*oip.routes, *openai.routes)
        if isinstance(route, Route) and route.path in SEALED_PATHS
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            BastionError: handle_bastion_error,
            HTTPException: handle_http_exception,
        },
    )
    return app
