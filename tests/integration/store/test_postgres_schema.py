"""The database layer on both backends: migrations, the declared schema, the revision, URLs;
and what PostgreSQL adds: its driver by default, serialised revision bumps, migrations
started by several processes at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from store_testing import run_processes, run_threads

from bastion.errors import ConfigurationError
from bastion.store import tables
from bastion.store.db import Database, head_revision
from services import PostgresServer


def _tenant(conn: sa.Connection, name: str) -> None:
    conn.execute(
        sa.insert(tables.tenants).values(name=name, disabled=False, created_at=datetime.now(UTC))
    )


def test_migrations_create_exactly_the_declared_schema(database: Database) -> None:
    assert database.schema_revision() == head_revision()
    assert database.revision() == 0
    with database.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, tables.metadata) == []
    database.migrate()  # again: nothing to do
    assert database.schema_revision() == head_revision()


def test_a_fresh_database_has_no_schema_revision(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert db.schema_revision() is None
        with pytest.raises(ConfigurationError):
            db.revision()
    finally:
        db.close()


def test_processes_migrating_one_database_at_once_all_succeed(database_url: str) -> None:
    script = (
        "import sys\nfrom bastion.store.db import Database\n"
        "db = Database(sys.argv[2]); db.migrate(); print(db.schema_revision())\n"
    )
    outputs = run_processes(script, database_url, copies=3)
    assert {out.strip() for out in outputs} == {head_revision()}


def test_concurrent_writers_never_lose_a_revision(
    open_database: Callable[[], Database],
) -> None:
    gateways = [open_database() for _ in range(3)]

    def bump(db: Database) -> Callable[[], None]:
        def run() -> None:
            for _ in range(15):
                with db.write() as conn:
                    conn.execute(sa.select(tables.meta.c.value)).all()

        return run

    run_threads(*(bump(db) for db in gateways for _ in range(2)))
    assert gateways[0].revision() == 6 * 15


def test_writes_that_bump_the_revision_run_one_at_a_time(
    open_database: Callable[[], Database],
) -> None:
    # A read-then-write (the services' "is the name free? then insert") must see a
    # concurrent one's commit: the second writer waits for the first's transaction.
    first, second = open_database(), open_database()
    inside = threading.Event()
    release = threading.Event()
    seen: list[int] = []

    def hold() -> None:
        with first.write() as conn:
            _tenant(conn, "one")
            inside.set()
            assert release.wait(30)

    def follow() -> None:
        assert inside.wait(30)
        with second.write() as conn:
            seen.append(len(conn.execute(sa.select(tables.tenants.c.id)).all()))

    holder = threading.Thread(target=hold)
    follower = threading.Thread(target=follow)
    holder.start()
    follower.start()
    follower.join(0.5)
    assert follower.is_alive(), "the second writer did not wait for the first"
    release.set()
    holder.join(30)
    follower.join(30)
    assert seen == [1]
    assert first.revision() == 2


def test_postgresql_urls_use_psycopg_and_never_show_the_password(
    postgres: PostgresServer,
) -> None:
    url = postgres.new_database()
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    db = Database(plain)
    try:
        db.migrate()
        assert db.backend == "postgresql"
        assert db.engine.dialect.driver == "psycopg"
        assert postgres.password not in db.url and "***" in db.url
        assert db.same_database(Database(url))
    finally:
        db.close()


def test_only_sqlite_and_postgresql_are_accepted() -> None:
    with pytest.raises(ConfigurationError, match=r"SQLite .* or PostgreSQL"):
        Database("mysql://user:secret@localhost/bastion")
    with pytest.raises(ConfigurationError) as caught:
        Database("postgresql+psycopg://user:pa ss@[::1/x")
    assert "pa ss" not in str(caught.value) and caught.value.__cause__ is None
