"""The audit trail end to end: a real server's events land in the log, the CLI verifies,
proves and exports it, and tampering with the database is caught.

A server of its own (the echo model only), so that stopping it and editing its database
disturb no other test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion_testing import BastionServer, add_echo_model, run_cli


@pytest.fixture(scope="module")
def stopped_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home whose server ran a scripted session and was stopped."""
    home = tmp_path_factory.mktemp("audit") / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    server = BastionServer(home, env={"BASTION_AUDIT_CHECKPOINT_INTERVAL_S": "0.5"})
    try:
        server.wait_ready(["echo"])
        _scripted_session(server)
    finally:
        server.stop()
    yield home


def _scripted_session(server: BastionServer) -> None:
    with server.admin_client() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": "acme"}).status_code == 201
        assert admin.post("/admin/v1/tenants", json={"name": "other"}).status_code == 201
        consumer = admin.post("/admin/v1/keys", json={"tenant": "acme"}).json()
        tadmin = admin.post(
            "/admin/v1/keys", json={"tenant": "acme", "role": "tenant-admin"}
        ).json()
        rotated = admin.post(f"/admin/v1/keys/{consumer['id']}/rotate").json()
        assert admin.post(f"/admin/v1/keys/{rotated['id']}/revoke").status_code == 200
        assert (
            admin.patch(
                "/admin/v1/quotas/tenants/acme", json={"requests_per_minute": 1000}
            ).status_code
            == 200
        )
        assert admin.get("/admin/v1/keys").status_code == 200
        assert admin.get("/admin/v1/usage").status_code == 200
        assert admin.post("/admin/v1/models/echo/unload").status_code == 202
        server.wait_model("echo", "unloaded")
        assert admin.post("/admin/v1/models/echo/load").status_code == 202
        server.wait_model("echo", "ready")
    # A failed sign-in, and a consumer key on the admin API.
    assert (
        httpx.get(server.url + "/v1/models", headers={"authorization": "Bearer nope"}).status_code
        == 401
    )
    with server.client(tadmin["key"]) as client:
        assert client.post("/admin/v1/tenants", json={"name": "evil"}).status_code == 403
        # A tenant's admin reads only its tenant's records.
        records = client.get("/admin/v1/audit/records", params={"limit": 1000}).json()["data"]
        assert records and {r["tenant"] for r in records} == {"acme"}
        assert client.get("/admin/v1/audit/records", params={"tenant": "other"}).status_code == 404
        assert client.get("/admin/v1/audit/checkpoint").status_code == 403
    # A worker crash and its restart.
    with server.client() as client:
        crashed = client.post(
            "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "__crash__"}]},
        )
        assert crashed.status_code == 503
    server.wait_model("echo", "ready")
    with server.admin_client() as admin:
        witness = admin.get("/admin/v1/audit/checkpoint")
        assert witness.status_code == 200 and witness.text.startswith("bastion/audit/")
        verified = admin.post("/admin/v1/audit/verify").json()
        assert verified["ok"] is True, verified
        # Bad input is a 400 in the API's error format, never a 500.
        for path, params in (
            ("/admin/v1/audit/proof", {"index": "0", "size": str(10**9)}),
            ("/admin/v1/audit/proof", {"index": "x"}),
            ("/admin/v1/audit/records", {"after": str(2**70)}),
            ("/admin/v1/audit/records", {"tenant": "\x00bad"}),
            ("/admin/v1/audit/checkpoints", {"limit": "-1"}),
        ):
            bad = admin.get(path, params=params)
            assert bad.status_code == 400, (path, params, bad.text)
            assert bad.json()["error"]["type"] == "invalid_request_error"
    run_cli(server.home, "ohttp", "rotate")


def _actions(home: Path) -> list[dict[str, object]]:
    out = run_cli(home, "audit", "export").stdout
    return [json.loads(line) for line in out.splitlines()]


def test_every_kind_of_event_lands_in_the_log(stopped_home: Path) -> None:
    entries = _actions(stopped_home)
    kinds = {e["action"] for e in entries}
    expected = {
        "home.initialised",
        "tenant.created",
        "key.created",
        "key.rotated",
        "key.revoked",
        "quota.changed",
        "model.registered",
        "model.unload_requested",
        "model.unloaded",
        "model.load_requested",
        "model.loaded",
        "worker.crashed",
        "worker.restarted",
        "auth.failed",
        "auth.denied",
        "admin.read",
        "server.started",
        "server.stopped",
        "ohttp_key.created",
        "ohttp_key.rotated",
    }
    assert expected <= kinds, expected - kinds
    assert [e["seq"] for e in entries] == list(range(len(entries)))
    reads = [e for e in entries if e["action"] == "admin.read"]
    assert {r["target"] for r in reads} >= {"keys", "usage", "audit"}
    # No secret: the keys' tokens were in the session's answers, never in the log.
    text = json.dumps(entries)
    assert "bsk_" not in text


def test_the_cli_verifies_the_stopped_servers_log(stopped_home: Path) -> None:
    report = json.loads(run_cli(stopped_home, "audit", "verify", "--json").stdout)
    assert report["ok"] is True, report
    # The server signed a checkpoint as it stopped; the CLI's own change was signed too.
    assert report["unsigned_records"] == 0
    assert report["size"] == len(_actions(stopped_home))


def test_a_proof_from_the_cli_checks_by_rfc_9162(stopped_home: Path) -> None:
    proof = json.loads(run_cli(stopped_home, "audit", "proof", "--index", "3").stdout)
    leaf = hashlib.sha256(b"\x00" + proof["entry"].encode()).digest()
    fn, sn, r = 3, proof["size"] - 1, leaf
    for p in (base64.b64decode(x) for x in proof["proof"]):
        if fn % 2 == 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while fn % 2 == 0 and fn != 0:
                fn, sn = fn // 2, sn // 2
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn // 2, sn // 2
    assert sn == 0
    assert base64.b64encode(r).decode() == proof["root"]
    # ...and that root is the one the log signed.
    assert proof["checkpoint"].split("\n")[2] == proof["root"]


def test_exports_for_a_siem(stopped_home: Path) -> None:
    cef = run_cli(stopped_home, "audit", "export", "--format", "cef").stdout.splitlines()
    assert cef and all(line.startswith("CEF:0|Bastion|Bastion|") for line in cef)
    recent = run_cli(stopped_home, "audit", "export", "--since", "1h").stdout.splitlines()
    # Every export is itself recorded (an admin read): one more record than before.
    assert len(recent) == len(cef) + 1
    assert json.loads(recent[-1])["action"] == "admin.read"
    assert run_cli(stopped_home, "audit", "export", "--since", "2099-01-01").stdout == ""
    bad = run_cli(stopped_home, "audit", "export", "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "ISO 8601 date" in bad.stderr and "Traceback" not in bad.stderr


def test_tampering_with_the_database_is_caught_by_the_cli(
    stopped_home: Path, tmp_path: Path
) -> None:
    witness = tmp_path / "witness.note"
    witness.write_text(run_cli(stopped_home, "audit", "checkpoints", "--latest").stdout)
    database = sqlite3.connect(stopped_home / "bastion.db")
    try:
        with database:
            database.execute(
                "UPDATE audit_records SET entry = replace(entry, 'auth.denied', 'auth.allowed'),"
                " action = 'auth.allowed' WHERE action = 'auth.denied'"
            )
        failed = run_cli(stopped_home, "audit", "verify", check=False)
        assert failed.returncode == 1
        assert "no longer match" in failed.stdout
        # The attacker also drops the tail and the checkpoints after it: the witness's
        # copy of the latest checkpoint still shows the rollback.
        with database:
            database.execute("DELETE FROM audit_records WHERE seq >= 5")
            database.execute("DELETE FROM audit_checkpoints WHERE size > 5")
        rolled = run_cli(
            stopped_home, "audit", "verify", "--from-checkpoint", str(witness), check=False
        )
        assert rolled.returncode == 1 and "rolled back" in rolled.stdout
    finally:
        database.close()
