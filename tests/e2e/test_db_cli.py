"""`bastion db`: a SQLite home moved to PostgreSQL with the real CLI (docs/database.md).

A home is made and used with the CLI (tenants, keys rotated and revoked, quotas, OHTTP
keys, a model, the audit log they all write), copied with `bastion db copy --to URL`, and
read back through BASTION_DATABASE_URL: every listing is the same, the audit log verifies,
and the copy goes on where the home left off (ids, revision, audit records). A second copy
is refused unless forced; `db status` and `db migrate` report on the configured database.
No output ever holds the database's password."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from bastion.store.db import head_revision
from bastion_testing import add_echo_model, cli_json, run_cli
from services import PostgresServer

READS = (
    ("tenants", "list"),
    ("keys", "list"),
    ("quotas", "show"),
    ("ohttp", "keys", "--all"),
    ("models", "list"),
)


class Cli:
    """Runs `bastion` on one home, remembering every output (to look for the password)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.outputs: list[str] = []

    def run(
        self, *args: str, url: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {"BASTION_DATABASE_URL": url} if url is not None else None
        proc = run_cli(self.home, *args, env=env, check=check)
        self.outputs += [proc.stdout, proc.stderr]
        return proc

    def json(self, *args: str, url: str | None = None) -> Any:
        return json.loads(self.run(*args, "--json", url=url).stdout)


def test_a_sqlite_home_moves_to_postgresql(tmp_path: Path, postgres: PostgresServer) -> None:
    home = tmp_path / "home"
    cli = Cli(home)
    cli.run("init", "--no-demo-models")
    for tenant in ("acme", "globex"):
        cli.run("tenants", "create", tenant)
    first = cli.json("keys", "create", "--tenant", "acme", "--name", "app")
    other = cli.json("keys", "create", "--tenant", "globex")
    rotated = cli.json("keys", "rotate", first["id"])
    cli.run("keys", "revoke", other["id"])
    cli.run("tenants", "disable", "globex")
    cli.run("quotas", "set", "--tenant", "acme", "--rpm", "60", "--weight", "2")
    cli.run("quotas", "set", "--key", rotated["id"], "--concurrency", "3")
    cli.run("ohttp", "rotate", "--grace", "1h")
    add_echo_model(home)
    before = {read: cli.json(*read) for read in READS}
    entries = cli.run("audit", "export").stdout.splitlines()
    assert entries and cli.json("audit", "verify")["ok"]

    target = postgres.new_database()
    report = cli.json("db", "copy", "--to", target)
    assert report["tables"]["tenants"] == 3  # system, acme, globex
    assert report["tables"]["api_keys"] == 4  # bootstrap admin, first, other, rotated
    # The first hybrid and X25519 keys, and the two that rotated them.
    assert report["tables"]["ohttp_keys"] == 4
    # (the export is a record of its own)
    assert report["tables"]["audit_records"] >= len(entries)
    assert report["replaced"] == {} and report["schema"] == head_revision()
    assert "tenants.id" in report["sequences"]

    # Everything reads back the same from PostgreSQL; its audit log holds the same signed
    # records and verifies.
    after = {read: cli.json(*read, url=target) for read in READS}
    assert after == before
    assert cli.run("audit", "export", url=target).stdout.splitlines()[: len(entries)] == entries
    target_log = cli.json("audit", "verify", url=target)
    assert target_log["ok"], target_log["problems"]

    # The copy goes on: the next tenant gets the next id, its record joins the log.
    initech = cli.json("tenants", "create", "initech", url=target)
    assert initech["id"] == max(t["id"] for t in before[("tenants", "list")]) + 1
    grown = cli.json("audit", "verify", url=target)
    assert grown["ok"] and grown["size"] > target_log["size"]

    # A second copy is refused (the target has data now) unless forced, which says what
    # it replaced.
    refused = cli.run("db", "copy", "--to", target, check=False)
    assert refused.returncode == 1
    assert "already holds data" in refused.stderr and "--force" in refused.stderr
    forced = cli.run("db", "copy", "--to", target, "--force")
    assert "replaced" in forced.stdout and "tenants 4" in forced.stdout
    assert cli.json("tenants", "list", url=target) == before[("tenants", "list")]

    # Status and migrations of the configured database.
    status = cli.json("db", "status", url=target)
    assert status["backend"] == "postgresql" and status["up_to_date"]
    assert status["schema"] == head_revision() and "***" in status["url"]
    fresh = postgres.new_database()
    behind = cli.run("db", "status", url=fresh, check=False)
    assert behind.returncode == 1 and "bastion db migrate" in behind.stdout
    migrated = cli.json("db", "migrate", url=fresh)
    assert (migrated["before"], migrated["after"]) == (None, head_revision())
    assert "already at migration" in cli.run("db", "migrate", url=fresh).stdout

    # The same database twice, and a server that does not answer: clear errors.
    same = cli.run("db", "copy", "--to", target, url=target, check=False)
    assert same.returncode == 1 and "same database" in same.stderr
    gone = target.rsplit(":", 1)[0] + ":1/nowhere"
    down = cli.run("db", "status", url=gone, check=False)
    assert down.returncode == 1 and "does not answer" in down.stderr

    assert not [o for o in cli.outputs if postgres.password in o]


def test_db_status_of_a_sqlite_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    status = cli_json(home, "db", "status")
    assert status["backend"] == "sqlite" and status["up_to_date"]
    assert status["url"] == f"sqlite:///{home / 'bastion.db'}"
    assert "pool" not in status
