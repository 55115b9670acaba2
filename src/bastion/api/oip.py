"""Open Inference Protocol v2 routes (KServe / Triton clients)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import bastion
from bastion.api import oip_binary
from bastion.api.admission import Admission, inference
from bastion.api.body import decode_value, read_body
from bastion.api.context import JSON, authenticate, gateway_of, json_response, services_of
from bastion.api.replies import expect
from bastion.api.schemas import OipInferRequest
from bastion.api.tensors import (
    check_answer_size,
    check_input_size,
    json_size,
    to_json_tensor,
    to_tensor_data,
)
from bastion.errors import InvalidRequest, ModelUnavailable, UnsupportedMediaType
from bastion.wire.protocol import Infer, InferResult, ModelMetadata, TensorData


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
    if not services_of(request).control.started:
        return json_response({"ready": False}, status=503)
    return json_response({"ready": True})


async def server_metadata(request: Request) -> Response:
    gateway = gateway_of(request)
    gateway.authorize(await authenticate(request), "models")
    return json_response({"name": "bastion", "version": bastion.__version__, "extensions": []})


async def _known_model(request: Request) -> str:
    """Authenticate, authorize reading the path's model, and check that it exists."""
    gateway = gateway_of(request)
    principal = await authenticate(request)
    name: str = request.path_params["name"]
    gateway.authorize(principal, "models", name)
    gateway.require_model(name)
    # Labelled only once known to exist: a client-chosen name must not reach logs or metrics.
    request.state.model = name
    return name


async def model_metadata(request: Request) -> Response:
    name = await _known_model(request)
    status = services_of(request).supervisor.status(name)
    if status.metadata is None:
        raise ModelUnavailable(f"The model '{name}' is not ready.", retry_after_s=2)
    metadata = status.metadata
    answer: dict[str, object] = {
        "name": name,
        "versions": metadata.versions,
        "platform": metadata.platform,
        **_spec_json(metadata),
    }
    if metadata.output_policy is not None:
        # Bastion's extension: what the answers reveal of the model's scores.
        answer["output_policy"] = metadata.output_policy
    if metadata.batching is not None:
        # As Triton's model configuration names them (max_batch_size, ...).
        answer["batching"] = metadata.batching
    return json_response(answer)


async def model_ready(request: Request) -> Response:
    name = await _known_model(request)
    services = services_of(request)
    is_ready = (
        services.supervisor.status(name).state == "ready"
        and name not in services.gateway.stalled_models()
    )
    # The protocol answers readiness with the status code: 200 ready, 4xx not ready.
    if is_ready:
        return json_response({"name": name, "ready": True})
    return json_response({"error": f"The model '{name}' is not ready."}, status=400)


async def _read_infer_request(
    request: Request, limit: int
) -> tuple[OipInferRequest, dict[str, bytes]]:
    """The JSON request, and the raw bytes of inputs sent with the binary extension."""
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise UnsupportedMediaType("Compressed request bodies are not supported.")
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    # tritonclient sends no Content-Type at all; anything named must be JSON or binary.
    if media not in ("", "application/json", "application/octet-stream"):
        raise UnsupportedMediaType(
            "Content-Type must be application/json or application/octet-stream."
        )
    body = await read_body(request, limit)
    header_length = request.headers.get(oip_binary.HEADER)
    header, binary = oip_binary.split_body(body, header_length) if header_length else (body, b"")
    parsed = decode_value(header, OipInferRequest)
    return parsed, oip_binary.take_binary_inputs(parsed.inputs, binary)


def _input_tensors(
    body: OipInferRequest, binary: dict[str, bytes], metadata: ModelMetadata
) -> list[TensorData]:
    specs = {spec.name: spec for spec in metadata.inputs}
    tensors: list[TensorData] = []
    given: set[str] = set()
    for tensor in body.inputs:
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidRequest(f"The model has no input named '{name}'.")
        if name in given:
            raise InvalidRequest(f"Input '{name}' is given twice.")
        given.add(name)
        if binary and name in binary:
            tensors.append(oip_binary.binary_tensor_data(tensor, spec, binary[name]))
        else:
            tensors.append(to_tensor_data(tensor, spec))
    if len(given) != len(specs):
        missing = sorted(set(specs) - given)
        raise InvalidRequest(f"Missing inputs: {', '.join(missing)}.")
    return tensors


def _binary_outputs(body: OipInferRequest, metadata: ModelMetadata) -> tuple[list[str], set[str]]:
    """The outputs asked for (empty: all) and those to send in binary form."""
    if not body.outputs and not body.parameters:
        return [], set()
    names = {spec.name for spec in metadata.outputs}
    wanted: list[str] = []
    binary: set[str] = set()
    for out in body.outputs or []:
        if out.name not in names:
            raise InvalidRequest(f"The model has no output named '{out.name}'.")
        wanted.append(out.name)
        if (out.parameters or {}).get("binary_data") is True:
            binary.add(out.name)
    if not wanted and (body.parameters or {}).get("binary_data_output") is True:
        binary = names
    return wanted, binary


@inference
async def infer(request: Request, admission: Admission) -> Response:
    name: str = request.path_params["name"]
    await admission.check("infer", name)
    gateway = admission.pipeline
    body, binary_inputs = await _read_infer_request(request, gateway.limits.max_body_bytes)
    metadata = await admission.ready("infer", name, "infer")
    limits = gateway.size_limits(name)
    check_input_size(body.inputs, limits)
    tensors = _input_tensors(body, binary_inputs, metadata)
    wanted, binary_outputs = _binary_outputs(body, metadata)
    # Numbers are not tokens; text (BYTES) is, as for /v1/embeddings: it is reserved
    # against token quotas here, and settled with the count the model reports.
    admitted = await admission.admit(
        "infer", name, capability="infer", tokens=_text_tokens(tensors)
    )
    result = expect(await admitted.call(Infer(id=0, inputs=tensors, outputs=wanted)), InferResult)
    check_answer_size(
        sum(len(t.raw) if t.name in binary_outputs else json_size(t) for t in result.outputs),
        limits,
    )
    answer: dict[str, object] = {
        "model_name": name,
        "model_version": metadata.versions[0] if metadata.versions else "1",
    }
    if body.id is not None:
        answer["id"] = body.id
    if not binary_outputs:
        answer["outputs"] = [to_json_tensor(t) for t in result.outputs]
        return json_response(answer)
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor in result.outputs:
        if tensor.name in binary_outputs:
            raw = oip_binary.output_bytes(tensor)
            outputs.append(oip_binary.binary_output_header(tensor, len(raw)))
            chunks.append(raw)
        else:
            outputs.append(to_json_tensor(tensor))
    answer["outputs"] = outputs
    header = JSON.encode(answer)
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={oip_binary.HEADER: str(len(header))},
    )


def _text_tokens(tensors: list[TensorData]) -> int:
    """An estimate of the tokens in the text (BYTES) inputs: 4 bytes a token."""
    return sum(-(-len(item) // 4) for t in tensors if t.datatype == "BYTES" for item in t.items)


routes = [
    Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    Route("/v2/health/live", live, methods=["GET"]),
    Route("/v2/health/ready", ready, methods=["GET"]),
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/models/{name}", model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
]
