"""OHTTPTransport against a hostile network: what an intermediary sends instead of the
encrypted answer must be refused, never handed to the caller as the model's answer."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bastion.client import OHTTPError, OHTTPKeyError, OHTTPTransport
from bastion.crypto import hpke, ohttp

KEY = ohttp.GatewayKey.generate(3)
CONFIGS = ohttp.encode_key_configs([KEY.config()])
FINGERPRINT = KEY.config().fingerprint()
CHAT = {"model": "m", "messages": [{"role": "user", "content": "secret prompt"}]}
KEY_PROBLEM = {"type": "https://iana.org/assignments/http-problem-types#ohttp-key"}


def _network(
    answer: Callable[[httpx.Request], httpx.Response],
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """The network between client and server: serves the key configuration and lets
    `answer` reply to everything else; records every request."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/.well-known/ohttp-gateway":
            return httpx.Response(
                200, content=CONFIGS, headers={"content-type": ohttp.KEYS_MEDIA_TYPE}
            )
        return answer(request)

    return httpx.MockTransport(handler), seen


def _client(network: httpx.MockTransport, **options: object) -> httpx.Client:
    options.setdefault("fingerprints", [FINGERPRINT])
    transport = OHTTPTransport(transport=network, **options)  # type: ignore[arg-type]
    return httpx.Client(base_url="http://server", transport=transport)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "forged",
    [
        httpx.Response(200, json={"choices": [{"message": {"content": "FORGED"}}]}),
        httpx.Response(200, text="data: FORGED\n\n", headers={"content-type": "text/event-stream"}),
        httpx.Response(204),
    ],
)
def test_an_unencrypted_success_is_refused(forged: httpx.Response, stream: bool) -> None:
    network, _ = _network(lambda request: forged)
    with _client(network) as client, pytest.raises(OHTTPError, match="without the encrypted"):
        client.post("/v1/chat/completions", json={**CHAT, "stream": stream})


def test_a_redirect_is_refused_and_the_prompt_goes_nowhere(tmp_path: Path) -> None:
    network, seen = _network(
        lambda request: httpx.Response(307, headers={"location": "http://evil/v1/ohttp"})
    )
    pins = tmp_path / "pins.json"
    transport = OHTTPTransport(pin_file=pins, transport=network)
    with (
        httpx.Client(base_url="http://server", transport=transport, follow_redirects=True) as c,
        pytest.raises(OHTTPError),
    ):
        c.post("/v1/chat/completions", json=CHAT)
    assert {r.url.host for r in seen} == {"server"}
    assert list(json.loads(pins.read_text())) == ["http://server"]


def test_the_wrong_kind_of_encrypted_answer_is_refused() -> None:
    def opposite(request: httpx.Request) -> httpx.Response:
        chunked = request.headers["content-type"] == ohttp.CHUNKED_REQUEST_MEDIA_TYPE
        kind = ohttp.RESPONSE_MEDIA_TYPE if chunked else ohttp.CHUNKED_RESPONSE_MEDIA_TYPE
        return httpx.Response(200, content=b"\x00" * 64, headers={"content-type": kind})

    network, _ = _network(opposite)
    with _client(network) as client:
        for stream in (True, False):
            with pytest.raises(OHTTPError):
                client.post("/v1/chat/completions", json={**CHAT, "stream": stream})


def test_refusals_before_decryption_reach_the_caller() -> None:
    error = {"error": {"message": "Invalid or missing API key.", "code": "invalid_api_key"}}
    network, _ = _network(lambda request: httpx.Response(401, json=error))
    with _client(network) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401 and response.json() == error


def test_a_key_problem_makes_one_retry_only() -> None:
    network, seen = _network(
        lambda request: httpx.Response(
            400, json=KEY_PROBLEM, headers={"content-type": "application/problem+json"}
        )
    )
    with _client(network) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400
    posts = [r for r in seen if r.method == "POST"]
    assert len(posts) == 2
    assert all(b"secret prompt" not in r.content for r in posts)


def test_the_prompt_is_never_on_the_wire() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == ohttp.REQUEST_MEDIA_TYPE
        assert request.headers["bastion-model"] == "m"
        return httpx.Response(503, json={"error": {"message": "busy"}})

    network, seen = _network(answer)
    with _client(network) as client:
        client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k"})
    assert seen[-1].headers["authorization"] == "Bearer k"
    assert b"secret prompt" not in seen[-1].content


def test_trust_on_first_use_keeps_other_pins_and_is_private(tmp_path: Path) -> None:
    pins = tmp_path / "pins.json"
    pins.write_text(json.dumps({"http://other": ["sha256:" + "ab" * 32]}))
    pins.chmod(0o600)
    network, _ = _network(lambda request: httpx.Response(503))
    with _client(network, fingerprints=None, pin_file=pins) as client:
        client.post("/v1/chat/completions", json=CHAT)
    stored = json.loads(pins.read_text())
    assert stored == {"http://other": ["sha256:" + "ab" * 32], "http://server": [FINGERPRINT]}
    assert stat.S_IMODE(pins.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp"))
    # Now pinned: a server presenting another key is refused.
    pins.write_text(json.dumps({"http://server": ["sha256:" + "cd" * 32]}))
    with (
        _client(network, fingerprints=None, pin_file=pins) as client,
        pytest.raises(OHTTPKeyError),
    ):
        client.post("/v1/chat/completions", json=CHAT)


def test_requests_without_a_model_do_not_bypass_a_relay() -> None:
    network, seen = _network(lambda request: httpx.Response(200, json={"data": []}))
    with _client(network) as direct:
        assert direct.get("/v1/models").status_code == 200
    relayed = OHTTPTransport(
        fingerprints=[FINGERPRINT], gateway_url="http://relay/ohttp", transport=network
    )
    before = len(seen)
    with (
        httpx.Client(base_url="http://server", transport=relayed) as client,
        pytest.raises(OHTTPError, match="relay"),
    ):
        client.get("/v1/models")
    assert len(seen) == before
    with _client(network) as client, pytest.raises(OHTTPError, match="model"):
        client.post("/v1/chat/completions", json={"messages": []})


HYBRID = ohttp.GatewayKey.generate(4, kem_id=hpke.KEM_MLKEM768_X25519)


def _published(*configs: ohttp.KeyConfig) -> Callable[[httpx.Request], httpx.Response]:
    body = ohttp.encode_key_configs(configs)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/ohttp-gateway":
            return httpx.Response(
                200, content=body, headers={"content-type": ohttp.KEYS_MEDIA_TYPE}
            )
        return httpx.Response(
            400, json=KEY_PROBLEM, headers={"content-type": "application/problem+json"}
        )

    return handler


@pytest.mark.parametrize("order", ["hybrid first", "classical first"])
def test_auto_takes_the_hybrid_wherever_it_is_published(order: str) -> None:
    configs = [HYBRID.config(), KEY.config()]
    if order == "classical first":
        configs.reverse()
    pins = [HYBRID.config().fingerprint(), FINGERPRINT]
    transport = OHTTPTransport(
        fingerprints=pins, transport=httpx.MockTransport(_published(*configs))
    )
    assert transport.suite("http://server") is None
    described = transport.fetch_keys("http://server/v1")
    assert described == "mlkem768-x25519 (post-quantum hybrid), hkdf-sha256, aes-128-gcm"
    classical = OHTTPTransport(
        fingerprints=pins, kem="x25519", transport=httpx.MockTransport(_published(*configs))
    )
    assert classical.fetch_keys("http://server").startswith("x25519 (classical)")


def test_a_client_that_insists_on_the_hybrid_refuses_a_classical_server() -> None:
    transport = OHTTPTransport(
        fingerprints=[FINGERPRINT],
        kem="mlkem768-x25519",
        transport=httpx.MockTransport(_published(KEY.config())),
    )
    with pytest.raises(OHTTPKeyError, match="accepts \\(mlkem768-x25519\\)"):
        transport.fetch_keys("http://server")
    with pytest.raises(ValueError, match="kem must be"):
        OHTTPTransport(fingerprints=[FINGERPRINT], kem="kyber")


def test_trust_on_first_use_pins_the_hybrid_and_never_an_unusable_key(tmp_path: Path) -> None:
    pins = tmp_path / "pins.json"
    network = httpx.MockTransport(_published(KEY.config(), HYBRID.config()))
    OHTTPTransport(pin_file=pins, transport=network).fetch_keys("http://server")
    assert json.loads(pins.read_text()) == {"http://server": [HYBRID.config().fingerprint()]}
    # An ML-KEM key that fails FIPS 203's check (coefficients >= q) is never chosen, and so
    # never pinned: with nothing else on offer the client refuses the server.
    bad = ohttp.KeyConfig(
        9, hpke.KEM_MLKEM768_X25519, b"\xff" * 1184 + bytes(range(32)), KEY.suites
    )
    other = tmp_path / "other.json"
    with pytest.raises(OHTTPKeyError, match="no OHTTP key"):
        OHTTPTransport(pin_file=other, transport=httpx.MockTransport(_published(bad))).fetch_keys(
            "http://server"
        )
    assert not other.exists()
