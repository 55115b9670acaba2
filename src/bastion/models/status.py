"""Live model states, published by the running gateway for the CLI to read.

The gateway knows each worker's state (loading, ready, failed, integrity_failed with its
reason...) in memory; :class:`StatusBoard` copies it to the ``model_status`` table when it
changes, so that ``bastion models list`` shows it without talking to the server. The
gateway also touches every row at least every :data:`TOUCH_INTERVAL_S`, so rows older than
:data:`STALE_AFTER_S` come from a gateway that is gone (one that stops cleanly clears the
board; one that crashed leaves rows that turn stale).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from bastion.store.db import Database, upsert
from bastion.store.tables import model_status

TOUCH_INTERVAL_S = 10.0
STALE_AFTER_S = 3 * TOUCH_INTERVAL_S


@dataclass(frozen=True, slots=True)
class PublishedStatus:
    name: str
    state: str
    detail: str | None
    restarts: int
    since: datetime
    updated_at: datetime | None = None

    def key(self) -> tuple[str, str | None, int, datetime]:
        return (self.state, self.detail, self.restarts, self.since)

    def stale(self, now: datetime | None = None) -> bool:
        """True if no gateway has vouched for this row lately (it may be gone)."""
        if self.updated_at is None:
            return True
        age = ((now or datetime.now(UTC)) - self.updated_at).total_seconds()
        return age > STALE_AFTER_S


class StatusBoard:
    """Writes and reads the ``model_status`` table (never bumps the change revision)."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._clock = clock
        # None until the first publish, which replaces whatever an earlier gateway left.
        self._published: dict[str, tuple[str, str | None, int, datetime]] | None = None
        self._touched = 0.0
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, statuses: Iterable[PublishedStatus]) -> bool:
        """Write the statuses that changed since the last call (all of them, now and then,
        to show this gateway is alive), delete the others; True if anything was written."""
        with self._lock:
            if self._closed:
                return False
            return self._publish({status.name: status for status in statuses})

    def _publish(self, current: dict[str, PublishedStatus]) -> bool:
        published = self._published
        touch = published is None or self._clock() - self._touched >= TOUCH_INTERVAL_S
        if touch:
            changed = list(current.values())
        else:
            assert published is not None
            changed = [s for s in current.values() if published.get(s.name) != s.key()]
        gone = [name for name in published or {} if name not in current]
        if not changed and not gone and not touch:
            return False
        now = datetime.now(UTC)
        with self._db.write(bump_revision=False) as conn:
            # Rows are replaced in place (upserts, in name order), never deleted and
            # inserted again: gateways sharing PostgreSQL then lock them in one order.
            if published is None:
                conn.execute(
                    sa.delete(model_status).where(model_status.c.name.not_in(list(current)))
                )
            elif gone:
                conn.execute(sa.delete(model_status).where(model_status.c.name.in_(sorted(gone))))
            for s in sorted(changed, key=lambda status: status.name):
                row = {
                    "state": s.state,
                    # A worker's reason may hold a NUL, which PostgreSQL refuses in text.
                    "detail": s.detail.replace("\0", "") if s.detail is not None else None,
                    "restarts": s.restarts,
                    "since": s.since,
                    "updated_at": now,
                }
                # Another gateway sharing the database may have just written this model's
                # row: the latest write wins (an INSERT would fail on PostgreSQL).
                insert = upsert(conn, model_status).values(name=s.name, **row)
                conn.execute(
                    insert.on_conflict_do_update(index_elements=[model_status.c.name], set_=row)
                )
        self._published = {name: status.key() for name, status in current.items()}
        if touch:
            self._touched = self._clock()
        return True

    def clear(self) -> None:
        """Remove every row, for good: a publish still running or coming later is dropped."""
        with self._lock:
            self._closed = True
            with self._db.write(bump_revision=False) as conn:
                conn.execute(sa.delete(model_status))

    def read(self) -> dict[str, PublishedStatus]:
        with self._db.read() as conn:
            rows = conn.execute(sa.select(model_status)).mappings().all()
        return {
            row["name"]: PublishedStatus(
                name=row["name"],
                state=row["state"],
                detail=row["detail"],
                restarts=row["restarts"],
                since=row["since"],
                updated_at=row["updated_at"],
            )
            for row in rows
        }
