"""Live model states, published by the running gateway for the CLI to read.

The gateway knows each worker's state (loading, ready, failed, integrity_failed with its
reason...) in memory; :class:`StatusBoard` copies it to the ``model_status`` table when it
changes, so that ``bastion models list`` shows it without talking to the server. A gateway
that stops cleanly clears the board; rows left by one that crashed keep their
``updated_at``, which tells their age.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from bastion.store.db import Database
from bastion.store.tables import model_status


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


class StatusBoard:
    """Writes and reads the ``model_status`` table (never bumps the change revision)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._published: dict[str, tuple[str, str | None, int, datetime]] = {}

    def publish(self, statuses: Iterable[PublishedStatus]) -> bool:
        """Write the statuses that changed since the last call, delete the models no longer
        there; True if anything was written."""
        current = {status.name: status for status in statuses}
        changed = [s for s in current.values() if self._published.get(s.name) != s.key()]
        gone = [name for name in self._published if name not in current]
        if not changed and not gone:
            return False
        now = datetime.now(UTC)
        with self._db.write(bump_revision=False) as conn:
            names = [s.name for s in changed] + gone
            conn.execute(sa.delete(model_status).where(model_status.c.name.in_(names)))
            if changed:
                conn.execute(
                    sa.insert(model_status),
                    [
                        {
                            "name": s.name,
                            "state": s.state,
                            "detail": s.detail,
                            "restarts": s.restarts,
                            "since": s.since,
                            "updated_at": now,
                        }
                        for s in changed
                    ],
                )
        self._published = {name: status.key() for name, status in current.items()}
        return True

    def clear(self) -> None:
        with self._db.write(bump_revision=False) as conn:
            conn.execute(sa.delete(model_status))
        self._published = {}

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
