"""Health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.api.context import authenticate, json_response, services_of
from bastion.api.openapi import openapi_document
from bastion.api.serving import Serving
from bastion.observability.metrics import CONTENT_TYPE


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    services = services_of(request)
    gateway = services.gateway
    if not services.control.started:
        return json_response({"status": "starting"}, status=503)
    states = [str(s.state) for s in services.supervisor.statuses().values()]
    stalled = gateway.stalled_models()
    body: dict[str, object] = {
        # Degraded: a model's worker places are all held past the deadline.
        "status": "degraded" if stalled else "ready",
        "models_ready": states.count("ready") - len(stalled),
        "models_total": len(states),
        "models_stalled": stalled,
        "sandbox": services.supervisor.sandbox.name,
        # Every backend set up: the server's, and those models asked for by option.
        "sandboxes": services.supervisor.sandboxes.names(),
    }
    if services.supervisor.sandbox.name == "none":
        body["warning"] = "workers run without a sandbox (--unsafe-no-sandbox)"
    return json_response(body)


async def metrics(request: Request) -> Response:
    services = services_of(request)
    gateway = services.gateway
    gateway.authorize(await authenticate(request), "metrics")
    stalled = set(gateway.stalled_models())
    for name, status in services.supervisor.statuses().items():
        ready = status.state == "ready" and name not in stalled
        services.metrics.model_ready.labels(name).set(1 if ready else 0)
        services.metrics.model_stalled.labels(name).set(1 if name in stalled else 0)
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    # The API description is not secret, but every route but health needs a key.
    await authenticate(request)
    # What this listener serves only: a public listener does not reveal the admin API.
    serving: Serving = request.app.state.serving
    return json_response(openapi_document(serving))


# Liveness and readiness: on every listener (the admin listener's too).
probes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
routes = [
    *probes,
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
