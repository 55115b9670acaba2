"""Extraction risk per API key and model, for the CLI and every gateway to read.

A model's worker scores each key's queries (:mod:`bastion.protection.monitor`) and
reports to its gateway; the gateway keeps the latest report per (key, model) in memory and
writes the ones that changed here, without bumping the change revision. A block is
different: it is written with a revision bump, so that every gateway refuses the key from
its next refresh on, and it stays until an admin clears it (``bastion protect clear``).
Rows hold scores and counts, never an input.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from bastion.audit.events import PROTECT_KEY_CLEARED, EventSink, emit_change
from bastion.identity.principal import Principal
from bastion.store.db import Database, upsert
from bastion.store.tables import extraction_risk


@dataclass(frozen=True, slots=True)
class RiskRecord:
    key_id: str
    model: str
    tenant: str
    risk: float
    level: str
    queries: int
    signals: dict[str, float] = field(default_factory=dict)
    blocked_at: datetime | None = None
    updated_at: datetime | None = None
    # Set on the record of the report that decided a block (not written yet): only such
    # a record blocks in the database; one that carries an earlier block never undoes an
    # admin's clear.
    new_block: bool = False

    @property
    def blocked(self) -> bool:
        return self.blocked_at is not None

    def as_dict(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "model": self.model,
            "tenant": self.tenant,
            "risk": self.risk,
            "level": self.level,
            "queries": self.queries,
            "signals": self.signals,
            "blocked": self.blocked,
            "blocked_at": self.blocked_at.isoformat() if self.blocked_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


class RiskBoard:
    """Reads and writes the ``extraction_risk`` table."""

    def __init__(self, db: Database, events: EventSink | None = None) -> None:
        self._db = db
        self._events = events

    def record(self, records: Iterable[RiskRecord]) -> None:
        """Write the latest scores; a record that decided a block (`new_block`) blocks its
        key (a revision bump); an existing block is kept whatever the new score, and a
        block an admin has cleared since is not written back."""
        # In key order: two gateways writing the same rows lock them in the same order.
        records = sorted(records, key=lambda r: (r.key_id, r.model))
        if not records:
            return
        now = datetime.now(UTC)
        with self._db.write(bump_revision=any(r.new_block for r in records)) as conn:
            for record in records:
                where = (extraction_risk.c.key_id == record.key_id) & (
                    extraction_risk.c.model == record.model
                )
                values = {
                    "tenant": record.tenant,
                    "risk": record.risk,
                    "level": record.level,
                    "queries": record.queries,
                    "signals": json.dumps(record.signals, sort_keys=True),
                    "updated_at": now,
                }
                blocks = record.blocked_at if record.new_block else None
                fresh = dict(values)
                if record.blocked_at is not None and blocks is None:
                    # Cleared by an admin since: the block is not written back.
                    fresh["level"] = "ok"
                # Inserted unless the row exists (or another gateway inserts it first):
                # then it is locked and updated below, seeing that gateway's block.
                row = {"key_id": record.key_id, "model": record.model, "blocked_at": blocks}
                # (RETURNING, not rowcount: drivers do not report an INSERT's count.)
                inserted = conn.execute(
                    upsert(conn, extraction_risk)
                    .values(**row, **fresh)
                    .on_conflict_do_nothing()
                    .returning(extraction_risk.c.key_id)
                ).first()
                if inserted is not None:
                    continue
                existing = conn.execute(
                    sa.select(extraction_risk.c.blocked_at).where(where).with_for_update()
                ).first()
                if existing is None:  # an admin's clear deleted it meanwhile
                    conn.execute(sa.insert(extraction_risk).values(**row, **fresh))
                    continue
                if existing.blocked_at is None and blocks is not None:
                    values["blocked_at"] = blocks
                elif existing.blocked_at is None and record.blocked_at is not None:
                    values["level"] = "ok"
                elif existing.blocked_at is not None:
                    values["level"] = "block"
                conn.execute(sa.update(extraction_risk).where(where).values(**values))

    def read(self, *, tenant: str | None = None, model: str | None = None) -> list[RiskRecord]:
        query = sa.select(extraction_risk)
        if tenant is not None:
            query = query.where(extraction_risk.c.tenant == tenant)
        if model is not None:
            query = query.where(extraction_risk.c.model == model)
        query = query.order_by(extraction_risk.c.risk.desc(), extraction_risk.c.key_id)
        with self._db.read() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            RiskRecord(
                key_id=row["key_id"],
                model=row["model"],
                tenant=row["tenant"],
                risk=row["risk"],
                level=row["level"],
                queries=row["queries"],
                signals=json.loads(row["signals"]),
                blocked_at=row["blocked_at"],
                updated_at=row["updated_at"],
            )
            for row in rows
        ]

    def pairs(self) -> tuple[frozenset[tuple[str, str]], frozenset[tuple[str, str]]]:
        """The (key, model) pairs that are blocked, and all those with a record."""
        columns = (extraction_risk.c.key_id, extraction_risk.c.model, extraction_risk.c.blocked_at)
        with self._db.read() as conn:
            rows = conn.execute(sa.select(*columns)).all()
        blocked = frozenset((r.key_id, r.model) for r in rows if r.blocked_at is not None)
        return blocked, frozenset((r.key_id, r.model) for r in rows)

    def clear(self, actor: Principal, key_id: str, model: str | None = None) -> int:
        """Lift a key's blocks and forget its scores (on `model`, or every model); admin
        only. Returns how many (key, model) records were cleared."""
        actor.require_admin()
        where = extraction_risk.c.key_id == key_id
        if model is not None:
            where = where & (extraction_risk.c.model == model)
        with self._db.write() as conn:
            cleared = conn.execute(sa.delete(extraction_risk).where(where)).rowcount
        if cleared and self._events is not None:
            emit_change(
                self._events,
                PROTECT_KEY_CLEARED,
                actor.actor,
                key_id,
                detail={"model": model or "*", "records": cleared},
                at=datetime.now(UTC).timestamp(),
            )
        return int(cleared)
