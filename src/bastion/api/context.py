"""What every route needs from a request: the gateway, the caller, a JSON answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from bastion.api.pipeline import AnyPipeline
from bastion.errors import AuthenticationError

if TYPE_CHECKING:
    # Only for the annotations: the worker imports this module and not the gateway.
    from bastion.api.services import Services
    from bastion.gateway.auth_throttle import AuthThrottle
    from bastion.gateway.gateway import Gateway

JSON = msgspec.json.Encoder()
_JSON_TYPE = (b"content-type", b"application/json")


class JSONAnswer(Response):
    """A JSON answer, as ``Response(body, status, media_type="application/json")`` makes
    it (the same headers, in the same order), without the generic header handling."""

    media_type = "application/json"

    def __init__(self, body: bytes, status: int = 200) -> None:
        self.status_code = status
        self.background = None
        self.body = body
        if status < 200 or status in (204, 304):
            self.raw_headers = [_JSON_TYPE]
        else:
            self.raw_headers = [(b"content-length", str(len(body)).encode("latin-1")), _JSON_TYPE]


def json_response(content: Any, status: int = 200) -> Response:
    return JSONAnswer(JSON.encode(content), status)


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


# The ASGI scope state key of a request that brings its own pipeline: in a worker, each
# sealed request is served by a pipeline that carries that request's context.
PIPELINE_STATE = "bastion.pipeline"


def services_of(request: Request) -> Services:
    """The server's services (gateway-only routes; a worker's sealed app has none)."""
    services: Services = request.app.state.services
    return services


def pipeline_of(request: Request) -> AnyPipeline:
    """What serves an inference route: the gateway, or a worker opening a sealed request."""
    state = request.scope.get("state")
    pipeline: AnyPipeline | None = state.get(PIPELINE_STATE) if state else None
    if pipeline is None:
        pipeline = request.app.state.gateway
    return pipeline


# The app state attribute of the gateway's throttle of failed authentication (put there by
# api/fast.py's FastPath); a worker's sealed app has none: its caller was authenticated,
# and throttled, by the gateway.
AUTH_THROTTLE_STATE = "auth_throttle"


async def authenticate(request: Request, pipeline: AnyPipeline | None = None) -> Any:
    """The caller's principal (401 otherwise, or 429 during a lock-out of its address or
    key id); its tenant labels the access log line. (Inference routes authenticate
    through their Admission, api/admission.py.)"""
    pipeline = pipeline if pipeline is not None else pipeline_of(request)
    authorization = request.headers.get("authorization")
    throttle: AuthThrottle | None = getattr(request.app.state, AUTH_THROTTLE_STATE, None)
    if throttle is None:
        principal = await pipeline.authenticate(authorization)
    else:
        # By the connection's peer address: the outer one, for an encrypted request. The
        # throttle's two steps are called here, not through a wrapper coroutine: this runs
        # for every request.
        client = request.scope.get("client")
        throttle.before(authorization, client)
        try:
            principal = await pipeline.authenticate(authorization)
        except AuthenticationError as exc:
            throttle.failed(exc, client)
            raise
    # request.state's own dict.
    request.scope.setdefault("state", {})["tenant"] = principal.tenant_name
    return principal
