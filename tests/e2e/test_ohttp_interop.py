"""Oblivious HTTP interop: an independent Node client (@hpke/core + bhttp-js) against Bastion.

The client lives in tests/interop/node and shares no code with Bastion. Each encrypted answer
is compared with the same request sent over the plaintext API.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bastion.models.demo import digits_split
from bastion_testing import BastionServer

NODE_DIR = Path(__file__).resolve().parents[1] / "interop" / "node"
CLIENT = NODE_DIR / "ohttp_client.mjs"
AEADS = ["aes128gcm", "chacha20poly1305"]
MIN_NODE_MAJOR = 20


def _dependencies_installed() -> bool:
    package = json.loads((NODE_DIR / "package.json").read_text())
    return all((NODE_DIR / "node_modules" / name).is_dir() for name in package["dependencies"])


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with the client's npm dependencies installed (`npm ci`)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            f"the OHTTP interop tests need Node.js >= {MIN_NODE_MAJOR} and npm on PATH "
            f"(to run {CLIENT.relative_to(NODE_DIR.parents[2])}); install them, do not skip"
        )
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < MIN_NODE_MAJOR:
        pytest.fail(f"Node.js {version.stdout.strip()} is too old; need >= {MIN_NODE_MAJOR}")
    if not _dependencies_installed():
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            pytest.fail(
                f"`npm ci` failed in {NODE_DIR}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
    return node


class NodeClient:
    """Runs ohttp_client.mjs against one server with one API key."""

    def __init__(self, node: str, server: BastionServer, key: str) -> None:
        self.node = node
        self.server = server
        self.key = key

    def run(self, *args: str) -> dict[str, Any]:
        proc = subprocess.run(
            [self.node, str(CLIENT), *args],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, f"ohttp_client failed ({proc.returncode}): {proc.stderr}"
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def send(self, model: str, path: str, body: dict[str, Any], *flags: str) -> dict[str, Any]:
        return self.run(
            "--base", self.server.url,
            "--key", self.key,
            "--model", model,
            "--path", path,
            "--body", json.dumps(body),
            *flags,
        )  # fmt: skip


@pytest.fixture(scope="module")
def ohttp(node: str, server: BastionServer, consumer_key: str) -> NodeClient:
    return NodeClient(node, server, consumer_key)


@pytest.fixture(scope="module")
def plain(server: BastionServer, consumer_key: str) -> Iterator[httpx.Client]:
    with server.client(consumer_key) as client:
        yield client


def inner_json(result: dict[str, Any]) -> Any:
    """The decrypted inner response's JSON, after checking both layers said 200."""
    assert result["outer_status"] == 200, result
    assert result["status"] == 200, result["body"]
    assert result["headers"]["content-type"].startswith("application/json")
    return json.loads(result["body"])


def plain_json(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def error_type(body: dict[str, Any]) -> str:
    """The error's type: RFC 9457 problem details put it on top, OpenAI under "error"."""
    found = body.get("type", body.get("error", {}).get("type"))
    assert isinstance(found, str), body
    return found


EMBEDDING_BODY = {"model": "minilm-l6", "input": ["A cat sits on the mat.", "Sealed end to end."]}
CHAT_ARGS = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "Tell me about the sea."}],
    "seed": 1,
    "temperature": 0,
    "max_tokens": 8,
}


def test_selftest_reproduces_rfc9458_appendix_a(node: str) -> None:
    proc = subprocess.run(
        [node, str(CLIENT), "--selftest"], cwd=NODE_DIR, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads(proc.stdout)["checks"]
    for name in (
        "encapsulated_request_matches",
        "request_decapsulates",
        "bhttp_request_decodes",
        "encapsulated_response_matches",
        "client_opens_response",
        "chunked_response_opens",
        "chunked_truncation_detected",
    ):
        assert checks[name] is True, name


def test_key_configuration_is_public_and_offers_both_aeads(ohttp: NodeClient) -> None:
    # No --key: the key configuration needs no credentials.
    configs = ohttp.run("--base", ohttp.server.url, "--show-keys")["configs"]
    x25519 = [c for c in configs if c["kem_id"] == 0x0020]
    assert x25519, configs
    suites = {(s["kdf_id"], s["aead_id"]) for s in x25519[0]["suites"]}
    assert {(0x0001, 0x0001), (0x0001, 0x0003)} <= suites


@pytest.mark.parametrize("aead", AEADS)
def test_embeddings_equal_plaintext(ohttp: NodeClient, plain: httpx.Client, aead: str) -> None:
    sealed = inner_json(ohttp.send("minilm-l6", "/v1/embeddings", EMBEDDING_BODY, "--aead", aead))
    clear = plain_json(plain, "/v1/embeddings", EMBEDDING_BODY)
    assert len(sealed["data"]) == len(clear["data"]) == 2
    for ours, theirs in zip(sealed["data"], clear["data"], strict=True):
        assert ours["index"] == theirs["index"]
        vector = np.asarray(ours["embedding"], dtype=np.float64)
        assert vector.shape == (384,)
        assert np.allclose(vector, np.asarray(theirs["embedding"]), atol=1e-5)


@pytest.mark.parametrize("aead", AEADS)
def test_chat_equals_plaintext(ohttp: NodeClient, plain: httpx.Client, aead: str) -> None:
    sealed = inner_json(ohttp.send("tiny-chat", "/v1/chat/completions", CHAT_ARGS, "--aead", aead))
    clear = plain_json(plain, "/v1/chat/completions", CHAT_ARGS)
    assert sealed["object"] == "chat.completion"
    assert sealed["usage"]["completion_tokens"] > 0
    text = sealed["choices"][0]["message"]["content"]
    assert text == clear["choices"][0]["message"]["content"]


@pytest.mark.parametrize("aead", AEADS)
def test_oip_infer_equals_plaintext(ohttp: NodeClient, plain: httpx.Client, aead: str) -> None:
    _, x_test, _, _ = digits_split()
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 64],
                "datatype": "FP32",
                "data": [float(v) for v in x_test[0]],
            }
        ]
    }
    path = "/v2/models/digits/infer"
    sealed = inner_json(ohttp.send("digits", path, body, "--aead", aead))
    clear = plain_json(plain, path, body)
    ours = {o["name"]: o for o in sealed["outputs"]}
    theirs = {o["name"]: o for o in clear["outputs"]}
    assert ours["label"]["data"] == theirs["label"]["data"]
    assert ours["label"]["data"][0] == int(np.argmax(ours["probabilities"]["data"]))
    assert ours["probabilities"]["shape"] == [1, 10]
    assert np.allclose(ours["probabilities"]["data"], theirs["probabilities"]["data"], atol=1e-6)


def sse_text(stream: str) -> tuple[str, list[dict[str, Any]]]:
    """The concatenated delta content of an OpenAI SSE stream, and its events."""
    events: list[dict[str, Any]] = []
    done = False
    for line in stream.splitlines():
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            done = True
            continue
        events.append(json.loads(data))
    assert done, stream
    text = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")
    )
    return text, events


@pytest.mark.parametrize("aead", AEADS)
def test_streamed_chat_over_chunked_ohttp(
    ohttp: NodeClient, plain: httpx.Client, aead: str
) -> None:
    result = ohttp.send(
        "tiny-chat",
        "/v1/chat/completions",
        {**CHAT_ARGS, "stream": True},
        "--chunked",
        "--aead",
        aead,
    )
    assert result["outer_status"] == 200, result
    assert result["status"] == 200, result["body"]
    assert result["headers"]["content-type"].startswith("text/event-stream")
    # The answer came as several encrypted chunks, not as one sealed blob.
    assert result["chunks"] >= 2
    text, events = sse_text(result["body"])
    assert len(events) >= 2
    whole = plain_json(plain, "/v1/chat/completions", CHAT_ARGS)
    assert text == whole["choices"][0]["message"]["content"]


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
def test_tampered_ciphertext_is_refused_before_decryption(ohttp: NodeClient, chunked: bool) -> None:
    flags = ["--tamper", *(["--chunked"] if chunked else [])]
    result = ohttp.send("minilm-l6", "/v1/embeddings", EMBEDDING_BODY, *flags)
    assert result["outer_status"] == 400, result
    assert "status" not in result  # refused in the clear: nothing was decrypted
    assert isinstance(json.loads(result["outer_body"]), dict)


def test_stale_date_gets_an_encrypted_date_error(ohttp: NodeClient) -> None:
    result = ohttp.send("minilm-l6", "/v1/embeddings", EMBEDDING_BODY, "--stale-date")
    assert result["outer_status"] == 200, result
    assert result["status"] == 400, result["body"]
    assert error_type(json.loads(result["body"])).endswith("#date")


def test_replayed_request_is_refused(ohttp: NodeClient) -> None:
    result = ohttp.send("minilm-l6", "/v1/embeddings", EMBEDDING_BODY, "--replay")
    assert result["outer_status"] == 200, result
    assert result["status"] == 200, result["body"]
    assert result["replay_outer_status"] == 400, result
