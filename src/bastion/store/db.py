"""The database: engine set-up, transactions, migrations and the change revision.

SQLite (the default) and PostgreSQL both work. Several processes share one SQLite file (the
CLI and a running server), so every SQLite connection uses WAL mode, enforces foreign keys
and waits for locks instead of failing at once. Writes take the write lock when they begin
(``BEGIN IMMEDIATE``), so a read-then-write transaction cannot fail half-way on a lock
upgrade.

Every write to tenants, keys or models bumps the ``revision`` row of the ``meta`` table in the
same transaction; gateways poll :meth:`Database.revision` to know when to re-read.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from bastion.errors import ConfigurationError, StorageUnavailable
from bastion.store.tables import REVISION_KEY, meta

logger = logging.getLogger("bastion.store")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# How long a SQLite connection waits for another process's lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 5000
# Execution option that makes SQLite begin a transaction with the write lock.
_WRITE_OPTION = "bastion_write"


class Database:
    """One database, shared by every component of a process."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise ConfigurationError("The database URL is malformed.") from exc
        self._url = parsed
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        engine_args: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            _create_sqlite_file(parsed)
        else:
            engine_args["pool_pre_ping"] = True
        self.engine: Engine = sa.create_engine(parsed, **engine_args)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        # Only one migration at a time per process; across processes the database locks.
        self._migrate_lock = threading.Lock()

    @property
    def url(self) -> str:
        """The URL with any password hidden, safe to log."""
        return self._url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        """A read-only transaction. On SQLite (WAL) it always reads one snapshot; on
        PostgreSQL only with `snapshot` (REPEATABLE READ), for reads of many statements
        that must agree, such as the audit log's verification.

        A database that cannot be used now raises StorageUnavailable (503)."""
        try:
            with self.engine.connect() as conn:
                if snapshot and not self.is_sqlite:
                    conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    yield conn
        except OperationalError as exc:
            raise _unavailable(exc) from None

    @contextmanager
    def write(self, *, bump_revision: bool = True) -> Iterator[Connection]:
        """A write transaction, committed on success and rolled back on any error.

        With `bump_revision` (the default) the change revision is incremented in the same
        transaction, so gateways notice the change; pass False for writes that gateways do
        not cache.
        """
        try:
            with self.engine.connect() as conn:
                conn.execution_options(**{_WRITE_OPTION: True})
                with conn.begin():
                    yield conn
                    if bump_revision:
                        _bump_revision(conn)
        except OperationalError as exc:
            raise _unavailable(exc) from None

    def revision(self) -> int:
        """The current change revision: one indexed read, cheap enough to poll every second."""
        try:
            with self.engine.connect() as conn:
                value = conn.execute(
                    sa.select(meta.c.value).where(meta.c.key == REVISION_KEY)
                ).scalar_one_or_none()
                conn.rollback()
        except SQLAlchemyError as exc:
            raise ConfigurationError("The database revision cannot be read.") from exc
        if value is None:
            raise ConfigurationError("The database has no revision; run the migrations.")
        return int(value)

    # ------------------------------------------------------------------ migrations

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (a no-op when already there)."""
        config = _alembic_config()
        with self._migrate_lock, self.engine.connect() as conn:
            # On SQLite the write lock serialises processes that migrate at the same time.
            conn.execution_options(**{_WRITE_OPTION: True})
            config.attributes["connection"] = conn
            try:
                command.upgrade(config, "head")
                conn.commit()
            except SQLAlchemyError as exc:
                raise ConfigurationError("The database migration failed.") from exc


def render_migrations_sql(dialect_name: str) -> str:
    """The SQL the migrations would run on an empty database of `dialect_name`.

    For review and for testing that the schema is valid on PostgreSQL without a server.
    """
    buffer = io.StringIO()
    config = _alembic_config(output_buffer=buffer)
    config.attributes["dialect_name"] = dialect_name
    command.upgrade(config, "head", sql=True)
    return buffer.getvalue()


def _alembic_config(**kwargs: Any) -> Config:
    # No alembic.ini: the script location is the folder inside this package.
    config = Config(**kwargs)
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _unavailable(exc: OperationalError) -> StorageUnavailable:
    """What went wrong, in words safe to show anyone: the driver's message is not (it can
    quote the statement and its parameters)."""
    text = str(exc.orig).lower()
    if "full" in text or "no space" in text:
        reason = "its disk is full"
    elif "locked" in text or "busy" in text:
        reason = "another process holds its lock"
    elif "readonly" in text or "read-only" in text:
        reason = "it is read-only"
    else:
        reason = "it does not answer"
    logger.warning("the database cannot be used", extra={"reason": reason})
    return StorageUnavailable(f"The server cannot use its database now ({reason}); retry later.")


def _bump_revision(conn: Connection) -> None:
    # One UPDATE evaluated by the database, so concurrent writers on PostgreSQL cannot
    # lose an increment (a Python read-modify-write could).
    conn.execute(
        sa.update(meta)
        .where(meta.c.key == REVISION_KEY)
        .values(value=sa.cast(sa.cast(meta.c.value, sa.BigInteger) + 1, sa.Text))
    )


def _create_sqlite_file(url: URL) -> None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file owner-only before SQLite does (SQLite would honour the umask);
        # SQLite gives its -wal and -shm files the same mode as the database file.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigurationError("Cannot create the database file.") from exc


def _configure_sqlite(engine: Engine) -> None:
    """WAL, foreign keys and a busy timeout on every connection; BEGIN issued by us."""

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would not BEGIN before
        # a SELECT, and cannot BEGIN IMMEDIATE); SQLAlchemy's begin event emits BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL is durable across application crashes, and much faster.
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
