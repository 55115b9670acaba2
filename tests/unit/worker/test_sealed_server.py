"""The worker's sealed-request server: size limits, failures mid-answer, early cancels.

The inner app is the real inference app (api/sealed_app.py) or, to force a failure, a
small ASGI app; the model is replaced by a function that answers at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import pytest

from bastion.api.sealed_app import create_sealed_app
from bastion.crypto import ohttp
from bastion.wire import bhttp
from bastion.wire.protocol import (
    Choice,
    GenerateResult,
    Message,
    ModelMetadata,
    OhttpKey,
    OhttpSuite,
    RequestFailed,
    RequestLimits,
    SealedChunk,
    SealedRequest,
    SealedResponse,
    SealingKeys,
    SizeLimits,
    cancelled,
)
from bastion.worker import inner, sealed

KEY = ohttp.GatewayKey.generate(1)
TEXT = "y" * (3 * 1024 * 1024)  # a 3 MiB answer


def _server(app: Any = None) -> tuple[sealed.SealedServer, list[Message]]:
    def submit(request: Any, deliver: Callable[[Message], None]) -> inner.JobHandle:
        raise AssertionError("the tests run inner requests inline")

    pipeline = inner.SealedPipeline("m", submit)
    pipeline.metadata = ModelMetadata(runtime="echo", capabilities=["chat"], context_length=10)
    sent: list[Message] = []
    server = sealed.SealedServer(app or create_sealed_app(), pipeline, sent.append)
    server.set_keys(
        SealingKeys(
            version=1,
            keys=[
                OhttpKey(
                    key_id=1,
                    kem_id=KEY.private_key.kem_id,
                    private_key=KEY.private_key.to_bytes(),
                    suites=[OhttpSuite(kdf_id=1, aead_id=1)],
                )
            ],
            date_window_s=60,
            request_limits=RequestLimits(
                max_body_bytes=1 << 20, max_tokens_limit=4096, max_choices=1
            ),
            size_limits=SizeLimits(max_batch=16, max_input_elements=1024, max_answer_bytes=1 << 20),
        )
    )
    return server, sent


def _inner(stream: bool = False) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return bhttp.encode_request(
        bhttp.Request(
            method="POST",
            scheme="https",
            authority="b",
            path="/v1/chat/completions",
            headers=(
                ("content-type", "application/json"),
                ("date", email.utils.formatdate(usegmt=True)),
            ),
            content=json.dumps(body).encode(),
        )
    )


def _answer(request: Any, deliver: Callable[[Message], None]) -> Message:
    return GenerateResult(
        id=0,
        choices=[Choice(index=0, text=TEXT, finish_reason="stop")],
        prompt_tokens=1,
        completion_tokens=1,
    )


def _open_chunked(client: Any, pieces: list[Message]) -> list[Any]:
    """What the client reads: decrypted Binary HTTP events (raises if cut short)."""
    opener, decoder, events = client.opener(), bhttp.ResponseDecoder(), []
    for piece in pieces:
        assert isinstance(piece, SealedChunk | SealedResponse)
        for plaintext in opener.feed(piece.data):
            events += decoder.feed(plaintext)
    events += decoder.feed(opener.finish())
    return events + decoder.finish()


def test_a_big_chunked_answer_leaves_in_pieces_that_fit_the_channel() -> None:
    server, _ = _server()
    data, client = ohttp.encapsulate_chunked_request(KEY.config(), [_inner()])
    request = SealedRequest(id=7, data=data, chunked=True, actions=["chat"])
    pieces: list[Message] = []
    asyncio.run(server._serve(request, pieces.append, _answer))
    assert isinstance(pieces[-1], SealedResponse)
    assert sum(isinstance(p, SealedChunk) for p in pieces) >= 3
    assert all(len(p.data) < sealed.SEALED_CHUNK_BYTES + 4096 for p in pieces)  # type: ignore[union-attr]
    body = b"".join(e.data for e in _open_chunked(client, pieces) if isinstance(e, bhttp.Body))
    assert json.loads(body)["choices"][0]["message"]["content"] == TEXT


def test_a_whole_answer_too_big_for_the_channel_is_an_encrypted_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sealed, "MAX_WHOLE_ANSWER_BYTES", 1024 * 1024)
    server, _ = _server()
    data, client = ohttp.encapsulate_request(KEY.config(), _inner())
    answer = server.serve_inline(SealedRequest(id=3, data=data, actions=["chat"]), _answer)
    assert isinstance(answer, SealedResponse)
    opened = bhttp.decode_response(client.open(answer.data))
    assert opened.status == 500
    assert json.loads(opened.content)["error"]["code"] == "answer_too_large"


class _Failing:
    """An inner app that fails after `pieces` body messages."""

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(self.pieces):
            await send({"type": "http.response.body", "body": b"data: part", "more_body": True})
        raise RuntimeError("the model broke")


def test_a_failure_after_part_of_a_stream_leaves_it_visibly_cut_short() -> None:
    server, _ = _server(_Failing(pieces=2))
    data, client = ohttp.encapsulate_chunked_request(KEY.config(), [_inner(stream=True)])
    pieces: list[Message] = []
    asyncio.run(
        server._serve(SealedRequest(id=9, data=data, chunked=True, actions=["chat"]), pieces.append)
    )
    assert [type(p) for p in pieces] == [SealedChunk, SealedChunk, RequestFailed]
    with pytest.raises(ohttp.DecryptionFailed):
        _open_chunked(client, pieces[:-1])


@pytest.mark.parametrize("chunked", [False, True])
def test_a_failure_before_any_body_left_is_an_encrypted_500(chunked: bool) -> None:
    server, _ = _server(_Failing(pieces=0))
    if chunked:
        data, client = ohttp.encapsulate_chunked_request(KEY.config(), [_inner()])
    else:
        data, client = ohttp.encapsulate_request(KEY.config(), _inner())  # type: ignore[assignment]
    pieces: list[Message] = []
    request = SealedRequest(id=9, data=data, chunked=chunked, actions=["chat"])
    asyncio.run(server._serve(request, pieces.append))
    assert isinstance(pieces[-1], SealedResponse)
    assert not any(isinstance(p, RequestFailed) for p in pieces)
    if chunked:
        heads = [e for e in _open_chunked(client, pieces) if isinstance(e, bhttp.Head)]
        assert heads[0].status == 500
    else:
        assert isinstance(pieces[0], SealedResponse)
        assert bhttp.decode_response(client.open(pieces[0].data)).status == 500


def test_a_cancel_before_the_request_starts_is_not_lost() -> None:
    server, sent = _server()
    data, _ = ohttp.encapsulate_chunked_request(KEY.config(), [_inner()])
    hold = threading.Event()
    server._loop.call_soon_threadsafe(hold.wait)  # the loop is busy: nothing starts yet
    server.submit(SealedRequest(id=11, data=data, chunked=True, actions=["chat"]))
    assert server.cancel(11)
    assert not server.cancel(12)
    hold.set()
    deadline = time.monotonic() + 10
    while server.in_flight:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    # Never served: only the word that it ended, with no usage, so the gateway can settle.
    assert sent == [cancelled(11)]


def _inner_request(
    path: str, body: Any, method: str = "POST", content_type: str = "application/json"
) -> bytes:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return bhttp.encode_request(
        bhttp.Request(
            method=method,
            scheme="https",
            authority="b",
            path=path,
            headers=(
                ("content-type", content_type),
                ("date", email.utils.formatdate(usegmt=True)),
            ),
            content=content,
        )
    )


_CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
_INNER_REQUESTS = {
    "answered": ("/v1/chat/completions", _CHAT, "POST", "application/json", ["chat"]),
    "unknown path": ("/v1/models", _CHAT, "POST", "application/json", ["chat"]),
    "wrong method": ("/v1/chat/completions", b"", "GET", "application/json", ["chat"]),
    "action not held": ("/v1/chat/completions", _CHAT, "POST", "application/json", ["embed"]),
    "another model": (
        "/v1/chat/completions",
        {**_CHAT, "model": "other"},
        "POST",
        "application/json",
        ["chat"],
    ),
    "not JSON": ("/v1/chat/completions", b"{", "POST", "application/json", ["chat"]),
    "not a JSON type": ("/v1/chat/completions", _CHAT, "POST", "text/plain", ["chat"]),
    "invalid body": ("/v1/chat/completions", {"model": "m"}, "POST", "application/json", ["chat"]),
    "path parameters": (
        "/v2/models/m/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        "POST",
        "application/json",
        ["infer"],
    ),
}


@pytest.mark.parametrize("case", list(_INNER_REQUESTS))
def test_the_direct_route_answers_as_the_starlette_app_does(case: str) -> None:
    """The sealed app takes an inner request straight to its route's endpoint; whatever the
    request, the answer is the one Starlette's middleware and router would have given."""
    path, body, method, content_type, actions = _INNER_REQUESTS[case]
    answers = []
    for app in (create_sealed_app(), create_sealed_app().app):
        server, _ = _server(app)
        data, client = ohttp.encapsulate_request(
            KEY.config(), _inner_request(path, body, method, content_type)
        )
        request = SealedRequest(id=5, data=data, actions=actions)
        answer = server.serve_inline(request, _echo)
        assert isinstance(answer, SealedResponse)
        response = bhttp.decode_response(client.open(answer.data))
        document = json.loads(response.content)
        if response.status == 200:
            document.pop("id")
            document.pop("created")
        headers = {name: value for name, value in response.headers if name != "date"}
        answers.append((response.status, headers, document))
    assert answers[0] == answers[1]
    if case == "answered":
        assert answers[0][0] == 200
    else:
        assert 400 <= answers[0][0] < 500


def _echo(request: Any, deliver: Callable[[Message], None]) -> Message:
    return GenerateResult(
        id=0,
        choices=[Choice(index=0, text="hello", finish_reason="stop")],
        prompt_tokens=1,
        completion_tokens=1,
    )


def test_an_unexpected_failure_in_a_direct_route_is_an_encrypted_500() -> None:
    server, _ = _server()

    def broken(request: Any, deliver: Callable[[Message], None]) -> Message:
        raise RuntimeError("the model broke")

    data, client = ohttp.encapsulate_request(KEY.config(), _inner())
    answer = server.serve_inline(SealedRequest(id=6, data=data, actions=["chat"]), broken)
    assert isinstance(answer, SealedResponse)
    response = bhttp.decode_response(client.open(answer.data))
    assert response.status == 500
    assert json.loads(response.content) == {"type": "about:blank", "title": "The request failed."}
    assert b"model broke" not in response.content
