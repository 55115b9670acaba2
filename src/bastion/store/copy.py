"""Copying a whole Bastion database into another: a home's SQLite file into PostgreSQL.

The target is migrated to the same schema first; then, in one transaction on the target,
every table is copied in foreign-key order (rows that refer to rows of their own table
after those), in batches, primary keys as they are; PostgreSQL's sequences are set past
the copied ids; and each table's row count is compared with the source's, read in one
snapshot. Nothing of the target changes unless all of that succeeds. A target that holds
data already is refused unless the caller says to replace it.

Secrets travel as they are stored: sealed by the home's key ring, or as HMACs under the
master key. The copy is only usable with the same home (master key, KEK provider).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bastion.errors import ConfigurationError, Conflict
from bastion.store.db import Database, head_revision, increment_revision
from bastion.store.tables import REVISION_KEY, meta, metadata

DEFAULT_BATCH = 1000


@dataclass(frozen=True, slots=True)
class TableCopy:
    name: str
    source_rows: int
    target_rows: int


@dataclass(slots=True)
class CopyReport:
    """What a copy did: rows per table on both sides, what it replaced, sequences set."""

    source: str
    target: str
    schema: str
    tables: list[TableCopy] = field(default_factory=list)
    # Rows the target held before (only with `replace`).
    replaced: dict[str, int] = field(default_factory=dict)
    sequences: list[str] = field(default_factory=list)
    # The target's change revision after the copy (one past the copied one).
    revision: int | None = None

    @property
    def rows(self) -> int:
        return sum(t.target_rows for t in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "schema": self.schema,
            "tables": {t.name: t.target_rows for t in self.tables},
            "rows": self.rows,
            "replaced": self.replaced,
            "sequences": self.sequences,
            "revision": self.revision,
        }


class TargetNotEmpty(Conflict):
    """The target database already holds Bastion data (and replacing it was not asked)."""

    def __init__(self, rows: dict[str, int]) -> None:
        listed = ", ".join(f"{name} {count}" for name, count in rows.items())
        super().__init__(f"The target database already holds data ({listed} rows).")
        self.rows = rows


def existing_rows(db: Database) -> dict[str, int]:
    """The non-empty tables of a migrated database and their rows (a revision at 0 is no
    data: every new database has it)."""
    with db.read() as conn:
        return _existing_rows(conn)


def copy_database(
    source: Database,
    target: Database,
    *,
    replace: bool = False,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[str, int], None] | None = None,
) -> CopyReport:
    """Copy every table of `source` into `target` (both migrated to the newest schema
    here); see the module docstring. TargetNotEmpty if the target holds data and not
    `replace`; ConfigurationError if both are one database or the counts differ.
    `progress(table, rows)` is called after each table."""
    if source.same_database(target):
        raise ConfigurationError("The source and the target are the same database.")
    if batch_size < 1:
        raise ConfigurationError("The batch size must be at least 1.")
    source.migrate()
    target.migrate()
    head = head_revision()
    for db in (source, target):
        if db.schema_revision() != head:
            raise ConfigurationError(
                f"{db.url} is at migration {db.schema_revision()}, not {head}: run "
                "`bastion db migrate` with a Bastion of that version first."
            )
    report = CopyReport(source=source.url, target=target.url, schema=head)
    with source.read(snapshot=True) as src, target.write(bump_revision=False) as dst:
        existing = _existing_rows(dst)
        if existing and not replace:
            raise TargetNotEmpty(existing)
        report.replaced = existing
        revision_before = _revision_in(dst)
        if dst.dialect.name == "postgresql":
            # Bastion's timestamps are UTC; one read without a zone (SQLite keeps none for
            # a plain DateTime column) must not take the server's zone on the way in.
            dst.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")
        for table in reversed(metadata.sorted_tables):
            dst.execute(sa.delete(table))
        for table in metadata.sorted_tables:
            copied = 0
            for rows in _batches(src, table, batch_size):
                dst.execute(sa.insert(table), rows)
                copied += len(rows)
            if progress is not None:
                progress(table.name, copied)
        if dst.dialect.name == "postgresql":
            report.sequences = _reset_sequences(dst)
        # Gateways already on the target must see a revision they have not seen: past
        # both the copied one and the target's own.
        copied_revision = _revision_in(dst)
        if revision_before is not None and revision_before > (copied_revision or 0):
            dst.execute(
                sa.update(meta).where(meta.c.key == REVISION_KEY).values(value=str(revision_before))
            )
        increment_revision(dst)
        report.revision = _revision_in(dst)
        for table in metadata.sorted_tables:
            count = sa.select(sa.func.count()).select_from(table)
            copy = TableCopy(
                table.name, src.execute(count).scalar_one(), dst.execute(count).scalar_one()
            )
            if copy.source_rows != copy.target_rows:
                # Raised inside the target's transaction: nothing of the copy is kept.
                raise ConfigurationError(
                    f"The copy of {table.name} has {copy.target_rows} rows, the source "
                    f"{copy.source_rows}; the target was left as it was."
                )
            report.tables.append(copy)
    return report


def _revision_in(conn: Connection) -> int | None:
    value = conn.execute(
        sa.select(meta.c.value).where(meta.c.key == REVISION_KEY)
    ).scalar_one_or_none()
    return None if value is None else int(value)


def _existing_rows(conn: Connection) -> dict[str, int]:
    rows: dict[str, int] = {}
    for table in metadata.sorted_tables:
        query = sa.select(sa.func.count()).select_from(table)
        if table is meta:
            query = query.where(sa.not_((meta.c.key == REVISION_KEY) & (meta.c.value == "0")))
        count = conn.execute(query).scalar_one()
        if count:
            rows[table.name] = count
    return rows


def _batches(conn: Connection, table: sa.Table, size: int) -> Iterator[list[dict[str, Any]]]:
    """The table's rows in batches, each row before the rows of its own table that refer
    to it (an API key before the one rotated from it)."""
    order = list(table.primary_key.columns)
    self_references = [fk for fk in table.foreign_keys if fk.column.table is table]
    if self_references:
        rows = [dict(row) for row in conn.execute(sa.select(table).order_by(*order)).mappings()]
        ordered = _parents_first(rows, self_references)
        for start in range(0, len(ordered), size):
            yield ordered[start : start + size]
        return
    result = conn.execution_options(yield_per=size).execute(sa.select(table).order_by(*order))
    for part in result.mappings().partitions(size):
        yield [dict(row) for row in part]


def _parents_first(
    rows: list[dict[str, Any]], references: Sequence[sa.ForeignKey]
) -> list[dict[str, Any]]:
    pairs = [(fk.parent.name, fk.column.name) for fk in references]
    placed: dict[str, set[Any]] = {target: set() for _, target in pairs}
    present = {target: {row[target] for row in rows} for _, target in pairs}
    ordered: list[dict[str, Any]] = []
    pending = rows
    while pending:
        waiting = []
        for row in pending:
            ready = all(
                row[column] is None
                or row[column] not in present[target]
                or row[column] in placed[target]
                for column, target in pairs
            )
            if ready:
                ordered.append(row)
                for _, target in pairs:
                    placed[target].add(row[target])
            else:
                waiting.append(row)
        if len(waiting) == len(pending):
            raise ConfigurationError("The source's rows refer to each other in a cycle.")
        pending = waiting
    return ordered


def _reset_sequences(conn: Connection) -> list[str]:
    """Set each serial column's sequence past the largest copied id (the copy inserted
    ids of its own, which PostgreSQL's sequences did not count); the columns set."""
    done = []
    for table in metadata.sorted_tables:
        columns = list(table.primary_key.columns)
        if len(columns) != 1 or not isinstance(columns[0].type, sa.Integer):
            continue
        column = columns[0]
        sequence = conn.execute(
            sa.select(sa.func.pg_get_serial_sequence(table.name, column.name))
        ).scalar_one()
        if sequence is None:
            continue
        top = conn.execute(sa.select(sa.func.max(column))).scalar_one()
        # setval(…, n, false): the next id handed out is n.
        conn.execute(
            sa.text("SELECT setval(CAST(:sequence AS regclass), :next, false)"),
            {"sequence": sequence, "next": (top or 0) + 1},
        )
        done.append(f"{table.name}.{column.name}")
    return done
