"""The `bastion` command: init, --json output, clear errors, and the chat client."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from bastion.models import demo
from bastion_testing import BASTION, BastionServer, clean_env, cli_json, run_cli


def test_init_is_idempotent_and_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = cli_json(home, "init", "--no-demo-models")
    assert first["created"] is True and first["admin_key"].startswith("bsk_")
    assert (home / "admin.key").read_text().strip() == first["admin_key"]
    second = cli_json(home, "init", "--no-demo-models")
    assert second["created"] is False and second["admin_key"] is None
    for name in ("master.key", "admin.key", "bastion.db"):
        assert stat.S_IMODE(os.stat(home / name).st_mode) & 0o077 == 0, name


def test_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    for args in (
        ("keys", "revoke", "0123456789abcdef"),
        ("tenants", "create", "Not Valid!"),
        ("keys", "create", "--tenant", "missing"),
        ("keys", "create", "--tenant", "system", "--role", "wizard"),
        ("models", "load", "missing"),
        ("models", "add", "x", "--runtime", "nope", "--path", str(home)),
        ("keys", "create", "--tenant", "system", "--expires-at", "tomorrow"),
    ):
        proc = run_cli(home, *args, check=False)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr and "error" in proc.stderr.lower(), args


def test_listing_commands_speak_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    cli_json(home, "tenants", "create", "acme")
    key = cli_json(home, "keys", "create", "--tenant", "acme", "--model", "digits")
    tenants = cli_json(home, "tenants", "list")
    keys = cli_json(home, "keys", "list", "--tenant", "acme")
    assert "acme" in {t["name"] for t in tenants}
    assert keys[0]["id"] == key["id"] and keys[0]["models"] == ["digits"]
    assert "key" not in keys[0]
    assert cli_json(home, "models", "list") == []


def test_chat_client_streams_from_the_server(server: BastionServer, consumer_key: str) -> None:
    proc = subprocess.run(
        [
            *BASTION,
            "chat",
            "--url",
            server.url,
            "--key",
            consumer_key,
            "--model",
            "echo",
            "--json",
            "--home",
            str(server.home),
        ],
        input="hello from the chat client\nsecond line\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["content"] for line in lines] == [
        "hello from the chat client",
        "second line",
    ]


def test_chat_client_reports_a_bad_key(server: BastionServer) -> None:
    proc = subprocess.run(
        [*BASTION, "chat", "--url", server.url, "--key", "bsk_bad_key", "--home", str(server.home)],
        input="hi\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert proc.returncode == 1
    assert "Invalid or missing API key" in proc.stderr


def test_a_relative_home_serves_the_demo_models(tmp_path: Path) -> None:
    # `make serve` runs with the default home, ./.bastion, relative to the checkout.
    srv = BastionServer(tmp_path / ".bastion", cwd=tmp_path)
    try:
        srv.wait_ready(["digits", "minilm-l6", "tiny-chat"], timeout=120)
        # The demo models went through the import path: served from signed, encrypted
        # bundles, with no plaintext weights left in the home.
        listed = {row["name"]: row for row in cli_json(srv.home, "models", "list")}
        for name in ("digits", "minilm-l6", "tiny-chat"):
            assert listed[name]["version"] == "1" and listed[name]["state"] == "ready"
            assert cli_json(srv.home, "models", "verify", name)["ok"] is True
        weights = (demo.tiny_chat_assets() / "model.safetensors").read_bytes()
        assert not [
            path
            for path in srv.home.rglob("*")
            if path.is_file() and weights[4096:8192] in path.read_bytes()
        ]
        with srv.client() as client:
            answer = client.post(
                "/v2/models/digits/infer",
                json={
                    "inputs": [
                        {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
                    ]
                },
            )
        assert answer.status_code == 200
    finally:
        srv.stop()


def test_chat_client_end_to_end_encrypted(
    server: BastionServer, consumer_key: str, tmp_path: Path
) -> None:
    pins = tmp_path / "pins.json"
    base = [*BASTION, "chat", "--url", server.url, "--key", consumer_key, "--model", "echo"]
    proc = subprocess.run(
        [*base, "--e2e", "--pin-file", str(pins), "--json", "--home", str(server.home)],
        input="a secret question\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["content"] for line in proc.stdout.splitlines()] == [
        "a secret question"
    ]
    # Trusted on first use: the pin is the key `bastion ohttp keys` lists.
    current = cli_json(server.home, "ohttp", "keys")[0]
    assert json.loads(pins.read_text()) == {server.url: [current["fingerprint"]]}
    # The post-quantum hybrid: ML-KEM-768's 1,184-byte public key and X25519's 32.
    assert current["state"] == "current" and current["kem"] == "mlkem768-x25519"
    assert len(bytes.fromhex(current["public_key"])) == 1216

    wrong = subprocess.run(
        [*base, "--e2e", "--fingerprint", "sha256:" + "ab" * 32, "--home", str(server.home)],
        input="hi\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert wrong.returncode == 1
    assert "pinned fingerprint" in wrong.stderr


def test_ohttp_rotate_refuses_a_bad_grace_or_kem(server: BastionServer) -> None:
    before = cli_json(server.home, "ohttp", "keys")
    proc = run_cli(server.home, "ohttp", "rotate", "--grace", "soon", check=False)
    assert proc.returncode == 2
    assert "duration" in proc.stderr
    proc = run_cli(server.home, "ohttp", "rotate", "--kem", "kyber512", check=False)
    assert proc.returncode == 2
    assert "unknown KEM 'kyber512'" in proc.stderr and "Traceback" not in proc.stderr
    # ML-KEM-768 alone is known but not offered by default (BASTION_OHTTP_KEMS).
    proc = run_cli(server.home, "ohttp", "rotate", "--kem", "mlkem768", check=False)
    assert proc.returncode != 0 and "does not offer the mlkem768 KEM" in proc.stderr
    assert cli_json(server.home, "ohttp", "keys") == before
