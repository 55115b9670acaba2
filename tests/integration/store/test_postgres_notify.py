"""LISTEN/NOTIFY: a change committed through one Database wakes the watcher of another at
once (no poll is involved: a watcher only hears the database), only committed changes are
heard, and a watcher listens again after PostgreSQL restarts."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from bastion.store import tables
from bastion.store.db import Database
from bastion.store.watch import RevisionWatcher
from services import PostgresServer

WAIT_S = 10.0  # generous: a notification arrives in milliseconds


class Heard:
    """What a watcher's callback was given, in order."""

    def __init__(self) -> None:
        self.items: queue.Queue[int | None] = queue.Queue()

    def __call__(self, revision: int | None) -> None:
        self.items.put(revision)

    def next(self) -> int | None:
        try:
            return self.items.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError("the watcher heard nothing") from None


@pytest.fixture
def gateways(pg_url: str) -> Iterator[tuple[Database, Database]]:
    cli, gateway = Database(pg_url), Database(pg_url)
    cli.migrate()
    yield cli, gateway
    cli.close()
    gateway.close()


def _watch(db: Database, heard: Heard) -> RevisionWatcher:
    watcher = db.watch(heard)
    assert watcher is not None
    assert watcher.wait_listening(WAIT_S)
    assert heard.next() is None  # it says it started listening
    return watcher


def _add_tenant(db: Database, name: str) -> None:
    with db.write() as conn:
        conn.execute(
            sa.insert(tables.tenants).values(
                name=name, disabled=False, created_at=datetime.now(UTC)
            )
        )


def test_a_change_through_one_database_wakes_another_ones_watcher(
    gateways: tuple[Database, Database],
) -> None:
    cli, gateway = gateways
    heard = Heard()
    watcher = _watch(gateway, heard)
    try:
        _add_tenant(cli, "acme")
        assert heard.next() == 1
        _add_tenant(cli, "globex")
        assert heard.next() == 2 == gateway.revision()
    finally:
        watcher.close()


def test_only_committed_revision_bumps_are_heard(gateways: tuple[Database, Database]) -> None:
    cli, gateway = gateways
    heard = Heard()
    watcher = _watch(gateway, heard)
    try:
        with pytest.raises(RuntimeError), cli.write() as conn:
            conn.execute(sa.select(1))
            raise RuntimeError("rolled back")
        with cli.write(bump_revision=False) as conn:
            conn.execute(sa.delete(tables.usage))
        _add_tenant(cli, "acme")
        # Notifications arrive in commit order: had the others sent one, it came first.
        assert heard.next() == 1
    finally:
        watcher.close()
    assert not watcher.listening
    _add_tenant(cli, "after")
    time.sleep(0.3)
    assert heard.items.empty()  # a closed watcher calls nothing more


def test_a_watcher_listens_again_after_postgresql_restarts(
    gateways: tuple[Database, Database], postgres: PostgresServer
) -> None:
    cli, gateway = gateways
    heard = Heard()
    watcher = _watch(gateway, heard)
    try:
        postgres.restart()
        # Told that it listens again (it may have missed changes meanwhile).
        assert heard.next() is None
        assert watcher.listening and watcher.connections == 2
        _add_tenant(cli, "after-restart")
        assert heard.next() == 1
    finally:
        if postgres.proc is None:
            postgres.start()
        watcher.close()


def test_sqlite_has_no_watcher(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'bastion.db'}")
    assert db.watch(lambda revision: None) is None
