"""End-to-end encryption with the official openai SDK through OHTTPTransport, and the
gateway's refusals of what is not a proper encrypted request."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from bastion.client import OHTTPTransport
from bastion.crypto import hpke, ohttp
from bastion.models.demo import digits_split
from bastion.wire import bhttp
from bastion_testing import (
    BastionServer,
    RecordingTransport,
    cli_json,
    ohttp_config,
    ohttp_fingerprints,
    post_sealed,
    seal_request,
)

CHAT = {"model": "tiny-chat", "max_tokens": 8, "seed": 1, "temperature": 0}
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def fingerprints(server: BastionServer) -> list[str]:
    return ohttp_fingerprints(server.home)


def _sdk(server: BastionServer, key: str, transport: OHTTPTransport) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key=key,
        http_client=httpx.Client(transport=transport, timeout=60),
        max_retries=0,
    )


def _plain(server: BastionServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_chat_completions_embeddings_match_plaintext(
    server: BastionServer, consumer_key: str, fingerprints: list[str]
) -> None:
    wire = RecordingTransport()
    sealed = _sdk(server, consumer_key, OHTTPTransport(fingerprints=fingerprints, transport=wire))
    plain = _plain(server, consumer_key)

    answer = sealed.chat.completions.create(messages=MESSAGES, **CHAT)  # type: ignore[call-overload]
    expected = plain.chat.completions.create(messages=MESSAGES, **CHAT)  # type: ignore[call-overload]
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert answer.usage == expected.usage

    stream = sealed.chat.completions.create(messages=MESSAGES, stream=True, **CHAT)  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected.choices[0].message.content

    completion = sealed.completions.create(prompt="The sea", **CHAT)  # type: ignore[call-overload]
    plain_completion = plain.completions.create(prompt="The sea", **CHAT)  # type: ignore[call-overload]
    assert completion.choices[0].text == plain_completion.choices[0].text

    vectors = sealed.embeddings.create(model="minilm-l6", input=["hello", "world"])
    plain_vectors = plain.embeddings.create(model="minilm-l6", input=["hello", "world"])
    assert len(vectors.data) == 2
    np.testing.assert_allclose(
        [d.embedding for d in vectors.data], [d.embedding for d in plain_vectors.data], atol=1e-6
    )

    # Everything went to /v1/ohttp; the wire never carried the prompt or the answer.
    posts = [s for s in wire.sent if b"accept: application/ohttp-keys" not in s]
    assert posts and all(b"content-type: message/ohttp" in s for s in posts)
    assert b"the sea" not in wire.wire().lower()
    assert expected.choices[0].message.content.encode() not in wire.wire()


def test_async_sdk_streams_encrypted(
    server: BastionServer, consumer_key: str, fingerprints: list[str]
) -> None:
    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1",
            api_key=consumer_key,
            http_client=httpx.AsyncClient(transport=OHTTPTransport(fingerprints=fingerprints)),
            max_retries=0,
        )
        whole = await client.chat.completions.create(messages=MESSAGES, **CHAT)  # type: ignore[call-overload]
        stream = await client.chat.completions.create(messages=MESSAGES, stream=True, **CHAT)  # type: ignore[call-overload]
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return whole.choices[0].message.content or "", "".join(pieces)

    whole, streamed = asyncio.run(run())
    assert whole and whole == streamed


def test_oip_infer_on_digits(
    server: BastionServer, consumer_key: str, fingerprints: list[str]
) -> None:
    _, x_test, _, y_test = digits_split()
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [4, 64],
                "datatype": "FP32",
                "data": x_test[:4].ravel().tolist(),
            }
        ]
    }
    headers = {"authorization": f"Bearer {consumer_key}"}
    with httpx.Client(
        base_url=server.url,
        headers=headers,
        transport=OHTTPTransport(fingerprints=fingerprints),
        timeout=60,
    ) as sealed:
        answer = sealed.post("/v2/models/digits/infer", json=body)
    plain = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, headers=headers)
    assert answer.status_code == 200
    assert answer.json()["outputs"] == plain.json()["outputs"]
    labels = next(o for o in answer.json()["outputs"] if o["name"] == "label")["data"]
    assert sum(int(a == b) for a, b in zip(labels, y_test[:4], strict=True)) >= 3


def test_inner_errors_come_back_encrypted_with_their_status(
    server: BastionServer, consumer_key: str, fingerprints: list[str]
) -> None:
    wire = RecordingTransport()
    sealed = _sdk(server, consumer_key, OHTTPTransport(fingerprints=fingerprints, transport=wire))
    with pytest.raises(openai.BadRequestError) as refused:
        sealed.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10**6)
    assert refused.value.status_code == 400
    assert "max_tokens" in str(refused.value.body)
    # The outer exchange succeeded: the gateway and the wire did not see a 400.
    assert wire.received[-1].startswith(b"status: 200\n")
    assert b"content-type: message/ohttp-res" in wire.received[-1]
    assert b"max_tokens" not in wire.wire()
    with pytest.raises(openai.NotFoundError):
        # The inner path does not exist for encrypted requests: 404, encrypted.
        sealed.post("/files", body={"model": "tiny-chat"}, cast_to=object)


def test_actions_are_enforced_inside(
    server: BastionServer, tenant: str, fingerprints: list[str]
) -> None:
    key = cli_json(server.home, "keys", "create", "--tenant", tenant, "--action", "embeddings")[
        "key"
    ]
    sealed = _sdk(server, key, OHTTPTransport(fingerprints=fingerprints))
    assert sealed.embeddings.create(model="minilm-l6", input="hi").data
    with pytest.raises(openai.PermissionDeniedError):
        sealed.chat.completions.create(messages=MESSAGES, **CHAT)  # type: ignore[call-overload]


def test_outer_checks_use_only_the_outer_headers(
    server: BastionServer, tenant: str, consumer_key: str, fingerprints: list[str]
) -> None:
    only_minilm = cli_json(
        server.home, "keys", "create", "--tenant", tenant, "--model", "minilm-l6"
    )["key"]
    no_inference = cli_json(
        server.home, "keys", "create", "--tenant", tenant, "--action", "models"
    )["key"]
    transport = OHTTPTransport(fingerprints=fingerprints)
    with pytest.raises(openai.PermissionDeniedError):
        _sdk(server, only_minilm, transport).chat.completions.create(messages=MESSAGES, **CHAT)  # type: ignore[call-overload]
    with pytest.raises(openai.PermissionDeniedError):
        _sdk(server, no_inference, transport).embeddings.create(model="minilm-l6", input="x")
    with pytest.raises(openai.AuthenticationError):
        _sdk(server, "bsk_0000000000000000_" + "a" * 52, transport).embeddings.create(
            model="minilm-l6", input="x"
        )
    with pytest.raises(openai.NotFoundError):
        _sdk(server, consumer_key, transport).embeddings.create(model="no-such-model", input="x")


def test_gateway_refuses_malformed_outer_requests(server: BastionServer, consumer_key: str) -> None:
    auth = {"authorization": f"Bearer {consumer_key}"}
    url = f"{server.url}/v1/ohttp"
    wrong_type = httpx.post(url, content=b"x", headers={**auth, "bastion-model": "echo"})
    assert wrong_type.status_code == 415
    no_model = httpx.post(url, content=b"x", headers={**auth, "content-type": "message/ohttp-req"})
    assert no_model.status_code == 400 and "Bastion-Model" in no_model.json()["error"]["message"]
    garbage = httpx.post(
        url,
        content=b"\x00\x01",
        headers={**auth, "content-type": "message/ohttp-req", "bastion-model": "echo"},
    )
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "ohttp_malformed"
    unauthenticated = httpx.post(
        url, content=b"x", headers={"content-type": "message/ohttp-req", "bastion-model": "echo"}
    )
    assert unauthenticated.status_code == 401


def test_key_configuration_is_public_and_matches_the_cli(
    server: BastionServer, fingerprints: list[str]
) -> None:
    response = httpx.get(f"{server.url}/.well-known/ohttp-gateway")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/ohttp-keys"
    # Cacheable, and only so: a second Cache-Control (e.g. a default no-store) would win.
    assert response.headers.get_list("cache-control") == ["public, max-age=300"]
    configs = ohttp.decode_key_configs(response.content)
    # One current key per KEM: the post-quantum hybrid first (clients that know it take
    # it), then X25519 for the others; `bastion ohttp keys` lists them in the same order.
    assert [c.fingerprint() for c in configs] == fingerprints[:2]
    assert [c.kem_id for c in configs] == [hpke.KEM_MLKEM768_X25519, hpke.KEM_X25519_SHA256]
    assert all(set(c.suites) == {(1, 1), (1, 3)} for c in configs)


def test_pins_refuse_a_substituted_key(
    server: BastionServer, consumer_key: str, tmp_path: Path
) -> None:
    wrong = OHTTPTransport(fingerprints=["sha256:" + "00" * 32])
    with pytest.raises(openai.APIConnectionError) as refused:
        _sdk(server, consumer_key, wrong).embeddings.create(model="minilm-l6", input="x")
    assert "pinned fingerprint" in str(refused.value.__cause__)

    # Trust on first use: the first contact records the fingerprint...
    pins = tmp_path / "pins.json"
    first = _sdk(server, consumer_key, OHTTPTransport(pin_file=pins))
    assert first.embeddings.create(model="minilm-l6", input="x").data
    stored = json.loads(pins.read_text())
    assert stored == {server.url: ohttp_fingerprints(server.home)[:1]}
    assert pins.stat().st_mode & 0o077 == 0
    # ...and a later contact presenting another key is refused.
    pins.write_text(json.dumps({server.url: ["sha256:" + "11" * 32]}))
    with pytest.raises(openai.APIConnectionError):
        _sdk(server, consumer_key, OHTTPTransport(pin_file=pins)).embeddings.create(
            model="minilm-l6", input="x"
        )


def test_usage_is_accounted_from_sealed_requests(
    server: BastionServer, consumer_key: str, fingerprints: list[str]
) -> None:
    before = server.tokens("tiny-chat", "completion")
    sealed = _sdk(server, consumer_key, OHTTPTransport(fingerprints=fingerprints))
    answer = sealed.chat.completions.create(messages=MESSAGES, **CHAT)  # type: ignore[call-overload]
    # The SDK stops reading at [DONE], before the final chunk that carries the usage to
    # the gateway: it is charged all the same.
    stream = sealed.chat.completions.create(messages=MESSAGES, stream=True, **CHAT)  # type: ignore[call-overload]
    list(stream)
    assert answer.usage is not None
    expected = before + 2 * answer.usage.completion_tokens
    assert server.wait_tokens("tiny-chat", "completion", expected) == expected


def test_binary_http_inner_request_needs_date(
    server: BastionServer, consumer_key: str, fingerprints: list[str]
) -> None:
    data, context = seal_request(
        ohttp_config(server),
        {"model": "minilm-l6", "input": "x"},
        path="/v1/embeddings",
        dated=False,
    )
    response = post_sealed(server, consumer_key, data, model="minilm-l6")
    assert response.status_code == 200
    answer = bhttp.decode_response(context.open(response.content))
    assert answer.status == 400
    assert json.loads(answer.content)["type"].endswith("#date")
    assert answer.header("date") is not None


def test_streamed_inner_request_in_a_whole_answer(server: BastionServer, consumer_key: str) -> None:
    """`stream: true` inside a plain (not chunked) OHTTP request: the whole event stream
    comes back in one encrypted answer."""
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    data, context = seal_request(ohttp_config(server), body)
    response = post_sealed(server, consumer_key, data)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    answer = bhttp.decode_response(context.open(response.content))
    assert answer.status == 200
    assert (answer.header("content-type") or "").startswith("text/event-stream")
    events = [
        line[6:] for line in answer.content.decode().splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    text = "".join(
        c["choices"][0]["delta"].get("content", "")
        for c in map(json.loads, events[:-1])
        if c["choices"]
    )
    assert text == "a b c"
