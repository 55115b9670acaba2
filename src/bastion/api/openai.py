"""OpenAI-compatible routes: models, chat completions, completions, embeddings."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bastion.api.admission import Admission, Admitted, inference
from bastion.api.body import decode_json
from bastion.api.context import JSON, authenticate, gateway_of, json_response
from bastion.api.pipeline import AnyPipeline, estimate_tokens
from bastion.api.replies import expect, raise_for_failure
from bastion.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from bastion.api.tensors import check_answer_size
from bastion.crypto.entropy import random_hex
from bastion.errors import BastionError, InvalidRequest
from bastion.wire.protocol import (
    ChatMessage,
    Embed,
    EmbedResult,
    FromWorker,
    Generate,
    GenerateResult,
    ModelMetadata,
    RequestFailed,
    TextDelta,
)

if TYPE_CHECKING:
    # Only for annotations: the worker imports this module and not the gateway.
    from bastion.gateway.gateway import Gateway
    from bastion.models.registry import ModelRecord

DEFAULT_MAX_TOKENS = 256


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _output_policy(
    logprobs: bool | int | None, top_logprobs: int | None, logit_bias: dict[str, float] | None
) -> None:
    """Text models' output policy: no log probabilities out, no logit bias in. Both let a
    caller copy a model through its API (Carlini et al., ICML 2024, recovered production
    models' projection matrices that way); asking for them is a 400 that names the policy."""
    if logprobs or top_logprobs:
        raise InvalidRequest(
            "This server's output policy returns no log probabilities (logprobs, "
            "top_logprobs): they would let a caller copy the model.",
            code="output_policy",
            param="logprobs" if logprobs else "top_logprobs",
        )
    if logit_bias:
        raise InvalidRequest(
            "This server's output policy accepts no logit_bias: it would let a caller copy "
            "the model.",
            code="output_policy",
            param="logit_bias",
        )


def _limits(gateway: AnyPipeline, max_tokens: int | None, n: int | None) -> tuple[int, int]:
    limit = gateway.limits.max_tokens_limit
    tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if tokens > limit:
        raise InvalidRequest(f"max_tokens must be at most {limit}.", param="max_tokens")
    choices = 1 if n is None else n
    if choices > gateway.limits.max_choices:
        raise InvalidRequest(f"n must be at most {gateway.limits.max_choices}.", param="n")
    return tokens, choices


# ---------------------------------------------------------------- models


async def list_models(request: Request) -> Response:
    gateway = gateway_of(request)
    principal = await authenticate(request)
    gateway.authorize(principal, "models")
    data = [_model_object(gateway, r) for r in gateway.visible_models(principal)]
    return json_response({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    gateway = gateway_of(request)
    principal = await authenticate(request)
    name = request.path_params["model"]
    gateway.authorize(principal, "models", name)
    record = gateway.model_record(name)
    request.state.model = name
    return json_response(_model_object(gateway, record))


def _model_object(gateway: Gateway, record: ModelRecord) -> dict[str, Any]:
    """OpenAI's model object; with Bastion's output_policy once the model is loaded."""
    answer: dict[str, Any] = {
        "id": record.name,
        "object": "model",
        "created": int(record.created_at.timestamp()),
        "owned_by": "bastion",
    }
    metadata = gateway.supervisor.status(record.name).metadata
    if metadata is not None and metadata.output_policy is not None:
        answer["output_policy"] = metadata.output_policy
    if metadata is not None and metadata.batching is not None:
        answer["batching"] = metadata.batching
    return answer


# ---------------------------------------------------------------- text generation


async def _prepare(
    request: Request, admission: Admission, action: str, schema: type[Any]
) -> tuple[Any, ModelMetadata]:
    """The body, read once the caller is known, and the metadata of the model it names."""
    await admission.caller()
    body = await decode_json(request, schema, admission.pipeline.limits.max_body_bytes)
    return body, await admission.ready(action, body.model, action)


def _generate(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    n: int,
    *,
    messages: list[ChatMessage] | None = None,
    prompt: str | None = None,
) -> Generate:
    """The worker request for a chat (messages) or completion (prompt) body."""
    return Generate(
        id=0,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=_stop_list(body.stop),
        seed=body.seed,
        n=n,
        stream=body.stream,
        min_tokens=body.min_tokens or 0,
    )


def _check_min_tokens(min_tokens: int | None, max_tokens: int) -> None:
    """400 for a min_tokens above max_tokens (before admission, as every body check)."""
    if min_tokens is not None and min_tokens > max_tokens:
        raise InvalidRequest(
            f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens}).",
            param="min_tokens",
        )


@inference
async def chat_completions(request: Request, admission: Admission) -> Response:
    body, _ = await _prepare(request, admission, "chat", ChatCompletionRequest)
    _output_policy(body.logprobs, body.top_logprobs, body.logit_bias)
    max_tokens, n = _limits(
        admission.pipeline, body.max_completion_tokens or body.max_tokens, body.n
    )
    _check_min_tokens(body.min_tokens, max_tokens)
    messages = [ChatMessage(role=m.role, content=m.text()) for m in body.messages]
    admitted = await admission.admit(
        "chat",
        body.model,
        capability="chat",
        tokens=estimate_tokens(*(m.content for m in messages)) + max_tokens * n,
    )
    message = _generate(body, max_tokens, n, messages=messages)
    completion_id = "chatcmpl-" + random_hex(12)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(
            admitted, message, _ChatChunks(completion_id, created, body.model, n, include_usage)
        )
    result = expect(await admitted.call(message), GenerateResult)
    return json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for c in result.choices
            ],
            "usage": _usage(result),
        }
    )


@inference
async def completions(request: Request, admission: Admission) -> Response:
    body, _ = await _prepare(request, admission, "completions", CompletionRequest)
    _output_policy(body.logprobs, None, body.logit_bias)
    max_tokens, n = _limits(admission.pipeline, body.max_tokens, body.n)
    _check_min_tokens(body.min_tokens, max_tokens)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if body.stream and len(prompts) > 1:
        raise InvalidRequest("Streaming supports a single prompt.", param="prompt")
    admitted = await admission.admit(
        "completions",
        body.model,
        capability="completions",
        tokens=estimate_tokens(*prompts) + max_tokens * n * len(prompts),
    )

    def generate(prompt: str) -> Generate:
        return _generate(body, max_tokens, n, prompt=prompt)

    completion_id = "cmpl-" + random_hex(12)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(
            admitted,
            generate(prompts[0]),
            _CompletionChunks(completion_id, created, body.model, n, include_usage),
        )
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = 0
    for offset, prompt in enumerate(prompts):
        result = expect(await admitted.call(generate(prompt)), GenerateResult)
        prompt_tokens += result.prompt_tokens
        completion_tokens += result.completion_tokens
        for c in result.choices:
            choices.append(
                {
                    "index": offset * n + c.index,
                    "text": (prompt + c.text) if body.echo else c.text,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
            )
    return json_response(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


def _usage(result: GenerateResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


class _ChatChunks:
    """Server-sent event payloads of a streamed chat completion."""

    def __init__(self, cid: str, created: int, model: str, n: int, include_usage: bool) -> None:
        self.base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self.n = n
        self.include_usage = include_usage

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk(i, {"role": "assistant", "content": ""}, None) for i in range(self.n)]

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk(index, {"content": text}, None)

    def finish(self, result: GenerateResult) -> list[dict[str, Any]]:
        chunks = [self._chunk(c.index, {}, c.finish_reason) for c in result.choices]
        if self.include_usage:
            chunks.append({**self.base, "choices": [], "usage": _usage(result)})
        return chunks

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            **self.base,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }


class _CompletionChunks(_ChatChunks):
    def __init__(self, cid: str, created: int, model: str, n: int, include_usage: bool) -> None:
        super().__init__(cid, created, model, n, include_usage)
        self.base["object"] = "text_completion"

    def start(self) -> list[dict[str, Any]]:
        return []

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return {
            **self.base,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": None}],
        }

    def finish(self, result: GenerateResult) -> list[dict[str, Any]]:
        chunks: list[dict[str, Any]] = [
            {
                **self.base,
                "choices": [
                    {
                        "index": c.index,
                        "text": "",
                        "logprobs": None,
                        "finish_reason": c.finish_reason,
                    }
                ],
            }
            for c in result.choices
        ]
        if self.include_usage:
            chunks.append({**self.base, "choices": [], "usage": _usage(result)})
        return chunks


def _sse(payload: Any) -> bytes:
    return b"data: " + JSON.encode(payload) + b"\n\n"


async def _stream(admitted: Admitted, message: Generate, chunks: _ChatChunks) -> Response:
    replies = admitted.stream(message)
    # The first reply is awaited before the response starts, so that a model that is not
    # available, or a request the model refuses, still gets its proper HTTP status.
    try:
        first = await anext(replies)
        raise_for_failure(first)
    except BaseException:
        await replies.aclose()
        raise

    async def events() -> AsyncIterator[bytes]:
        reply: FromWorker | None = first
        try:
            for chunk in chunks.start():
                yield _sse(chunk)
            while reply is not None:
                if isinstance(reply, TextDelta):
                    yield _sse(chunks.delta(reply.index, reply.text))
                elif isinstance(reply, GenerateResult):
                    for chunk in chunks.finish(reply):
                        yield _sse(chunk)
                    break
                elif isinstance(reply, RequestFailed):
                    raise_for_failure(reply)
                reply = await anext(replies, None)
            yield b"data: [DONE]\n\n"
        except BastionError as exc:
            # The status line is gone; the error travels as a final event, as OpenAI does.
            yield _sse(
                {"error": {"message": exc.message, "type": exc.error_type, "code": exc.code}}
            )
        finally:
            await replies.aclose()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


# ---------------------------------------------------------------- embeddings


@inference
async def embeddings(request: Request, admission: Admission) -> Response:
    body, metadata = await _prepare(request, admission, "embeddings", EmbeddingRequest)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if any(not text for text in texts):
        raise InvalidRequest("Input texts must not be empty.", param="input")
    if body.dimensions is not None and body.dimensions != metadata.embedding_dim:
        raise InvalidRequest(
            f"This model only produces {metadata.embedding_dim} dimensions.", param="dimensions"
        )
    admitted = await admission.admit(
        "embeddings", body.model, capability="embeddings", tokens=estimate_tokens(*texts)
    )
    result = expect(await admitted.call(Embed(id=0, texts=texts)), EmbedResult)
    # Each float is ~20 characters of JSON, or 4 bytes as base64 (4/3 of them).
    per_value = 6 if body.encoding_format == "base64" else 21
    check_answer_size(
        result.count * result.dim * per_value, admission.pipeline.size_limits(body.model)
    )
    vectors = np.frombuffer(result.vectors, dtype="<f4").reshape(result.count, result.dim)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": (
                base64.b64encode(row.tobytes()).decode()
                if body.encoding_format == "base64"
                else row.tolist()
            ),
        }
        for i, row in enumerate(vectors)
    ]
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
    )


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]
