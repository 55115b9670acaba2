"""How the gateway listens: the TLS, admin-listener and CORS settings and their checks,
the SSL context, the development certificate, the listeners' plan and routes, the security
headers and the CORS layer (in process; tests/e2e/test_tls_listeners.py has real servers)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from bastion.api.app import routes_of
from bastion.api.headers import CrossOrigin, security_headers
from bastion.api.serving import Serving
from bastion.config import Settings
from bastion.errors import ConfigurationError
from bastion.listeners import Listener, plan, warn_exposure
from bastion.tls import (
    check_key_file,
    dev_certificate_paths,
    ensure_dev_certificate,
    server_context,
)

# ---------------------------------------------------------------- settings


def test_nothing_is_configured_by_default() -> None:
    listening = Settings().listeners()
    assert listening.tls is None
    assert listening.admin is None
    assert listening.admin_client_ca is None
    assert listening.cors_origins == ()


def test_the_environment_sets_them() -> None:
    settings = Settings.load(
        {
            "BASTION_TLS_CERT": "/etc/bastion/cert.pem",
            "BASTION_TLS_KEY": "/etc/bastion/key.pem",
            "BASTION_ADMIN_LISTEN": "127.0.0.1:9443",
            "BASTION_ADMIN_TLS_CLIENT_CA": "/etc/bastion/admins.pem",
            "BASTION_CORS_ORIGINS": "https://app.example, http://localhost:3000",
        }
    )
    listening = settings.listeners()
    assert listening.tls == (Path("/etc/bastion/cert.pem"), Path("/etc/bastion/key.pem"))
    assert listening.admin == ("127.0.0.1", 9443)
    assert listening.admin_client_ca == Path("/etc/bastion/admins.pem")
    assert listening.cors_origins == ("https://app.example", "http://localhost:3000")


@pytest.mark.parametrize("given", [{"tls_cert": "c.pem"}, {"tls_key": "k.pem"}])
def test_tls_needs_both_files(given: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="both a certificate and its key"):
        Settings(**given).listeners()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("9443", ("127.0.0.1", 9443)),
        ("127.0.0.1:9443", ("127.0.0.1", 9443)),
        ("localhost:1", ("localhost", 1)),
        ("0.0.0.0:9443", ("0.0.0.0", 9443)),
        ("[::1]:9443", ("::1", 9443)),
        ("admin.internal:65535", ("admin.internal", 65535)),
    ],
)
def test_admin_listen_is_host_and_port(text: str, address: tuple[str, int]) -> None:
    assert Settings(admin_listen=text).listeners().admin == address


@pytest.mark.parametrize(
    "text",
    ["", "x", ":9443", "host:", "host:0", "host:65536", "host:port", "::1:9443", "[::1]",
     "[127.0.0.1]:1", "[nope]:1", "a b:1", "-host:1", "host/x:1"],
)  # fmt: skip
def test_a_malformed_admin_listen_is_refused(text: str) -> None:
    settings = Settings(admin_listen=text)
    if not text:
        assert settings.listeners().admin is None  # empty: not set
        return
    with pytest.raises(ConfigurationError, match="BASTION_ADMIN_LISTEN"):
        settings.listeners()


def test_the_admin_listener_needs_an_address_of_its_own() -> None:
    with pytest.raises(ConfigurationError, match="address of its own"):
        Settings(port=8000, admin_listen="127.0.0.1:8000").listeners()


def test_a_client_ca_needs_the_admin_listener_and_tls() -> None:
    tls = {"tls_cert": "c.pem", "tls_key": "k.pem"}
    with pytest.raises(ConfigurationError, match="BASTION_ADMIN_LISTEN"):
        Settings(admin_tls_client_ca="ca.pem", **tls).listeners()
    with pytest.raises(ConfigurationError, match="need TLS"):
        Settings(admin_tls_client_ca="ca.pem", admin_listen="9443").listeners()
    listening = Settings(admin_tls_client_ca="ca.pem", admin_listen="9443", **tls).listeners()
    assert listening.admin_client_ca == Path("ca.pem")


def test_cors_origins_are_normalised_as_browsers_send_them() -> None:
    settings = Settings(
        cors_origins="HTTPS://App.Example:443, http://localhost:80,http://[::1]:8080, ,"
    )
    assert settings.listeners().cors_origins == (
        "https://app.example",
        "http://localhost",
        "http://[::1]:8080",
    )


@pytest.mark.parametrize(
    "origin",
    ["*", "https://*.example", "https://app.example/", "https://app.example/path", "app.example",
     "ftp://app.example", "null", "https://user@app.example", "https://app.example:x"],
)  # fmt: skip
def test_a_malformed_cors_origin_is_refused(origin: str) -> None:
    with pytest.raises(ConfigurationError, match="BASTION_CORS_ORIGINS"):
        Settings(cors_origins=f"https://fine.example,{origin}").listeners()


# ---------------------------------------------------------------- TLS files


@pytest.fixture()
def dev(tmp_path: Path) -> tuple[Path, Path]:
    made = ensure_dev_certificate(tmp_path)
    return made.cert, made.key


def test_the_server_context_allows_tls_1_2_and_aead_only(dev: tuple[Path, Path]) -> None:
    context = server_context(*dev)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    for option in (ssl.OP_NO_COMPRESSION, ssl.OP_NO_RENEGOTIATION, ssl.OP_NO_TICKET):
        assert context.options & option
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert cipher["aead"], cipher["name"]
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]


def test_a_client_ca_makes_client_certificates_required(dev: tuple[Path, Path]) -> None:
    context = server_context(*dev, client_ca=dev[0])
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_unusable_tls_files_are_configuration_errors(
    dev: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = dev
    with pytest.raises(ConfigurationError, match="Cannot read the TLS key"):
        server_context(cert, tmp_path / "missing.pem")
    with pytest.raises(ConfigurationError, match="Cannot use the TLS certificate"):
        server_context(tmp_path / "missing.pem", key)
    other = ensure_dev_certificate(tmp_path / "other")
    with pytest.raises(ConfigurationError, match="Cannot use the TLS certificate"):
        server_context(other.cert, key)  # not this key's certificate
    with pytest.raises(ConfigurationError, match="client CA"):
        server_context(cert, key, client_ca=tmp_path / "missing-ca.pem")


def test_an_encrypted_key_is_refused_without_a_prompt(
    dev: tuple[Path, Path], tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = dev
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    encrypted.chmod(0o600)
    with pytest.raises(ConfigurationError, match="encrypted"):
        server_context(cert, encrypted)


def test_a_key_every_user_can_read_is_refused(dev: tuple[Path, Path]) -> None:
    _, key = dev
    key.chmod(0o640)  # a group (as Debian's ssl-cert) may read it
    check_key_file(key)
    for mode in (0o644, 0o606, 0o602):
        key.chmod(mode)
        with pytest.raises(ConfigurationError, match="every user"):
            check_key_file(key)


def test_the_development_certificate(tmp_path: Path) -> None:
    made = ensure_dev_certificate(tmp_path)
    assert made.created
    assert (made.cert, made.key) == dev_certificate_paths(tmp_path)
    assert made.key.stat().st_mode & 0o777 == 0o600
    assert made.cert.parent.stat().st_mode & 0o777 == 0o700
    cert = x509.load_pem_x509_certificate(made.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    assert cert.not_valid_after_utc == made.not_after.replace(microsecond=0)
    # A client that trusts it (strict X.509 checks included) verifies it for these names,
    # and for no other.
    client = ssl.create_default_context(cafile=str(made.cert))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    server = server_context(made.cert, made.key)
    for name in ("localhost", "127.0.0.1", "::1"):
        _handshake_in_memory(server, client, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake_in_memory(server, client, "bastion.example")


def _handshake_in_memory(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = client.wrap_bio(to_client, to_server, server_hostname=name)
    theirs = server.wrap_bio(to_server, to_client, server_side=True)
    done = {ours: False, theirs: False}
    for _ in range(10):
        for end in (ours, theirs):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def test_the_development_certificate_is_kept_until_it_expires(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    first = ensure_dev_certificate(tmp_path, now=now - timedelta(days=80))
    kept = ensure_dev_certificate(tmp_path, now=now)
    assert not kept.created
    assert kept.cert.read_bytes() == first.cert.read_bytes()
    renewed = ensure_dev_certificate(tmp_path, now=now + timedelta(days=9, hours=12))
    assert renewed.created
    assert renewed.not_after > first.not_after


# ---------------------------------------------------------------- listeners and routes


def test_one_listener_serves_everything(dev: tuple[Path, Path]) -> None:
    (only,) = plan(Settings(port=8443, tls_cert=str(dev[0]), tls_key=str(dev[1])))
    assert only.serving is Serving.ALL
    assert only.url == "https://127.0.0.1:8443"
    assert only.tls is not None and only.tls.verify_mode == ssl.CERT_NONE


def test_a_split_puts_client_certificates_on_the_admin_listener_only(
    dev: tuple[Path, Path],
) -> None:
    public, admin = plan(
        Settings(
            tls_cert=str(dev[0]),
            tls_key=str(dev[1]),
            admin_listen="[::1]:9443",
            admin_tls_client_ca=str(dev[0]),
        )
    )
    assert (public.serving, admin.serving) == (Serving.PUBLIC, Serving.ADMIN)
    assert admin.url == "https://[::1]:9443"
    assert public.tls is not None and public.tls.verify_mode == ssl.CERT_NONE
    assert admin.tls is not None and admin.tls.verify_mode == ssl.CERT_REQUIRED
    assert admin.client_certificates and not public.client_certificates


def test_exposure_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "bastion.server")
    warn_exposure([Listener("127.0.0.1", 8000, Serving.PUBLIC), Listener("::1", 1, Serving.ADMIN)])
    assert not caplog.records
    warn_exposure(
        [Listener("0.0.0.0", 8000, Serving.PUBLIC), Listener("10.0.0.1", 1, Serving.ADMIN)]
    )
    messages = [r.getMessage() for r in caplog.records]
    assert any("non-loopback address" in m for m in messages)
    assert any("ADMIN listener" in m and "no client certificates" in m for m in messages)
    assert sum("TLS is off" in m for m in messages) == 2


def _paths(serving: Serving) -> set[str]:
    return {route.path for route in routes_of(serving) if isinstance(route, Route)}


def test_each_listener_serves_its_share_of_the_routes() -> None:
    every = _paths(Serving.ALL)
    public, admin = _paths(Serving.PUBLIC), _paths(Serving.ADMIN)
    assert public | admin == every
    assert not any(p.startswith(("/admin", "/console")) for p in public)
    assert admin == {"/healthz", "/readyz"} | {
        p for p in every if p.startswith(("/admin/", "/console"))
    }
    assert {"/console", "/console/sign-in", "/console/sso/callback"} <= admin
    assert {"/metrics", "/openapi.json", "/v1/chat/completions"} <= public


# ---------------------------------------------------------------- headers and CORS


def test_hsts_only_with_tls() -> None:
    plain, tls = dict(security_headers(tls=False)), dict(security_headers(tls=True))
    assert "strict-transport-security" not in plain
    assert tls.pop("strict-transport-security") == "max-age=63072000"
    assert tls == plain
    assert plain["x-content-type-options"] == "nosniff"
    # No default Cache-Control: it would override the OHTTP key configuration's own.
    assert "cache-control" not in plain


async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": b"{}"})


def _through(app: Any, method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    answer: dict[str, Any] = {"status": start["status"]}
    for name, value in start["headers"]:
        answer.setdefault(name.decode().lower(), []).append(value.decode())
    return answer


CORS = CrossOrigin(_answer, ("https://app.example",))
PREFLIGHT = {"origin": "https://app.example", "access-control-request-method": "POST"}


def test_cors_preflight_from_a_listed_origin() -> None:
    answer = _through(
        CORS,
        "OPTIONS",
        "/v1/embeddings",
        {**PREFLIGHT, "access-control-request-headers": "Authorization, X-Stainless-Os"},
    )
    assert answer["status"] == 204
    assert answer["access-control-allow-origin"] == ["https://app.example"]
    assert answer["access-control-allow-headers"] == ["Authorization, X-Stainless-Os"]
    assert "x-app" not in answer  # answered here, not by the app


@pytest.mark.parametrize(
    "headers",
    [
        {**PREFLIGHT, "origin": "https://other.example"},
        {**PREFLIGHT, "access-control-request-method": "PUT"},
        {**PREFLIGHT, "access-control-request-headers": "bad header\r\nx: y"},
    ],
)
def test_cors_preflights_refused(headers: dict[str, str]) -> None:
    answer = _through(CORS, "OPTIONS", "/v1/chat/completions", headers)
    assert answer["status"] == 403
    assert "access-control-allow-origin" not in answer
    assert "access-control-allow-headers" not in answer


def test_cors_answers() -> None:
    listed = _through(CORS, "POST", "/v2/models/m/infer", {"origin": "https://app.example"})
    assert listed["access-control-allow-origin"] == ["https://app.example"]
    assert listed["vary"] == ["Origin"]
    assert listed["x-app"] == ["1"]
    other = _through(CORS, "POST", "/v1/completions", {"origin": "https://app.example.evil"})
    assert "access-control-allow-origin" not in other
    assert other["vary"] == ["Origin"]
    for path in ("/admin/v1/keys", "/healthz", "/metrics", "/v1"):
        untouched = _through(CORS, "GET", path, {"origin": "https://app.example"})
        assert set(untouched) == {"status", "x-app"}, path
    preflight_elsewhere = _through(CORS, "OPTIONS", "/admin/v1/keys", PREFLIGHT)
    assert set(preflight_elsewhere) == {"status", "x-app"}
