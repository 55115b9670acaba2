"""PostgreSQL going away: requests made meanwhile get StorageUnavailable (503, "does not
answer") quickly, never a hang or another error, with no password in what is said or
logged; the pool recovers by itself once the server is back, and replaces connections the
server dropped; a pool with no free connection answers 503 too."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from bastion.errors import StorageUnavailable
from bastion.store import tables
from bastion.store.db import Database, PoolSettings
from services import PostgresServer

# Generous: a refused connection fails at once, connect_timeout bounds the rest.
BOUND_S = 20.0


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url, pool=PoolSettings(connect_timeout_s=2))
    database.migrate()
    yield database
    database.close()


def _write(db: Database) -> None:
    with db.write() as conn:
        conn.execute(sa.select(tables.meta.c.value)).all()


def _read(db: Database) -> None:
    with db.read() as conn:
        conn.execute(sa.select(tables.tenants.c.id)).all()


OPERATIONS: dict[str, Callable[[Database], Any]] = {
    "read": _read,
    "write": _write,
    "revision": Database.revision,
    "schema_revision": Database.schema_revision,
    "migrate": Database.migrate,
}


def test_a_stopped_server_answers_503_and_the_pool_recovers(
    db: Database, postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    _write(db)  # the pool holds connections to a server that is about to go
    postgres.stop()
    try:
        for name, operation in OPERATIONS.items():
            started = time.monotonic()
            with caplog.at_level(logging.WARNING), pytest.raises(StorageUnavailable) as caught:
                operation(db)
            assert time.monotonic() - started < BOUND_S, name
            error = caught.value
            assert error.status == 503 and error.headers["retry-after"], name
            assert "does not answer" in error.message, name
            assert error.__cause__ is None and error.__suppress_context__, name
    finally:
        postgres.start()
    logged = " ".join(str(record.__dict__) for record in caplog.records)
    assert "the database cannot be used" in logged
    assert postgres.password not in logged
    # Back: the same Database works again, without being reopened.
    _write(db)
    _read(db)
    assert db.revision() == 2


def test_connections_the_server_dropped_are_replaced(
    db: Database, postgres: PostgresServer
) -> None:
    _write(db)
    assert db.engine.url.database is not None
    postgres.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        database=db.engine.url.database,
    )
    _read(db)
    _write(db)
    assert db.revision() == 2


def test_an_exhausted_pool_answers_503_rather_than_waiting_forever(pg_url: str) -> None:
    db = Database(pg_url, pool=PoolSettings(size=1, max_overflow=0, timeout_s=0.5))
    try:
        db.migrate()
        with db.read():
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match="all its connections are busy"):
                _read(db)
            assert time.monotonic() - started < BOUND_S
        _read(db)
    finally:
        db.close()
