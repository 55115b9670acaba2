"""End-to-end encrypted requests: Oblivious HTTP (RFC 9458) key configuration and endpoint.

``GET /.well-known/ohttp-gateway`` publishes the key configuration (RFC 9540); it holds
only public keys and needs no credentials, like the health routes. ``POST /v1/ohttp``
takes an encapsulated request with two plaintext headers, ``Authorization`` and
``Bastion-Model``, which are all the gateway uses: it checks them, checks the request's
key id and that it is not a replay, and forwards the ciphertext to the model's worker,
which alone opens it. The answer comes back encrypted, with the token counts for
accounting beside it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bastion.api.admission import SEALED, Admission, Admitted, inference
from bastion.api.body import read_body
from bastion.api.context import gateway_of
from bastion.api.openai import DEFAULT_MAX_TOKENS
from bastion.api.schemas import MAX_PROMPTS
from bastion.audit.events import OHTTP_REFUSED, Event
from bastion.crypto import ohttp
from bastion.errors import (
    BastionError,
    InvalidRequest,
    ModelUnavailable,
    UnsupportedMediaType,
)
from bastion.gateway.gateway import Gateway
from bastion.gateway.sealing import OhttpKeyProblem, replay_id
from bastion.identity.principal import Principal
from bastion.wire.headers import MODEL_HEADER
from bastion.wire.protocol import (
    SEALED_FRAMING_ALLOWANCE,
    FromWorker,
    RequestFailed,
    SealedChunk,
    SealedRequest,
    SealedResponse,
)


async def key_configuration(request: Request) -> Response:
    published = gateway_of(request).sealing.published
    if not published:
        raise ModelUnavailable("No OHTTP key is configured yet.", retry_after_s=1)
    # Short-lived caching: after a rotation clients should pick up the new key soon.
    return Response(
        published,
        media_type=ohttp.KEYS_MEDIA_TYPE,
        headers={"cache-control": "public, max-age=300"},
    )


@inference
async def sealed_request(request: Request, admission: Admission) -> Response:
    gateway = gateway_of(request)
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == ohttp.REQUEST_MEDIA_TYPE:
        chunked = False
    elif media == ohttp.CHUNKED_REQUEST_MEDIA_TYPE:
        chunked = True
    else:
        raise UnsupportedMediaType(
            f"Content-Type must be {ohttp.REQUEST_MEDIA_TYPE} "
            f"or {ohttp.CHUNKED_REQUEST_MEDIA_TYPE}."
        )
    principal: Principal = await admission.caller()
    model = request.headers.get(MODEL_HEADER)
    if not model:
        raise InvalidRequest("The Bastion-Model header is required.", param="Bastion-Model")
    actions = await admission.check_sealed(model, gateway.authorize_sealed)
    await admission.ready(SEALED, model, None)
    settings = gateway.settings
    body = await read_body(request, settings.max_body_bytes + SEALED_FRAMING_ALLOWANCE)
    # The gateway cannot read the request. It reserves at least its size and a default
    # answer length, and as much more as the caller's token limits leave, up to what any
    # request may ask; the worker refuses (encrypted 429) an inner request estimated at
    # more than was reserved, and the usage it reports beside the answer settles it.
    prompt = len(body) // 4
    admitted = await admission.admit(
        SEALED,
        model,
        capability=None,
        tokens=prompt + DEFAULT_MAX_TOKENS,
        tokens_up_to=prompt + settings.max_tokens_limit * settings.max_choices * MAX_PROMPTS,
    )
    try:
        header = gateway.sealing.check_request(body)
    except OhttpKeyProblem as exc:
        _refused(gateway, principal, exc.code)
        return _key_problem(exc)
    except InvalidRequest as exc:
        _refused(gateway, principal, exc.code)
        raise
    message = SealedRequest(
        id=0, data=body, chunked=chunked, actions=actions, allowance=admitted.ticket.allowance
    )
    if chunked:
        return await _stream(gateway, admitted, principal, message, header.enc)
    reply = await admitted.call(message)
    if not isinstance(reply, SealedResponse):
        return _failure(gateway, principal, reply, header.enc)
    # No cache may keep an answer: it is one client's, and may carry a Date correction.
    return Response(
        reply.data, media_type=ohttp.RESPONSE_MEDIA_TYPE, headers={"cache-control": "no-store"}
    )


async def _stream(
    gateway: Gateway, admitted: Admitted, principal: Principal, message: SealedRequest, enc: bytes
) -> Response:
    replies = admitted.stream(message)
    # The first reply is awaited before the response starts, so that a request the worker
    # cannot decrypt still gets its own status.
    try:
        first = await anext(replies)
    except BaseException:
        await replies.aclose()
        raise
    if not isinstance(first, SealedChunk | SealedResponse):
        await replies.aclose()
        return _failure(gateway, principal, first, enc)

    async def chunks() -> AsyncIterator[bytes]:
        reply: FromWorker | None = first
        try:
            while reply is not None:
                if isinstance(reply, SealedChunk):
                    yield reply.data
                elif isinstance(reply, SealedResponse):
                    yield reply.data
                    return
                else:
                    # The stream ends without its final chunk: the client sees the truncation.
                    return
                reply = await anext(replies, None)
        except BastionError:
            return
        finally:
            await replies.aclose()

    return StreamingResponse(
        chunks(),
        media_type=ohttp.CHUNKED_RESPONSE_MEDIA_TYPE,
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


def _failure(gateway: Gateway, principal: Principal, reply: FromWorker, enc: bytes) -> Response:
    """The unencrypted answer to a request the worker could not open, or could not serve."""
    if isinstance(reply, RequestFailed) and reply.code.startswith("ohttp_"):
        gateway.sealing.replays.forget(replay_id(enc))
        _refused(gateway, principal, reply.code)
        if reply.code == "ohttp_key":
            return _key_problem(
                OhttpKeyProblem("The request's key is not accepted.", code="ohttp_key")
            )
        raise InvalidRequest("The request could not be decrypted.", code="ohttp_decrypt")
    if isinstance(reply, RequestFailed) and reply.status == 503:
        raise ModelUnavailable(reply.message, code=reply.code, retry_after_s=2)
    raise BastionError("The model failed to process the request.", code="worker_protocol")


def _refused(gateway: Gateway, principal: Principal, reason: str | None) -> None:
    """Record a refused encrypted request: replays and forgeries are worth an alert."""
    gateway.events.emit(
        Event(
            kind=OHTTP_REFUSED,
            outcome="failure",
            actor=principal.key_id,
            tenant=principal.tenant_name,
            detail={"reason": reason},
        )
    )


def _key_problem(exc: OhttpKeyProblem) -> Response:
    """RFC 9458 §5.3: a key configuration problem, so the client refetches the keys."""
    body = msgspec.json.encode({"type": ohttp.KEY_PROBLEM_TYPE, "title": exc.message})
    return Response(body, 400, media_type="application/problem+json")


routes = [
    Route("/v1/ohttp", sealed_request, methods=["POST"]),
    Route("/.well-known/ohttp-gateway", key_configuration, methods=["GET"]),
]
