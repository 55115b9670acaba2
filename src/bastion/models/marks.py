"""Sealed records of a classifier's watermarked answers, kept for a limited time.

A model's worker seals, at once, the inputs it answered with its watermark ("marks") and
a keyed sample of those it answered plainly ("controls") to the home's marks key; the
gateway stores the blobs here and cannot read them. Only ``bastion protect verify``, with
the key ring, opens them, to ask a suspect model the same questions. Records older than
the retention (``BASTION_WATERMARK_RETENTION_DAYS``, 30 by default) are deleted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from bastion.store.db import Database
from bastion.store.tables import watermark_records


@dataclass(frozen=True, slots=True)
class SealedRecord:
    model: str
    key_id: str | None
    tenant: str | None
    kind: str
    classes: int
    count: int
    blob: bytes
    created_at: datetime | None = None


class MarksStore:
    """Writes, reads and expires the ``watermark_records`` table."""

    def __init__(self, db: Database, retention_days: float = 30.0) -> None:
        self._db = db
        self._retention = timedelta(days=retention_days)

    def add(self, records: Iterable[SealedRecord]) -> None:
        rows = [
            {
                "model": r.model,
                "key_id": r.key_id,
                "tenant": r.tenant,
                "kind": r.kind,
                "classes": r.classes,
                "count": r.count,
                "blob": r.blob,
                "created_at": r.created_at or datetime.now(UTC),
            }
            for r in records
        ]
        if rows:
            with self._db.write(bump_revision=False) as conn:
                conn.execute(sa.insert(watermark_records), rows)

    def expire(self, now: datetime | None = None) -> int:
        """Delete the records past the retention; how many."""
        cutoff = (now or datetime.now(UTC)) - self._retention
        with self._db.write(bump_revision=False) as conn:
            deleted = conn.execute(
                sa.delete(watermark_records).where(watermark_records.c.created_at < cutoff)
            ).rowcount
        return int(deleted)

    def read(self, model: str, key_id: str | None = None) -> list[SealedRecord]:
        query = sa.select(watermark_records).where(watermark_records.c.model == model)
        if key_id is not None:
            query = query.where(watermark_records.c.key_id == key_id)
        with self._db.read() as conn:
            rows = conn.execute(query.order_by(watermark_records.c.id)).mappings().all()
        return [
            SealedRecord(
                model=row["model"],
                key_id=row["key_id"],
                tenant=row["tenant"],
                kind=row["kind"],
                classes=row["classes"],
                count=row["count"],
                blob=row["blob"],
                created_at=row["created_at"],
            )
            for row in rows
        ]
