"""Open Inference Protocol v2 routes (KServe / Triton clients)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import bastion
from bastion.api.body import decode_json
from bastion.api.openai import _gateway, _principal, json_response
from bastion.api.replies import expect
from bastion.api.schemas import OipInferRequest
from bastion.api.tensors import to_json_tensor, to_tensor_data
from bastion.errors import InvalidRequest, ModelUnavailable
from bastion.workers.protocol import Infer, InferResult, ModelMetadata


def _spec_json(metadata: ModelMetadata) -> dict[str, object]:
    return {
        "inputs": [
            {"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in metadata.inputs
        ],
        "outputs": [
            {"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in metadata.outputs
        ],
    }


async def live(request: Request) -> Response:
    return json_response({"live": True})


async def ready(request: Request) -> Response:
    gateway = _gateway(request)
    if not gateway.started:
        return json_response({"ready": False}, status=503)
    return json_response({"ready": True})


async def server_metadata(request: Request) -> Response:
    gateway = _gateway(request)
    gateway.authorize(_principal(request), "models")
    return json_response({"name": "bastion", "version": bastion.__version__, "extensions": []})


async def model_metadata(request: Request) -> Response:
    gateway = _gateway(request)
    principal = _principal(request)
    name = request.path_params["name"]
    gateway.authorize(principal, "models", name)
    gateway.model_record(name)
    request.state.model = name
    status = gateway.supervisor.status(name)
    if status.metadata is None:
        raise ModelUnavailable(f"The model '{name}' is not ready.", retry_after_s=2)
    metadata = status.metadata
    return json_response(
        {
            "name": name,
            "versions": metadata.versions,
            "platform": metadata.platform,
            **_spec_json(metadata),
        }
    )


async def model_ready(request: Request) -> Response:
    gateway = _gateway(request)
    principal = _principal(request)
    name = request.path_params["name"]
    gateway.authorize(principal, "models", name)
    gateway.model_record(name)
    request.state.model = name
    is_ready = gateway.supervisor.status(name).state == "ready"
    # The protocol answers readiness with the status code: 200 ready, 4xx not ready.
    if is_ready:
        return json_response({"name": name, "ready": True})
    return json_response({"error": f"The model '{name}' is not ready."}, status=400)


async def infer(request: Request) -> Response:
    gateway = _gateway(request)
    principal = _principal(request)
    name = request.path_params["name"]
    gateway.authorize(principal, "infer", name)
    gateway.model_record(name)
    request.state.model = name
    body = await decode_json(request, OipInferRequest, gateway.settings.max_body_bytes)
    metadata = gateway.ready_model(name, "infer")
    gateway.admit(principal, name)
    specs = {spec.name: spec for spec in metadata.inputs}
    seen: set[str] = set()
    tensors = []
    for tensor in body.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidRequest(f"The model has no input named '{tensor.name}'.")
        if tensor.name in seen:
            raise InvalidRequest(f"Input '{tensor.name}' is given twice.")
        seen.add(tensor.name)
        tensors.append(to_tensor_data(tensor, spec))
    missing = sorted(set(specs) - seen)
    if missing:
        raise InvalidRequest(f"Missing inputs: {', '.join(missing)}.")
    output_names = {spec.name for spec in metadata.outputs}
    wanted = [out.name for out in body.outputs or []]
    unknown = [w for w in wanted if w not in output_names]
    if unknown:
        raise InvalidRequest(f"The model has no output named '{unknown[0]}'.")
    result = expect(
        await gateway.call(name, Infer(id=0, inputs=tensors, outputs=wanted)), InferResult
    )
    answer: dict[str, object] = {
        "model_name": name,
        "model_version": metadata.versions[0] if metadata.versions else "1",
        "outputs": [to_json_tensor(t) for t in result.outputs],
    }
    if body.id is not None:
        answer["id"] = body.id
    return json_response(answer)


routes = [
    Route("/v2/health/live", live, methods=["GET"]),
    Route("/v2/health/ready", ready, methods=["GET"]),
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/models/{name}", model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
    Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
]
