"""Health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.api.context import authenticate, gateway_of, json_response
from bastion.api.openapi import openapi_document
from bastion.observability.metrics import CONTENT_TYPE


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    gateway = gateway_of(request)
    if not gateway.started:
        return json_response({"status": "starting"}, status=503)
    states = [str(s.state) for s in gateway.supervisor.statuses().values()]
    stalled = gateway.stalled_models()
    body: dict[str, object] = {
        # Degraded: a model's worker places are all held past the deadline.
        "status": "degraded" if stalled else "ready",
        "models_ready": states.count("ready") - len(stalled),
        "models_total": len(states),
        "models_stalled": stalled,
        "sandbox": gateway.supervisor.sandbox.name,
        # Every backend set up: the server's, and those models asked for by option.
        "sandboxes": gateway.supervisor.sandboxes.names(),
    }
    if gateway.supervisor.sandbox.name == "none":
        body["warning"] = "workers run without a sandbox (--unsafe-no-sandbox)"
    return json_response(body)


async def metrics(request: Request) -> Response:
    gateway = gateway_of(request)
    gateway.authorize(await authenticate(request), "metrics")
    stalled = set(gateway.stalled_models())
    for name, status in gateway.supervisor.statuses().items():
        ready = status.state == "ready" and name not in stalled
        gateway.metrics.model_ready.labels(name).set(1 if ready else 0)
        gateway.metrics.model_stalled.labels(name).set(1 if name in stalled else 0)
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    # The API description is not secret, but every route but health needs a key.
    await authenticate(request)
    return json_response(openapi_document())


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
