"""Tenants, keys and roles through the CLI and the admin API, seen by a running server."""

from __future__ import annotations

import os
import stat
import time

import httpx

from bastion_testing import BastionServer, cli_json, run_cli

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}


def _status_within(client: httpx.Client, path: str, want: int, seconds: float = 2.0) -> int:
    """Poll until the answer has status `want`, for at most `seconds` (the issue's bound)."""
    deadline = time.monotonic() + seconds
    status = -1
    while time.monotonic() < deadline:
        status = client.post(path, json=CHAT).status_code
        if status == want:
            return status
        time.sleep(0.1)
    return status


def test_home_files_are_private(server: BastionServer) -> None:
    for name in ("master.key", "admin.key"):
        mode = stat.S_IMODE(os.stat(server.home / name).st_mode)
        assert mode == 0o600, name
    assert stat.S_IMODE(os.stat(server.home).st_mode) == 0o700
    assert server.admin_key.startswith("bsk_")


def test_cli_key_works_then_revocation_reaches_the_server(server: BastionServer) -> None:
    cli_json(server.home, "tenants", "create", "revokers")
    created = cli_json(server.home, "keys", "create", "--tenant", "revokers")
    assert set(created) >= {"id", "key"}
    listed = cli_json(server.home, "keys", "list", "--tenant", "revokers")
    assert [k["id"] for k in listed] == [created["id"]]
    assert created["key"].split("_")[-1] not in str(listed)
    with server.client(created["key"]) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        run_cli(server.home, "keys", "revoke", created["id"])
        assert _status_within(client, "/v1/chat/completions", 401) == 401


def test_rotation_replaces_the_key(server: BastionServer) -> None:
    cli_json(server.home, "tenants", "create", "rotators")
    old = cli_json(server.home, "keys", "create", "--tenant", "rotators")
    new = cli_json(server.home, "keys", "rotate", old["id"])
    assert new["id"] != old["id"] and new["key"] != old["key"]
    with server.client(new["key"]) as client:
        assert _status_within(client, "/v1/chat/completions", 200) == 200
    with server.client(old["key"]) as client:
        assert _status_within(client, "/v1/chat/completions", 401) == 401


def test_disabled_tenant_keys_get_401(server: BastionServer) -> None:
    cli_json(server.home, "tenants", "create", "leavers")
    key = cli_json(server.home, "keys", "create", "--tenant", "leavers")["key"]
    with server.client(key) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        cli_json(server.home, "tenants", "disable", "leavers")
        assert _status_within(client, "/v1/chat/completions", 401) == 401


def test_expired_key_gets_401(server: BastionServer) -> None:
    cli_json(server.home, "tenants", "create", "expirers")
    key = cli_json(
        server.home,
        "keys",
        "create",
        "--tenant",
        "expirers",
        "--expires-at",
        "2001-01-01T00:00:00+00:00",
    )["key"]
    with server.client(key) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401


def test_scopes_roles_and_status_codes(server: BastionServer) -> None:
    with server.client() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": "scoped"}).status_code == 201
        made = admin.post(
            "/admin/v1/keys",
            json={"tenant": "scoped", "models": ["echo"], "actions": ["embeddings", "models"]},
        )
        assert made.status_code == 201
        key = made.json()["key"]
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        assert anon.post("/v1/chat/completions", json=CHAT).status_code == 401
        bad = anon.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Basic x"})
        assert bad.status_code == 401
        assert bad.json()["error"]["type"] == "authentication_error"
    with server.client(key) as scoped:
        # Allowed model, but not the chat action.
        denied = scoped.post("/v1/chat/completions", json=CHAT)
        assert denied.status_code == 403
        assert denied.json()["error"]["type"] == "permission_error"
        assert (
            scoped.post("/v1/embeddings", json={"model": "echo", "input": "x"}).status_code == 200
        )
        # A model outside the key's globs is forbidden whether or not it exists.
        assert (
            scoped.post("/v1/embeddings", json={"model": "minilm-l6", "input": "x"}).status_code
            == 403
        )
        # Consumers do not manage anything.
        assert scoped.get("/admin/v1/keys").status_code == 403
        assert [m["id"] for m in scoped.get("/v1/models").json()["data"]] == ["echo"]


def test_tenant_admin_manages_only_its_own_tenant(server: BastionServer) -> None:
    with server.client() as admin:
        for name in ("team-a", "team-b"):
            assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
        made = admin.post("/admin/v1/keys", json={"tenant": "team-a", "role": "tenant-admin"})
        ta_key = made.json()["key"]
        team_b_key = admin.post("/admin/v1/keys", json={"tenant": "team-b"}).json()["id"]
    with server.client(ta_key) as tenant_admin:
        own = tenant_admin.post("/admin/v1/keys", json={"tenant": "team-a"})
        assert own.status_code == 201
        # Another tenant, and its keys, answer exactly as ones that do not exist (404).
        other = tenant_admin.post("/admin/v1/keys", json={"tenant": "team-b"})
        missing = tenant_admin.post("/admin/v1/keys", json={"tenant": "team-zz"})
        assert other.status_code == missing.status_code == 404
        assert other.json() == missing.json()
        other_key = team_b_key
        for key_id in (other_key, "0123456789abcdef"):
            revoke = tenant_admin.post(f"/admin/v1/keys/{key_id}/revoke")
            rotate = tenant_admin.post(f"/admin/v1/keys/{key_id}/rotate")
            assert revoke.status_code == rotate.status_code == 404
            assert revoke.json()["error"]["message"] == "No API key has this id."
        listed_other = tenant_admin.get("/admin/v1/keys", params={"tenant": "team-b"})
        listed_missing = tenant_admin.get("/admin/v1/keys", params={"tenant": "team-zz"})
        assert listed_other.status_code == listed_missing.status_code == 404
        assert listed_other.json() == listed_missing.json()
        escalate = tenant_admin.post("/admin/v1/keys", json={"tenant": "team-a", "role": "admin"})
        assert escalate.status_code == 403
        listed = tenant_admin.get("/admin/v1/keys").json()["data"]
        assert {k["tenant"] for k in listed} == {"team-a"}
        assert tenant_admin.post("/admin/v1/tenants", json={"name": "mine"}).status_code == 403
        assert tenant_admin.post("/admin/v1/models/echo/unload").status_code == 403


def test_unknown_and_duplicate_tenants(server: BastionServer) -> None:
    with server.client() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": "dupe"}).status_code == 201
        assert admin.post("/admin/v1/tenants", json={"name": "dupe"}).status_code == 409
        assert admin.post("/admin/v1/tenants/nobody/disable").status_code == 404
        assert admin.post("/admin/v1/tenants", json={"name": "Bad Name!"}).status_code == 400
    failed = run_cli(server.home, "tenants", "disable", "nobody", check=False)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
