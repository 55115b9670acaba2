"""Live model states, published by each running gateway for the CLI and the admin API.

A gateway knows its workers' states (loading, ready, failed, integrity_failed with its
reason...) in memory; its :class:`StatusBoard` copies them to the ``model_status`` table
when they change, one row per gateway and model, so that ``bastion models list`` shows
them without talking to a server. Each gateway has a name of its own
(:func:`gateway_name`: its host and port and a part drawn at random when it starts, so two
processes never share rows), and writes and deletes only its own rows: gateways sharing
one database never overwrite one another.

A gateway touches its rows at least every :data:`TOUCH_INTERVAL_S`, so a row older than
:data:`STALE_AFTER_S` comes from a gateway that is gone: one that stops cleanly deletes its
rows; one that crashed leaves rows that turn stale, and that the other gateways delete
once they are older than :data:`FORGET_AFTER_S`. Readers aggregate (:func:`summarize`):
a model is ready if a live gateway has it ready, and a gateway that is gone counts only
when no live one reports the model.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from bastion.store.db import Database, upsert
from bastion.store.tables import model_status

TOUCH_INTERVAL_S = 10.0
STALE_AFTER_S = 3 * TOUCH_INTERVAL_S
# Rows of a gateway that is gone are deleted by the others after this long (until then
# they show what it last saw, marked stale).
FORGET_AFTER_S = 60 * TOUCH_INTERVAL_S
# The longest host name kept in a gateway's name (the column holds 128 characters).
_MAX_HOST_CHARS = 96
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def gateway_name(port: int | None = None) -> str:
    """A name for this gateway process: ``host:port-random`` (the random part makes it
    unique even where hosts share a name, and new at each start)."""
    host = socket.gethostname()[:_MAX_HOST_CHARS] or "gateway"
    where = host if port is None else f"{host}:{port}"
    return f"{where}-{secrets.token_hex(4)}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PublishedStatus:
    name: str
    state: str
    detail: str | None
    restarts: int
    since: datetime
    updated_at: datetime | None = None
    # The gateway that reports it (set on the rows read back).
    gateway: str | None = None

    def key(self) -> tuple[str, str | None, int, datetime]:
        return (self.state, self.detail, self.restarts, self.since)

    def stale(self, now: datetime | None = None) -> bool:
        """True if its gateway has not vouched for this row lately (it may be gone)."""
        if self.updated_at is None:
            return True
        age = ((now or datetime.now(UTC)) - self.updated_at).total_seconds()
        return age > STALE_AFTER_S


def summarize(rows: Sequence[PublishedStatus], now: datetime | None = None) -> PublishedStatus:
    """The one state to show for a model that several gateways report (`rows`, at least
    one): ready if a live gateway has it ready; else what a live gateway saw last; else,
    when every gateway that reported it is gone, the latest (stale) row."""
    if not rows:
        raise ValueError("no rows to summarize")
    now = now or datetime.now(UTC)
    live = [row for row in rows if not row.stale(now)] or list(rows)
    ready = [row for row in live if row.state == "ready"]
    return max(ready or live, key=lambda row: (row.updated_at or _EPOCH, row.gateway or ""))


class StatusBoard:
    """Writes one gateway's rows of the ``model_status`` table and reads every gateway's
    (never bumps the change revision)."""

    def __init__(
        self,
        db: Database,
        gateway: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._db = db
        #: This gateway's name in the table (see :func:`gateway_name`).
        self.gateway = gateway or gateway_name()
        self._clock = clock
        self._now = now
        # None until the first publish, which replaces whatever an earlier process of the
        # same name left.
        self._published: dict[str, tuple[str, str | None, int, datetime]] | None = None
        self._touched = 0.0
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, statuses: Iterable[PublishedStatus]) -> bool:
        """Write this gateway's statuses that changed since the last call (all of them, now
        and then, to show this gateway is alive, and then delete the rows of gateways gone
        for long), delete its others; True if anything was written."""
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
        now = self._now()
        mine = model_status.c.gateway == self.gateway
        with self._db.write(bump_revision=False) as conn:
            if published is None:
                conn.execute(
                    sa.delete(model_status).where(mine, model_status.c.name.not_in(list(current)))
                )
            elif gone:
                conn.execute(
                    sa.delete(model_status).where(mine, model_status.c.name.in_(sorted(gone)))
                )
            for s in sorted(changed, key=lambda status: status.name):
                row = {
                    "state": s.state,
                    # A worker's reason may hold a NUL, which PostgreSQL refuses in text.
                    "detail": s.detail.replace("\0", "") if s.detail is not None else None,
                    "restarts": s.restarts,
                    "since": s.since,
                    "updated_at": now,
                }
                # Only this gateway writes these rows: inserted or updated in place, so
                # that a reader never misses one.
                insert = upsert(conn, model_status).values(gateway=self.gateway, name=s.name, **row)
                conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=[model_status.c.gateway, model_status.c.name], set_=row
                    )
                )
        self._published = {name: status.key() for name, status in current.items()}
        if touch:
            self._touched = self._clock()
            self._forget_gone(now)
        return True

    def _forget_gone(self, now: datetime) -> None:
        """Delete the rows of gateways silent for FORGET_AFTER_S (crashed ones), in a
        transaction of its own: this gateway's rows are written whether or not it works."""
        cutoff = now - timedelta(seconds=FORGET_AFTER_S)
        with self._db.write(bump_revision=False) as conn:
            conn.execute(
                sa.delete(model_status).where(
                    model_status.c.gateway != self.gateway, model_status.c.updated_at < cutoff
                )
            )

    def clear(self) -> None:
        """Remove this gateway's rows, for good: a publish still running or coming later is
        dropped."""
        with self._lock:
            self._closed = True
            with self._db.write(bump_revision=False) as conn:
                conn.execute(sa.delete(model_status).where(model_status.c.gateway == self.gateway))

    def rows(self, name: str | None = None) -> list[PublishedStatus]:
        """Every gateway's rows (of model `name` only, if given), by model and gateway."""
        query = sa.select(model_status).order_by(model_status.c.name, model_status.c.gateway)
        if name is not None:
            query = query.where(model_status.c.name == name)
        with self._db.read() as conn:
            found = conn.execute(query).mappings().all()
        return [
            PublishedStatus(
                name=row["name"],
                state=row["state"],
                detail=row["detail"],
                restarts=row["restarts"],
                since=row["since"],
                updated_at=row["updated_at"],
                gateway=row["gateway"],
            )
            for row in found
        ]

    def read(self, now: datetime | None = None) -> dict[str, PublishedStatus]:
        """One state per model, every gateway's rows summarized (:func:`summarize`)."""
        by_model: dict[str, list[PublishedStatus]] = {}
        for row in self.rows():
            by_model.setdefault(row.name, []).append(row)
        return {name: summarize(rows, now) for name, rows in by_model.items()}
