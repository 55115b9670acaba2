"""The database layer on a real SQLite file: migrations, pragmas, transactions, revision."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.dialects import postgresql

from bastion.errors import ConfigurationError
from bastion.store import tables
from bastion.store.db import Database, render_migrations_sql

pytestmark = pytest.mark.unit


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "nested" / "bastion.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{db_path}")
    database.migrate()
    yield database
    database.close()


def _insert_tenant(conn: sa.Connection, name: str) -> int:
    result = conn.execute(
        sa.insert(tables.tenants).values(
            name=name, disabled=False, created_at=datetime.now(UTC), disabled_at=None
        )
    )
    assert result.inserted_primary_key is not None
    return int(result.inserted_primary_key[0])


def test_creates_parent_directory_and_migrates_to_revision_zero(db_path: Path) -> None:
    database = Database(f"sqlite:///{db_path}")
    database.migrate()
    assert db_path.is_file()
    # The database and its WAL files are readable by their owner only.
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert database.revision() == 0
    names = set(sa.inspect(database.engine).get_table_names())
    assert {"tenants", "api_keys", "models", "meta", "alembic_version"} <= names
    database.close()


def test_migrate_twice_is_a_no_op(db: Database) -> None:
    with db.write() as conn:
        _insert_tenant(conn, "acme")
    db.migrate()
    assert db.revision() == 1
    with db.read() as conn:
        assert conn.execute(sa.select(tables.tenants.c.name)).scalars().all() == ["acme"]


def test_sqlite_connections_use_wal_foreign_keys_and_busy_timeout(db: Database) -> None:
    with db.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_foreign_keys_are_enforced(db: Database) -> None:
    with pytest.raises(sa.exc.IntegrityError), db.write() as conn:
        conn.execute(
            sa.insert(tables.api_keys).values(
                id="0123456789abcdef",
                tenant_id=999,
                digest=b"\0" * 32,
                role="consumer",
                models=["*"],
                actions=["chat"],
                created_at=datetime.now(UTC),
            )
        )


def test_write_bumps_revision_and_rollback_does_not(db: Database) -> None:
    with db.write() as conn:
        _insert_tenant(conn, "one")
    assert db.revision() == 1
    with db.write(bump_revision=False) as conn:
        _insert_tenant(conn, "two")
    assert db.revision() == 1
    with pytest.raises(RuntimeError), db.write() as conn:
        _insert_tenant(conn, "three")
        raise RuntimeError("abort")
    assert db.revision() == 1
    with db.read() as conn:
        names = conn.execute(sa.select(tables.tenants.c.name)).scalars().all()
    assert sorted(names) == ["one", "two"]


def test_two_database_objects_on_one_file_see_each_others_changes(
    db: Database, db_path: Path
) -> None:
    other = Database(f"sqlite:///{db_path}")
    other.migrate()
    with other.write() as conn:
        _insert_tenant(conn, "from-other")
    assert db.revision() == 1
    with db.read() as conn:
        assert conn.execute(sa.select(tables.tenants.c.name)).scalar_one() == "from-other"
    with db.write() as conn:
        _insert_tenant(conn, "from-first")
    assert other.revision() == 2
    other.close()


def test_concurrent_writers_never_lose_a_revision(db: Database, db_path: Path) -> None:
    # Two engines on the same file, several threads each: the database lock serialises them.
    others = [Database(f"sqlite:///{db_path}") for _ in range(2)]
    errors: list[BaseException] = []

    def bump(database: Database) -> None:
        try:
            for _ in range(20):
                with database.write() as conn:
                    conn.execute(sa.select(tables.meta.c.value)).all()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(d,)) for d in [db, *others] for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert db.revision() == 6 * 20
    for other in others:
        other.close()


def test_another_process_sees_and_makes_changes(db: Database, db_path: Path) -> None:
    with db.write() as conn:
        _insert_tenant(conn, "parent")
    script = (
        "import sys, sqlalchemy as sa\n"
        "from datetime import UTC, datetime\n"
        "from bastion.store.db import Database\n"
        "from bastion.store import tables\n"
        "db = Database(sys.argv[1])\n"
        "print(db.revision())\n"
        "with db.write() as conn:\n"
        "    conn.execute(sa.insert(tables.tenants).values(name='child', disabled=False,"
        " created_at=datetime.now(UTC)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, f"sqlite:///{db_path}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PYTHONPATH": str(Path(tables.__file__).parents[2]), "PATH": ""},
    )
    assert result.stdout.strip() == "1"
    assert db.revision() == 2
    with db.read() as conn:
        names = conn.execute(sa.select(tables.tenants.c.name)).scalars().all()
    assert sorted(names) == ["child", "parent"]


def test_timestamps_come_back_timezone_aware_in_utc(db: Database) -> None:
    plus_two = timezone(timedelta(hours=2))
    created = datetime(2030, 1, 2, 5, 4, 5, tzinfo=plus_two)
    with db.write() as conn:
        conn.execute(
            sa.insert(tables.tenants).values(name="tz", disabled=False, created_at=created)
        )
    with db.read() as conn:
        stored = conn.execute(sa.select(tables.tenants.c.created_at)).scalar_one()
    assert stored.tzinfo is not None
    assert stored == created
    assert stored.utcoffset() == timedelta(0)


def test_naive_timestamps_are_refused(db: Database) -> None:
    with pytest.raises(sa.exc.StatementError), db.write() as conn:
        conn.execute(
            sa.insert(tables.tenants).values(
                name="naive", disabled=False, created_at=datetime(2030, 1, 1)
            )
        )


def test_migrations_create_exactly_the_declared_schema(db: Database) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, tables.metadata) == []


def test_revision_on_an_unmigrated_database_is_a_configuration_error(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ConfigurationError):
        database.revision()
    database.close()


def test_malformed_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        Database("not a url")


def test_schema_renders_for_postgresql() -> None:
    sql = render_migrations_sql("postgresql")
    assert "TIMESTAMP WITH TIME ZONE" in sql
    assert "BYTEA" in sql
    for name in (
        "pk_tenants",
        "uq_tenants_name",
        "fk_api_keys_tenant_id_tenants",
        "ck_api_keys_role_valid",
        "ck_models_desired_state_valid",
        "ix_api_keys_tenant_id",
    ):
        assert f"{name} " in sql or f"{name}\n" in sql
    assert "INSERT INTO meta (key, value) VALUES ('revision', '0')" in sql
    # The declared tables compile for PostgreSQL with the same constraint names.
    ddl = str(sa.schema.CreateTable(tables.api_keys).compile(dialect=postgresql.dialect()))
    assert "CONSTRAINT ck_api_keys_role_valid" in ddl
    assert "CONSTRAINT fk_api_keys_tenant_id_tenants" in ddl
