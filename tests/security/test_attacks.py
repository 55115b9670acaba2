"""Attacks a network client or a tenant could try: each must fail and leak nothing."""

from __future__ import annotations

import secrets
import socket

import httpx
import pytest

from bastion_testing import BastionServer, cli_json

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "header",
    [
        "Bearer bsk_' OR '1'='1_" + "a" * 52,
        "Bearer bsk_0123456789abcdef_" + "a" * 52 + "' --",
        "Bearer bsk_%00_%00",
        "Bearer " + "bsk_" + "a" * 5000,
        "Bearer \u00e9\u00e9",
        "bearer",
        "Token abc",
    ],
)
def test_forged_and_injected_credentials_are_refused(server: BastionServer, header: str) -> None:
    response = httpx.post(
        server.url + "/v1/chat/completions",
        json=CHAT,
        headers=[(b"authorization", header.encode("utf-8"))],
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_guessing_a_secret_for_a_real_key_id_fails(server: BastionServer, tenant: str) -> None:
    real = cli_json(server.home, "keys", "create", "--tenant", tenant)
    public_id = real["key"].split("_")[1]
    for _ in range(20):
        guess = f"bsk_{public_id}_{secrets.token_hex(26)[:52]}"
        response = httpx.post(
            server.url + "/v1/chat/completions",
            json=CHAT,
            headers={"authorization": f"Bearer {guess}"},
        )
        assert response.status_code == 401
    # The failed guesses did not lock out or alter the real key.
    with server.client(real["key"]) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert real["key"].split("_")[-1] not in server.logs()


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/..%2F..%2Fetc%2Fpasswd/infer",
        "/v2/models/%2e%2e/infer",
        "/v1/models/../../admin.key",
        "/admin/v1/models/..%2Fadmin.key",
    ],
)
def test_path_tricks_reach_no_file(server: BastionServer, path: str) -> None:
    with server.client() as client:
        response = client.request("POST" if path.endswith("infer") else "GET", path, json={})
    assert response.status_code in (400, 404, 405)
    assert server.admin_key not in response.text
    assert "root:" not in response.text


def test_a_tenants_key_cannot_read_or_manage_another_tenant(server: BastionServer) -> None:
    with server.client() as admin:
        for name in ("victim", "attacker"):
            admin.post("/admin/v1/tenants", json={"name": name})
        victim_key = admin.post("/admin/v1/keys", json={"tenant": "victim"}).json()
        attacker = admin.post(
            "/admin/v1/keys", json={"tenant": "attacker", "role": "tenant-admin"}
        ).json()["key"]
    with server.client(attacker) as client:
        # Another tenant's tenant and keys answer as ones that do not exist: a 404.
        assert client.get("/admin/v1/keys", params={"tenant": "victim"}).status_code == 404
        assert client.post(f"/admin/v1/keys/{victim_key['id']}/revoke").status_code == 404
        assert client.post(f"/admin/v1/keys/{victim_key['id']}/rotate").status_code == 404
        assert client.post("/admin/v1/tenants/victim/disable").status_code == 403
        listed = client.get("/admin/v1/keys").json()["data"]
        assert all(k["tenant"] == "attacker" for k in listed)
    with server.client(victim_key["key"]) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_malformed_http_does_not_kill_the_server(server: BastionServer) -> None:
    for raw in (
        b"GARBAGE\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(raw)
            try:
                answer = sock.recv(200)
            except (TimeoutError, ConnectionResetError):
                answer = b""
            assert not answer.startswith(b"HTTP/1.1 5")
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_no_debug_or_docs_routes_are_exposed(server: BastionServer) -> None:
    for path in ("/docs", "/redoc", "/debug", "/admin", "/v1/admin", "/.env", "/openapi.json"):
        response = httpx.get(server.url + path)
        assert response.status_code in (401, 404), path
