"""Post-quantum end-to-end encryption against a real server: the openai SDK through
OHTTPTransport on the hybrid MLKEM768-X25519 suite and on classical X25519, streamed and
not; what goes over the wire; and a server that requires the hybrid.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bastion.client import OHTTPKeyError, OHTTPTransport
from bastion.crypto import hpke, ohttp
from bastion_testing import (
    BASTION,
    BastionServer,
    RecordingTransport,
    add_echo_model,
    clean_env,
    cli_json,
    ohttp_fingerprints,
    post_sealed,
    run_cli,
    seal_request,
)

MESSAGES = [{"role": "user", "content": "a private question about the weather"}]
KEMS = {"mlkem768-x25519": hpke.KEM_MLKEM768_X25519, "x25519": hpke.KEM_X25519_SHA256}


def _client(server: BastionServer, key: str, transport: httpx.BaseTransport) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key=key,
        http_client=httpx.Client(transport=transport, timeout=60),
        max_retries=0,
    )


class KemRecorder(RecordingTransport):
    """The wire, and the KEM id of each encapsulated request sent (RFC 9458 header)."""

    def __init__(self) -> None:
        super().__init__()
        self.kems: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/ohttp":
            self.kems.append(ohttp.parse_request_header(request.read()).kem_id)
        return super().handle_request(request)


@pytest.mark.parametrize("kem", list(KEMS))
def test_the_openai_sdk_chats_on_each_suite(
    server: BastionServer, consumer_key: str, kem: str
) -> None:
    wire = KemRecorder()
    transport = OHTTPTransport(
        fingerprints=ohttp_fingerprints(server.home), kem=kem, transport=wire
    )
    client = _client(server, consumer_key, transport)
    plain = openai.OpenAI(base_url=f"{server.url}/v1", api_key=consumer_key, max_retries=0)
    expected = plain.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=8)

    answer = client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=8)
    assert answer.choices[0].message.content == expected.choices[0].message.content
    streamed = client.chat.completions.create(
        model="echo", messages=MESSAGES, max_tokens=8, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == expected.choices[0].message.content

    suite = transport.suite(server.url)
    assert suite is not None and suite.startswith(kem + " (")
    assert ("post-quantum" in suite) == (kem != "x25519")
    # What crossed the wire used that KEM, and carries none of the prompt.
    assert set(wire.kems) == {KEMS[kem]} and len(wire.kems) == 2
    assert b"weather" not in wire.wire()


def test_auto_prefers_the_hybrid_and_its_requests_are_larger(
    server: BastionServer, consumer_key: str
) -> None:
    wire = KemRecorder()
    transport = OHTTPTransport(fingerprints=ohttp_fingerprints(server.home), transport=wire)
    assert transport.fetch_keys(server.url).startswith("mlkem768-x25519 (post-quantum hybrid)")
    _client(server, consumer_key, transport).chat.completions.create(
        model="echo", messages=MESSAGES, max_tokens=4
    )
    assert wire.kems == [hpke.KEM_MLKEM768_X25519]
    # Sealed by hand on each published configuration: the hybrid's request carries a
    # 1,120-byte encapsulation instead of 32 bytes, and both are answered.
    configs = ohttp.decode_key_configs(httpx.get(f"{server.url}/.well-known/ohttp-gateway").content)
    sizes = {}
    for config in configs:
        data, context = seal_request(config, {"model": "echo", "messages": MESSAGES})
        response = post_sealed(server, consumer_key, data)
        assert response.status_code == 200
        assert b"weather" in context.open(response.content)
        sizes[config.kem_id] = len(data)
    assert sizes[hpke.KEM_MLKEM768_X25519] - sizes[hpke.KEM_X25519_SHA256] == 1120 - 32


def test_bastion_chat_names_the_suite(
    server: BastionServer, consumer_key: str, tmp_path: Path
) -> None:
    proc = run_cli(
        server.home, "chat", "--url", server.url, "--key", consumer_key, "--model", "echo",
        "--e2e", "--pin-file", str(tmp_path / "pins.json"), input="hello\n/quit\n",
    )  # fmt: skip
    assert "mlkem768-x25519 (post-quantum hybrid), hkdf-sha256, aes-128-gcm" in proc.stderr
    proc = run_cli(
        server.home, "chat", "--url", server.url, "--key", consumer_key, "--model", "echo",
        "--e2e", "--pin-file", str(tmp_path / "other.json"), "--kem", "x25519",
        input="hello\n/quit\n",
    )  # fmt: skip
    assert "x25519 (classical)" in proc.stderr
    refused = run_cli(
        server.home, "chat", "--url", server.url, "--key", consumer_key,
        "--e2e", "--kem", "kyber", input="", check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "kem must be" in refused.stderr


@pytest.fixture(scope="module")
def pq_only(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[BastionServer, str, ohttp.KeyConfig]]:
    """A home that served both suites, restarted with BASTION_OHTTP_REQUIRE_PQ=true; with a
    consumer key and the classical configuration clients saw before the restart."""
    home = tmp_path_factory.mktemp("pq-only") / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    cli_json(home, "tenants", "create", "acme")
    key = cli_json(home, "keys", "create", "--tenant", "acme")["key"]
    before = BastionServer(home)
    try:
        before.wait_ready(["echo"])
        published = ohttp.decode_key_configs(
            httpx.get(f"{before.url}/.well-known/ohttp-gateway").content
        )
    finally:
        before.stop()
    [classical] = [c for c in published if c.kem_id == hpke.KEM_X25519_SHA256]
    server = BastionServer(home, env={"BASTION_OHTTP_REQUIRE_PQ": "true"})
    try:
        server.wait_ready(["echo"])
        yield server, key, classical
    finally:
        server.stop()


def test_a_server_that_requires_the_hybrid_refuses_classical_requests(
    pq_only: tuple[BastionServer, str, ohttp.KeyConfig],
) -> None:
    server, key, classical = pq_only
    configs = ohttp.decode_key_configs(httpx.get(f"{server.url}/.well-known/ohttp-gateway").content)
    assert [c.kem_id for c in configs] == [hpke.KEM_MLKEM768_X25519]
    # A request sealed to the X25519 key the server published before: the RFC 9458 key
    # problem, unencrypted, so that the client fetches the configuration again.
    data, _ = seal_request(classical, {"model": "echo", "messages": MESSAGES})
    refused = post_sealed(server, key, data)
    assert refused.status_code == 400
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["type"] == ohttp.KEY_PROBLEM_TYPE
    assert "post-quantum" in refused.json()["title"]
    # A client that insists on X25519 finds nothing it accepts...
    fingerprints = ohttp_fingerprints(server.home)
    strict = OHTTPTransport(fingerprints=fingerprints, kem="x25519")
    with pytest.raises(openai.APIConnectionError) as failed:
        _client(server, key, strict).chat.completions.create(model="echo", messages=MESSAGES)
    assert isinstance(failed.value.__cause__, OHTTPKeyError)
    # ...and one that holds the old classical configuration moves to the hybrid after the
    # key problem, on its own.
    transport = OHTTPTransport(fingerprints=fingerprints)
    transport._configs[server.url] = classical
    wire = KemRecorder()
    transport._transport = wire
    answer = _client(server, key, transport).chat.completions.create(
        model="echo", messages=MESSAGES, max_tokens=4
    )
    assert answer.choices[0].message.content
    # The classical request was refused with the key problem, then sent on the hybrid.
    assert wire.kems == [hpke.KEM_X25519_SHA256, hpke.KEM_MLKEM768_X25519]
    assert transport.suite(server.url).startswith("mlkem768-x25519")  # type: ignore[union-attr]


def test_an_unknown_kem_in_the_settings_stops_the_server_and_the_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    bad = {"BASTION_OHTTP_KEMS": "kyber512"}
    proc = run_cli(home, "ohttp", "keys", check=False, env=bad)
    assert proc.returncode != 0 and "unknown KEM 'kyber512'" in proc.stderr
    assert "Traceback" not in proc.stderr
    serve = subprocess.run(
        [*BASTION, "serve", "--home", str(home), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(**bad),
    )
    assert serve.returncode != 0 and "unknown KEM 'kyber512'" in serve.stderr
    assert "Traceback" not in serve.stderr


def test_the_classical_keys_of_a_post_quantum_server_are_retired_by_the_operator(
    pq_only: tuple[BastionServer, str, ohttp.KeyConfig],
) -> None:
    server, _, classical = pq_only
    # The CLI reads the same settings as the server.
    env = {"BASTION_OHTTP_REQUIRE_PQ": "true"}

    def cli(*args: str) -> Any:
        return json.loads(run_cli(server.home, *args, "--json", env=env).stdout)

    listed = {k["kem"]: k for k in cli("ohttp", "keys")}
    # Still in the database (not yet retired), but neither published nor accepted.
    assert listed["x25519"]["state"] == "current" and listed["x25519"]["published"] is False
    assert listed["mlkem768-x25519"]["published"] is True
    offered = run_cli(
        server.home, "ohttp", "retire", "--kem", "mlkem768-x25519", env=env, check=False
    )
    assert offered.returncode != 0 and "rotate its key instead" in offered.stderr
    retired = cli("ohttp", "retire", "--kem", "x25519")
    assert [k["fingerprint"] for k in retired] == [classical.fingerprint()]
    every = {k["fingerprint"]: k["state"] for k in cli("ohttp", "keys", "--all")}
    assert every[classical.fingerprint()] == "retired"
