"""A real `bastion serve` on PostgreSQL refreshes as soon as the CLI commits a change: its
poll is set to 10 minutes here, so only the database's notification can explain a new key
working (and a revoked one failing) within seconds. It stops cleanly (the watcher
closed), and the password in BASTION_DATABASE_URL appears in none of its output."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx

from bastion_testing import BastionServer, run_cli
from services import PostgresServer

WAIT_S = 15.0  # generous: the notification arrives in milliseconds


def _status(server: BastionServer, key: str) -> int:
    response = httpx.get(
        server.url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10
    )
    return response.status_code


def _wait_status(server: BastionServer, key: str, expected: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while (status := _status(server, key)) != expected:
        assert time.monotonic() < deadline, f"still {status}, not {expected}"
        time.sleep(0.1)


def test_a_gateway_on_postgresql_sees_cli_changes_at_once(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    env = {
        "BASTION_DATABASE_URL": postgres.new_database(),
        "BASTION_REFRESH_INTERVAL_S": "600",
    }
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models", env=env)
    run_cli(home, "tenants", "create", "acme", env=env)
    server = BastionServer(home, "--no-demo-models", env=env)
    try:
        server.wait_ready(timeout=120)
        created = run_cli(home, "keys", "create", "--tenant", "acme", "--json", env=env)
        key = json.loads(created.stdout)
        _wait_status(server, key["key"], 200)
        run_cli(home, "keys", "revoke", key["id"], env=env)
        _wait_status(server, key["key"], 401)
    finally:
        # A clean shutdown ends with the signal raised again (bastion.listeners).
        assert server.stop() == -signal.SIGTERM
    logs = server.logs()
    assert "Traceback" not in logs
    assert postgres.password not in logs
