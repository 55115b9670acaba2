"""Database-level tests on both backends: `database_url` (and what is built on it) is
parametrised over SQLite, in a temporary file, and PostgreSQL, a fresh database of the
session's server (tests/services.py) for each test. `open_database()` opens another
Database on the same one: what another process or another gateway sees."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bastion.store.db import Database
from services import PostgresServer

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bastion.db'}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return postgres.new_database()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh PostgreSQL database, for what only PostgreSQL has (notifications, pools)."""
    return postgres.new_database()


@pytest.fixture
def open_database(database_url: str) -> Iterator[Callable[[], Database]]:
    opened: list[Database] = []

    def open_one() -> Database:
        db = Database(database_url)
        db.migrate()
        opened.append(db)
        return db

    yield open_one
    for db in opened:
        db.close()


@pytest.fixture
def database(open_database: Callable[[], Database]) -> Database:
    return open_database()
