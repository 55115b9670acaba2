"""The database: engine set-up, transactions, migrations and the change revision.

SQLite (the default) and PostgreSQL both work (docs/database.md). Several processes share
one SQLite file (the CLI and a running server), so every SQLite connection uses WAL mode,
enforces foreign keys and waits for locks instead of failing at once. Writes take the
write lock when they begin (``BEGIN IMMEDIATE``), so a read-then-write transaction cannot
fail half-way on a lock upgrade. On PostgreSQL each process keeps a pool of connections
(checked before use, so a restarted server costs no failed request once it is back).

Every write to tenants, keys or models bumps the ``revision`` row of the ``meta`` table in
the same transaction, first: on PostgreSQL the row lock this takes serialises such writes
the way SQLite's write lock does, so their read-then-write steps see each other's commits.
Gateways poll :meth:`Database.revision` to know when to re-read; on PostgreSQL the bump
also sends a notification, and :meth:`Database.watch` lets a gateway hear it at once.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from bastion.errors import ConfigurationError, StorageUnavailable
from bastion.store.tables import REVISION_KEY, meta

if TYPE_CHECKING:
    from bastion.store.watch import RevisionWatcher

logger = logging.getLogger("bastion.store")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# How long a SQLite connection waits for another process's lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 5000
# Execution option that makes SQLite begin a transaction with the write lock.
_WRITE_OPTION = "bastion_write"
# The PostgreSQL notification channel of revision bumps (the payload: the new revision).
REVISION_CHANNEL = "bastion_revision"
# PostgreSQL advisory lock keys (per database): migrations, and the audit log's writers.
MIGRATION_LOCK = 0x62617374_0001
AUDIT_LOG_LOCK = 0x62617374_0002
BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How a process pools its PostgreSQL connections (SQLite ignores these).

    `size` connections stay open, up to `max_overflow` more are opened under load; a
    request waits at most `timeout_s` for a free one (then 503), a new connection at most
    `connect_timeout_s`; connections older than `recycle_s` are replaced."""

    size: int = 5
    max_overflow: int = 10
    recycle_s: float = 1800.0
    timeout_s: float = 10.0
    connect_timeout_s: int = 5


class Database:
    """One database, shared by every component of a process."""

    def __init__(self, url: str, *, echo: bool = False, pool: PoolSettings | None = None) -> None:
        try:
            parsed = _with_driver(sa.make_url(url))
        except (sa.exc.ArgumentError, ValueError):
            # Not chained: the parser's message may quote the URL, password included.
            raise ConfigurationError("The database URL is malformed.") from None
        self.backend = parsed.get_backend_name()
        if self.backend not in BACKENDS:
            raise ConfigurationError(
                "The database must be SQLite (sqlite:///PATH) or PostgreSQL "
                "(postgresql+psycopg://USER@HOST/NAME)."
            )
        self._url = parsed
        self.is_sqlite = self.backend == "sqlite"
        self.pool = pool or PoolSettings()
        engine_args: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            _create_sqlite_file(parsed)
        else:
            engine_args.update(
                pool_size=self.pool.size,
                max_overflow=self.pool.max_overflow,
                pool_recycle=self.pool.recycle_s,
                pool_timeout=self.pool.timeout_s,
                pool_pre_ping=True,
                connect_args=_connect_options(self.pool),
            )
        try:
            self.engine: Engine = sa.create_engine(parsed, **engine_args)
        except (ImportError, SQLAlchemyError):
            raise ConfigurationError(
                f"The {self.backend} database driver cannot be loaded "
                "(PostgreSQL needs psycopg: postgresql+psycopg://...)."
            ) from None
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        # Only one migration at a time per process; across processes the database locks.
        self._migrate_lock = threading.Lock()

    @property
    def url(self) -> str:
        """The URL with any password hidden, safe to log."""
        return self._url.render_as_string(hide_password=True)

    def same_database(self, other: Database) -> bool:
        """Whether `other` names this very database (the same URL, password aside)."""
        return self._url.set(password=None) == other._url.set(password=None)

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
        with _available(), self.engine.connect() as conn:
            if snapshot and not self.is_sqlite:
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @contextmanager
    def write(self, *, bump_revision: bool = True) -> Iterator[Connection]:
        """A write transaction, committed on success and rolled back on any error.

        With `bump_revision` (the default) the change revision is incremented in the same
        transaction, before anything else, so gateways notice the change and such writes
        run one at a time (see the module docstring); pass False for writes that gateways
        do not cache. A database that cannot be used now raises StorageUnavailable.
        """
        with _available(), self.engine.connect() as conn:
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                if bump_revision:
                    increment_revision(conn)
                yield conn

    def revision(self) -> int:
        """The current change revision: one indexed read, cheap enough to poll every second.

        StorageUnavailable when the database does not answer; ConfigurationError when it
        answers without a revision (not migrated)."""
        try:
            with self.engine.connect() as conn:
                value = conn.execute(
                    sa.select(meta.c.value).where(meta.c.key == REVISION_KEY)
                ).scalar_one_or_none()
                conn.rollback()
        except SQLAlchemyError as exc:
            if _is_unavailable(exc) and "no such table" not in _driver_message(exc):
                raise _unavailable(exc) from None
            raise ConfigurationError("The database revision cannot be read.") from exc
        if value is None:
            raise ConfigurationError("The database has no revision; run the migrations.")
        return int(value)

    def watch(self, on_change: Callable[[int | None], None]) -> RevisionWatcher | None:
        """Call `on_change` from a thread of its own whenever a change that bumps the
        revision commits, in any process using this database: with the new revision, or
        None when the watcher (re)connects and may have missed some. PostgreSQL only
        (LISTEN/NOTIFY); None on SQLite, where polling :meth:`revision` is all there is.
        Close the watcher when done."""
        if self.is_sqlite:
            return None
        from bastion.store.watch import RevisionWatcher

        return RevisionWatcher(self._listen_connection, on_change)

    def _listen_connection(self) -> Any:
        """A new psycopg connection of its own (not pooled), in autocommit mode."""
        import psycopg

        _, params = self.engine.dialect.create_connect_args(self._url)
        params.pop("context", None)
        params.update(_connect_options(self.pool))
        return psycopg.connect(**params, autocommit=True)

    # ------------------------------------------------------------------ migrations

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (a no-op when already there)."""
        config = _alembic_config()
        with (
            self._migrate_lock,
            _sqlite_migration_lock(self._url if self.is_sqlite else None),
            _available(),
            self.engine.connect() as conn,
        ):
            # On SQLite the write lock serialises processes that migrate at the same time;
            # on PostgreSQL an advisory lock does, held until the migration commits.
            conn.execution_options(**{_WRITE_OPTION: True})
            if not self.is_sqlite:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            config.attributes["connection"] = conn
            try:
                command.upgrade(config, "head")
                conn.commit()
            except SQLAlchemyError as exc:
                if _is_unavailable(exc):
                    raise
                raise ConfigurationError("The database migration failed.") from exc

    def schema_revision(self) -> str | None:
        """The migration the database is at (None: none has run)."""
        with _available(), self.engine.connect() as conn:
            value = MigrationContext.configure(conn).get_current_revision()
            conn.rollback()
        return value


def head_revision() -> str:
    """The newest migration this version of Bastion has."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise ConfigurationError("Bastion's migrations are missing.")
    return head


def upsert(conn: Connection, table: sa.Table) -> Any:
    """``INSERT … ON CONFLICT`` for `table` in the connection's dialect (both SQLite and
    PostgreSQL have it): for rows that several gateways may insert at the same moment."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


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


def _with_driver(url: URL) -> URL:
    """postgresql:// and postgres:// mean psycopg (3), the driver Bastion ships with."""
    if url.drivername in ("postgres", "postgresql"):
        return url.set(drivername="postgresql+psycopg")
    return url


def _connect_options(pool: PoolSettings) -> dict[str, Any]:
    """libpq options of every PostgreSQL connection: give up on a server that does not
    answer, and notice a peer that vanished without closing (keepalives)."""
    return {
        "connect_timeout": max(2, int(pool.connect_timeout_s)),
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "application_name": "bastion",
    }


@contextmanager
def _sqlite_migration_lock(url: URL | None) -> Iterator[None]:
    """Processes migrating one SQLite file take turns, holding a lock file beside it: the
    database's own write lock is let go between Alembic's reading of the schema version
    and its migrations, and two processes could both run one (seen under load)."""
    database = url.database if url is not None else None
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    path = Path(database).expanduser()
    fd = os.open(path.with_name(path.name + ".migrate-lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _available() -> Iterator[None]:
    """Errors that mean the database cannot be used now become StorageUnavailable."""
    try:
        yield
    except SQLAlchemyError as exc:
        if _is_unavailable(exc):
            raise _unavailable(exc) from None
        raise


def _is_unavailable(exc: BaseException) -> bool:
    """A database that does not answer, is busy, full or read-only: not a wrong request.
    (A pool with no free connection raises sqlalchemy's TimeoutError; a connection found
    closed is an InterfaceError that SQLAlchemy marks as a disconnect.)"""
    if isinstance(exc, OperationalError | sa.exc.TimeoutError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _driver_message(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return str(orig).lower()


def _unavailable(exc: BaseException) -> StorageUnavailable:
    """What went wrong, in words safe to show anyone: the driver's message is not (it can
    quote the statement and its parameters)."""
    text = _driver_message(exc)
    if "full" in text or "no space" in text:
        reason = "its disk is full"
    elif "locked" in text or "busy" in text or "deadlock" in text:
        reason = "another process holds its lock"
    elif "readonly" in text or "read-only" in text:
        reason = "it is read-only"
    elif isinstance(exc, sa.exc.TimeoutError):
        reason = "all its connections are busy"
    elif "too many" in text:
        reason = "it accepts no more connections"
    else:
        reason = "it does not answer"
    logger.warning("the database cannot be used", extra={"reason": reason})
    return StorageUnavailable(f"The server cannot use its database now ({reason}); retry later.")


def increment_revision(conn: Connection) -> None:
    """Increment the change revision in `conn`'s transaction (and, on PostgreSQL, notify
    the watchers when it commits)."""
    # One UPDATE evaluated by the database, so concurrent writers on PostgreSQL cannot
    # lose an increment (a Python read-modify-write could).
    bump = (
        sa.update(meta)
        .where(meta.c.key == REVISION_KEY)
        .values(value=sa.cast(sa.cast(meta.c.value, sa.BigInteger) + 1, sa.Text))
    )
    if conn.dialect.name != "postgresql":
        conn.execute(bump)
        return
    # The notification goes out when (and only if) the transaction commits.
    bumped = bump.returning(meta.c.value).cte("bumped")
    conn.execute(sa.select(sa.func.pg_notify(REVISION_CHANNEL, bumped.c.value)))


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
