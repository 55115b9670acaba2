"""TLS on the gateway, the admin API on a listener of its own, mutual TLS, security
headers and CORS, against real servers on loopback.

Two servers: one over TLS with the home's development certificate (`bastion init
--self-signed`), its admin listener requiring client certificates from a CA made here, and
one origin allowed cross-origin; one over plain HTTP, its admin listener without TLS, no
CORS configured.
"""

from __future__ import annotations

import select
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion_testing import BastionServer, add_echo_model, cli_json, run_cli

ORIGIN = "https://app.example"
# The limits of the server whose connections never finish their handshake.
CAP = 5
HEADER_TIMEOUT_S = 3
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
HSTS = "strict-transport-security"
# A WebSocket handshake's request headers (RFC 6455's example key).
WEBSOCKET = {
    "connection": "Upgrade",
    "upgrade": "websocket",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    "sec-websocket-version": "13",
}


# ---------------------------------------------------------------- certificates


@dataclass
class Pki:
    """The admin listener's client CA, a client certificate it issued, and one issued by
    another CA."""

    ca: Path
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _client(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], name: str, folder: Path
) -> tuple[Path, Path]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    admins, strangers = _ca("Bastion admins"), _ca("Someone else")
    ca = folder / "admins-ca.pem"
    ca.write_bytes(admins[0].public_bytes(serialization.Encoding.PEM))
    return Pki(ca, _client(admins, "operator", folder), _client(strangers, "stranger", folder))


# ---------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("tls") / "home"
    described = cli_json(home, "init", "--no-demo-models", "--self-signed")
    assert Path(described["tls_cert"]) == home / "tls" / "cert.pem"
    add_echo_model(home)
    server = BastionServer(
        home,
        "--self-signed",
        "--admin-client-ca",
        str(pki.ca),
        env={"BASTION_CORS_ORIGINS": ORIGIN},
        tls_ca=home / "tls" / "cert.pem",
        admin_listen=True,
        client_cert=pki.client,
    )
    try:
        server.wait_ready(["echo"], timeout=120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("plain") / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    server = BastionServer(home, admin_listen=True)
    try:
        server.wait_ready(["echo"], timeout=120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def limited_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("limited") / "home"
    run_cli(home, "init", "--no-demo-models", "--self-signed")
    server = BastionServer(
        home,
        "--self-signed",
        env={
            "BASTION_MAX_CONNECTIONS": str(CAP),
            "BASTION_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        },
        tls_ca=home / "tls" / "cert.pem",
    )
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["tls", "plain"])
def either(request: pytest.FixtureRequest) -> BastionServer:
    server: BastionServer = request.getfixturevalue(f"{request.param}_server")
    return server


def _consumer_key(server: BastionServer) -> str:
    cli_json(server.home, "tenants", "create", "tls-tests")
    key: str = cli_json(server.home, "keys", "create", "--tenant", "tls-tests")["key"]
    return key


@pytest.fixture(scope="module")
def tls_key(tls_server: BastionServer) -> str:
    return _consumer_key(tls_server)


@pytest.fixture(scope="module")
def plain_key(plain_server: BastionServer) -> str:
    return _consumer_key(plain_server)


def _address(url: str) -> tuple[str, int]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def _handshake(
    server: BastionServer,
    url: str,
    context: ssl.SSLContext,
    request: bytes = b"GET /healthz HTTP/1.1\r\nhost: bastion\r\nconnection: close\r\n\r\n",
) -> bytes:
    """Connect to `url` with `context`, send `request`, and return what comes back."""
    with (
        socket.create_connection(_address(url), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(request)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return answer


def _refused(server: BastionServer, url: str, context: ssl.SSLContext) -> bool:
    """Whether the connection ends without an HTTP answer: TLS 1.2 fails in the handshake;
    with TLS 1.3 the client's handshake completes before the server has checked its
    certificate, and the server then closes the connection."""
    try:
        return _handshake(server, url, context) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def _client_context(
    server: BastionServer, *, cert: tuple[Path, Path] | None = None
) -> ssl.SSLContext:
    assert server.tls_ca is not None
    context = ssl.create_default_context(cafile=str(server.tls_ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


# ---------------------------------------------------------------- TLS


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_before_1_2_is_refused(tls_server: BastionServer, version: str) -> None:
    context = _client_context(tls_server)
    # A client able to speak the old version (OpenSSL's defaults would not even offer it).
    context.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = getattr(ssl.TLSVersion, version)
        context.minimum_version = context.maximum_version = old
    with pytest.raises(ssl.SSLError):
        _handshake(tls_server, tls_server.url, context)
    # The same client, allowed TLS 1.2, gets through: the version was the reason.
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert _handshake(tls_server, tls_server.url, context).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_tls_1_2_and_1_3_are_served(tls_server: BastionServer, version: str) -> None:
    context = _client_context(tls_server)
    context.minimum_version = context.maximum_version = getattr(ssl.TLSVersion, version)
    with (
        socket.create_connection(_address(tls_server.url), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == version.replace("_", ".")
        assert tls.compression() is None


@pytest.mark.parametrize(
    ("cipher", "served"),
    [
        ("ECDHE-ECDSA-AES128-GCM-SHA256", True),
        ("ECDHE-ECDSA-CHACHA20-POLY1305", True),
        ("ECDHE-ECDSA-AES128-SHA", False),  # CBC
        ("ECDHE-ECDSA-AES256-SHA384", False),  # CBC
    ],
)
def test_tls_1_2_offers_only_aead_ciphers(
    tls_server: BastionServer, cipher: str, served: bool
) -> None:
    context = _client_context(tls_server)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(f"{cipher}:@SECLEVEL=0")
    if served:
        assert _handshake(tls_server, tls_server.url, context).startswith(b"HTTP/1.1 200")
    else:
        with pytest.raises(ssl.SSLError):
            _handshake(tls_server, tls_server.url, context)


def test_a_client_that_does_not_trust_the_certificate_is_refused(
    tls_server: BastionServer,
) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(tls_server.url + "/healthz", timeout=10)


def test_plain_http_to_the_tls_listener_gets_no_answer(tls_server: BastionServer) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_server.url.replace("https:", "http:") + "/healthz", timeout=10)


def test_the_openai_sdk_works_over_https_with_the_dev_certificate(
    tls_server: BastionServer, tls_key: str
) -> None:
    with httpx.Client(verify=tls_server.verify(), timeout=60) as http:
        client = openai.OpenAI(base_url=tls_server.url + "/v1", api_key=tls_key, http_client=http)
        answer = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "over TLS"}]
        )
        assert "over TLS" in (answer.choices[0].message.content or "")
        streamed = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "streamed"}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        assert "streamed" in text


# ---------------------------------------------------------------- security headers


def _check_headers(response: httpx.Response, tls: bool) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get_list(name) == [value], (response.url, name)
    if tls:
        assert response.headers[HSTS] == "max-age=63072000"
    else:
        assert HSTS not in response.headers


def test_security_headers_on_every_answer(
    either: BastionServer, request: pytest.FixtureRequest
) -> None:
    tls = either.tls_ca is not None
    key = request.getfixturevalue("tls_key" if tls else "plain_key")
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    with either.client(key) as client:
        answers = [
            # The fast path: an answer, and a refusal before the model.
            client.post("/v1/chat/completions", json=chat),
            client.post("/v1/chat/completions", json=chat, headers={"authorization": "Bearer x"}),
            client.post("/v1/chat/completions", content=b"{", headers={"content-type": "text/x"}),
            # Starlette's routes: an answer, and errors.
            client.get("/healthz"),
            client.get("/v1/models"),
            client.get("/no/such/route"),
            client.delete("/v1/chat/completions"),
            # A WebSocket upgrade: Bastion serves none, so it is answered as plain HTTP
            # (uvicorn's WebSocket protocol answered it, without the headers).
            client.get("/healthz", headers=WEBSOCKET),
        ]
    with either.admin_client() as admin:
        answers += [
            admin.get("/admin/v1/tenants"),
            admin.get("/admin/v1/nothing"),
            admin.get("/admin/v1/tenants", headers=WEBSOCKET),
        ]
    expected = [200, 401, 415, 200, 200, 404, 405, 200, 200, 404, 200]
    assert [a.status_code for a in answers] == expected
    for answer in answers:
        _check_headers(answer, tls)


def test_security_headers_on_the_servers_own_refusal(plain_server: BastionServer) -> None:
    # A request uvicorn refuses itself, before the app sees it.
    with socket.create_connection(_address(plain_server.url), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n")
        head = sock.recv(65536).split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith("http/1.1 400")
    assert "x-content-type-options: nosniff" in head
    assert "referrer-policy: no-referrer" in head


# ---------------------------------------------------------------- split listeners


def test_the_public_listener_refuses_admin_routes(either: BastionServer) -> None:
    assert either.admin_url != either.url
    with either.client() as client:  # the admin key, on the public listener
        for method, path in [
            ("GET", "/admin/v1/tenants"),
            ("POST", "/admin/v1/tenants"),
            ("GET", "/admin/v1/models/echo"),
            ("DELETE", "/admin/v1/keys/anything"),
        ]:
            answer = client.request(method, path, json={"name": "x"})
            assert answer.status_code == 404, (method, path)
            assert answer.json()["error"]["code"] == "route_not_found"
            assert answer.json()["error"]["type"] == "not_found_error"


def test_the_public_listeners_openapi_document_names_no_admin_route(
    either: BastionServer,
) -> None:
    with either.client() as client:
        document = client.get("/openapi.json")
    assert document.status_code == 200
    assert "/v1/chat/completions" in document.json()["paths"]
    assert "/admin" not in document.text


def test_the_admin_listener_serves_the_admin_api_and_probes(either: BastionServer) -> None:
    with either.admin_client() as admin:
        tenants = admin.get("/admin/v1/tenants")
        assert tenants.status_code == 200
        assert "system" in [t["name"] for t in tenants.json()["data"]]
        assert admin.get("/admin/v1/models/echo").json()["state"] == "ready"
        assert admin.get("/healthz").status_code == 200
        assert admin.get("/readyz").json()["status"] == "ready"
        # Without the admin key, refused as on one listener.
        assert admin.get("/admin/v1/tenants", headers={"authorization": ""}).status_code == 401


def test_the_admin_listener_serves_no_inference_routes(either: BastionServer) -> None:
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    with either.admin_client() as admin:
        for answer in [
            admin.post("/v1/chat/completions", json=chat),
            admin.post("/v1/embeddings", json={"model": "echo", "input": "x"}),
            admin.post("/v2/models/echo/infer", json={"inputs": []}),
            admin.post("/v1/ohttp", content=b"x"),
            admin.get("/v1/models"),
            admin.get("/metrics"),
        ]:
            assert answer.status_code == 404, answer.url
            error = answer.json()["error"]
            if answer.url.path.startswith("/v2/"):
                assert error == "No such route."  # the Open Inference Protocol's shape
            else:
                assert error["code"] == "route_not_found"


def test_the_public_listener_keeps_inference_and_metrics(
    plain_server: BastionServer, plain_key: str
) -> None:
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    with plain_server.client(plain_key) as client:
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
    with plain_server.client() as admin:
        assert "bastion_requests_total" in admin.get("/metrics").text


# ---------------------------------------------------------------- TLS handshakes


def _still_open(sockets: list[socket.socket], within_s: float) -> list[socket.socket]:
    """Those of `sockets` (which send nothing) the server has not closed within
    `within_s`."""
    deadline = time.monotonic() + within_s
    left = list(sockets)
    while left and (wait := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select(left, [], [], wait)
        for sock in readable:
            try:
                closed = sock.recv(65536) == b""
            except OSError:
                closed = True
            if closed:
                left.remove(sock)
    return left


def test_connections_that_never_handshake_hold_no_place_for_long(
    limited_tls_server: BastionServer,
) -> None:
    # The finding: the cap and the header clock started after the TLS handshake, and the
    # handshake had 60 s: 50 connections that sent nothing stayed open, counted toward
    # nothing, and other clients were still served.
    server = limited_tls_server
    started = time.monotonic()
    silent = [socket.create_connection(_address(server.url), timeout=10) for _ in range(50)]
    try:
        # Those beyond the cap are closed at their accept, before any handshake.
        held = _still_open(silent, within_s=1)
        assert 0 < len(held) <= CAP
        # The others hold their places from their accept: a client beyond them is refused.
        assert _refused(server, server.url, _client_context(server))
        # They are closed once the handshake's time, min(10 s, the header timeout), is up.
        assert _still_open(held, within_s=HEADER_TIMEOUT_S + 1) == []
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 2
    finally:
        for sock in silent:
            sock.close()
    # Their places are free again.
    with httpx.Client(verify=server.verify(), timeout=10) as client:
        assert client.get(server.url + "/healthz").status_code == 200


def test_a_failed_handshake_frees_its_place_at_once(limited_tls_server: BastionServer) -> None:
    server = limited_tls_server
    for _ in range(CAP * 4):
        with socket.create_connection(_address(server.url), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: bastion\r\n\r\n")  # no TLS
            assert _still_open([sock], within_s=2) == []
    with httpx.Client(verify=server.verify(), timeout=10) as client:
        assert client.get(server.url + "/healthz").status_code == 200


# ---------------------------------------------------------------- mutual TLS


def test_mtls_refuses_a_client_without_a_certificate(tls_server: BastionServer) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = _client_context(tls_server)
        context.maximum_version = version
        assert _refused(tls_server, tls_server.admin_url, context), version
    with (
        httpx.Client(verify=tls_server.verify(), timeout=10) as client,
        pytest.raises(httpx.HTTPError),
    ):
        client.get(tls_server.admin_url + "/healthz")


def test_mtls_refuses_a_certificate_from_another_ca(tls_server: BastionServer, pki: Pki) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = _client_context(tls_server, cert=pki.stranger)
        context.maximum_version = version
        assert _refused(tls_server, tls_server.admin_url, context), version


def test_mtls_accepts_a_certificate_from_the_ca(tls_server: BastionServer, pki: Pki) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = _client_context(tls_server, cert=pki.client)
        context.maximum_version = version
        assert _handshake(tls_server, tls_server.admin_url, context).startswith(b"HTTP/1.1 200")


def test_the_public_listener_asks_no_client_certificate(tls_server: BastionServer) -> None:
    assert _handshake(tls_server, tls_server.url, _client_context(tls_server)).startswith(
        b"HTTP/1.1 200"
    )


# ---------------------------------------------------------------- CORS


def _cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def test_no_cors_headers_unless_configured(plain_server: BastionServer, plain_key: str) -> None:
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    with plain_server.client(plain_key) as client:
        preflight = client.options(
            "/v1/chat/completions",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        answer = client.post("/v1/chat/completions", json=chat, headers={"origin": ORIGIN})
    assert preflight.status_code == 405
    assert answer.status_code == 200
    for response in (preflight, answer):
        assert not _cors_headers(response)
        assert "origin" not in response.headers.get("vary", "").lower()


def test_cors_preflight_only_for_listed_origins(tls_server: BastionServer) -> None:
    asked = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-stainless-lang",
    }
    with tls_server.client() as client:
        listed = client.options("/v1/chat/completions", headers={"origin": ORIGIN, **asked})
        other = client.options(
            "/v1/chat/completions", headers={"origin": "https://evil.example", **asked}
        )
        bad_method = client.options(
            "/v1/chat/completions",
            headers={"origin": ORIGIN, "access-control-request-method": "DELETE"},
        )
        oip = client.options(
            "/v2/models/echo/infer",
            headers={"origin": ORIGIN, "access-control-request-method": "POST"},
        )
    assert listed.status_code == 204
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in listed.headers["access-control-allow-methods"]
    assert "authorization" in listed.headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in listed.headers
    assert "Origin" in listed.headers["vary"]
    assert oip.status_code == 204
    for refused in (other, bad_method):
        assert refused.status_code == 403
        assert "access-control-allow-origin" not in refused.headers
        assert refused.json()["error"]["code"] == "cors_refused"


def test_cors_answers_name_only_listed_origins(tls_server: BastionServer, tls_key: str) -> None:
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    with tls_server.client(tls_key) as client:
        listed = client.post("/v1/chat/completions", json=chat, headers={"origin": ORIGIN})
        other = client.post(
            "/v1/chat/completions", json=chat, headers={"origin": "https://evil.example"}
        )
        refused = client.post(
            "/v1/chat/completions",
            json=chat,
            headers={"origin": ORIGIN, "authorization": "Bearer bsk_wrong"},
        )
        health = client.get("/healthz", headers={"origin": ORIGIN})
        metrics = client.get("/metrics", headers={"origin": ORIGIN})
    assert listed.status_code == 200
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-ratelimit-remaining-requests" in listed.headers["access-control-expose-headers"]
    assert "Origin" in listed.headers["vary"]
    # An error answer names the origin too, so that the page can read why.
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers
    assert "Origin" in other.headers["vary"]
    # Routes outside the inference API get no CORS headers at all.
    for response in (health, metrics):
        assert not _cors_headers(response)


def test_the_admin_listener_never_answers_cross_origin(tls_server: BastionServer) -> None:
    with tls_server.admin_client() as admin:
        answer = admin.get("/admin/v1/tenants", headers={"origin": ORIGIN})
        preflight = admin.options(
            "/admin/v1/tenants",
            headers={"origin": ORIGIN, "access-control-request-method": "GET"},
        )
    assert answer.status_code == 200
    assert not _cors_headers(answer)
    assert not _cors_headers(preflight)


# ---------------------------------------------------------------- configuration, stop


def test_serve_refuses_half_a_tls_configuration(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    proc = run_cli(tmp_path / "home", "serve", "--tls-cert", str(cert), check=False)
    assert proc.returncode != 0
    assert "both a certificate and its key" in proc.stderr
    assert not (tmp_path / "home").exists()


def test_serve_refuses_a_key_every_user_can_read(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models", "--self-signed")
    key = home / "tls" / "key.pem"
    key.chmod(0o644)
    proc = run_cli(
        home,
        "serve",
        "--tls-cert",
        str(home / "tls" / "cert.pem"),
        "--tls-key",
        str(key),
        check=False,
    )
    assert proc.returncode != 0
    assert "readable or writable by every user" in proc.stderr


def test_sigterm_stops_both_listeners_and_the_control_plane_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    # A home with a development certificate is still served over plain HTTP unless asked.
    run_cli(home, "init", "--no-demo-models", "--self-signed")
    server = BastionServer(home, admin_listen=True)
    try:
        server.wait_ready(timeout=120)
        assert server.url.startswith("http://")
        with server.admin_client() as admin:
            assert admin.get("/readyz").status_code == 200
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == -signal.SIGTERM
    for url in (server.url, server.admin_url):
        with pytest.raises(OSError):
            socket.create_connection(_address(url), timeout=2).close()
    logs = server.logs()
    assert logs.count("Waiting for application startup") == 1
    assert logs.count("Application shutdown complete") == 1
    assert logs.count('"msg":"server.stopped"') == 1


def test_init_self_signed_writes_a_development_certificate(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = run_cli(home, "init", "--no-demo-models", "--self-signed")
    assert "bastion serve --self-signed" in proc.stdout
    cert = x509.load_pem_x509_certificate((home / "tls" / "cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=89) < lifetime < timedelta(days=91)
    assert (home / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    # A second run keeps it.
    before = (home / "tls" / "cert.pem").read_bytes()
    run_cli(home, "init", "--self-signed")
    assert (home / "tls" / "cert.pem").read_bytes() == before
