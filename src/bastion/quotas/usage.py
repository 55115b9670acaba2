"""Metering: requests, tokens and worker compute seconds per tenant, model and hour.

The gateway adds to an in-memory :class:`UsageMeter` on the hot path (a dict update under
a lock, and one line appended to its journal: :mod:`bastion.quotas.journal`) and flushes
it to the ``usage`` table every few seconds and when it stops; rows of the same tenant,
model and hour add up, so several gateways can share one database. What a gateway killed
before its flush had recorded is added by the next one to start (:meth:`UsageMeter.recover`).
:func:`usage_report` reads it back for ``bastion usage`` and ``/admin/v1/usage``. Nothing
here ever holds a key or a payload: tenants and model names only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bastion.errors import InvalidRequest
from bastion.quotas.journal import UsageJournal, leftovers
from bastion.store.db import Database, upsert
from bastion.store.tables import usage, usage_flushes

_HOUR_S = 3600
GROUPS = ("hour", "day", "total")


@dataclass(slots=True)
class Counts:
    requests: int = 0
    refused: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compute_seconds: float = 0.0

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.refused += other.refused
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.compute_seconds += other.compute_seconds


class UsageMeter:
    """Usage not yet written, per (tenant, model, hour); thread-safe. With a journal
    directory, every record is also on disk until it is in the database."""

    def __init__(
        self,
        db: Database,
        clock: Callable[[], float] = time.time,
        journal_dir: Path | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, int], Counts] = {}
        self._journal_dir = journal_dir
        self._journal = UsageJournal(journal_dir) if journal_dir is not None else None
        # Journal files whose records are in `_pending` (a flush that failed keeps them).
        self._journal_files: list[Path] = []

    def record(
        self,
        tenant: str,
        model: str,
        *,
        requests: int = 0,
        refused: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        compute_seconds: float = 0.0,
    ) -> None:
        hour = int(self._clock() // _HOUR_S) * _HOUR_S
        with self._lock:
            counts = self._pending.get((tenant, model, hour))
            if counts is None:
                counts = self._pending[(tenant, model, hour)] = Counts()
            counts.requests += requests
            counts.refused += refused
            counts.prompt_tokens += prompt_tokens
            counts.completion_tokens += completion_tokens
            counts.compute_seconds += compute_seconds
            if self._journal is not None:
                self._journal.append(
                    (tenant, model, hour, requests, refused, prompt_tokens, completion_tokens,
                     compute_seconds)
                )  # fmt: skip

    def sync(self) -> None:
        """Write the journal's records not written yet: they are by the end of the event
        loop's turn, and this comes first for an answer sent in the turn (a refusal)."""
        if self._journal is not None:
            self._journal.sync()

    def flush(self) -> None:
        """Add what was recorded to the database. On failure it is kept for the next try."""
        with self._lock:
            pending, self._pending = self._pending, {}
            files, self._journal_files = self._journal_files, []
            if pending and self._journal is not None:
                try:
                    files.append(self._journal.rotate())
                except OSError:
                    # The records must leave the journal with the counts: try again later.
                    self._pending, self._journal_files = pending, files
                    raise
        if not pending and not files:
            return
        try:
            with self._db.write(bump_revision=False) as conn:
                _add_rows(conn, pending)
                _mark_flushed(conn, [f.name for f in files], self._now())
        except Exception:
            with self._lock:
                for key, counts in pending.items():
                    self._pending.setdefault(key, Counts()).add(counts)
                self._journal_files = files + self._journal_files
            raise
        for path in files:
            path.unlink(missing_ok=True)

    def recover(self) -> int:
        """Add the usage that gateways killed before their flush left in their journals
        (each file once: those already flushed are only deleted); returns the records."""
        if self._journal_dir is None:
            return 0
        found = list(leftovers(self._journal_dir))
        if not found:
            return 0
        names = [leftover.path.name for leftover in found]
        with self._db.write(bump_revision=False) as conn:
            # Claimed first: of two gateways recovering the same files at once, only the
            # one whose claim inserted a file's name adds its records.
            claimed = _mark_flushed(conn, names, self._now())
            totals: dict[tuple[str, str, int], Counts] = {}
            recovered = 0
            for leftover in found:
                if leftover.path.name not in claimed:
                    continue
                for tenant, model, hour, *numbers in leftover.records:
                    totals.setdefault((tenant, model, hour), Counts()).add(
                        Counts(*numbers)  # type: ignore[arg-type]
                    )
                    recovered += 1
            _add_rows(conn, totals)
        for leftover in found:
            leftover.path.unlink(missing_ok=True)
        return recovered

    def close(self) -> None:
        """After the last flush: the journal is empty and goes."""
        if self._journal is not None:
            with self._lock:
                if not self._pending:
                    self._journal.close()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)


# Flushed journals are remembered this long (a replay within it is recognised).
_FLUSHES_KEPT = timedelta(days=7)


def _mark_flushed(conn: Connection, names: list[str], now: datetime) -> set[str]:
    """Record the journals as flushed; the names this transaction recorded (not those
    recorded before, or by a concurrent transaction that committed first)."""
    claimed: set[str] = set()
    if names:
        insert = upsert(conn, usage_flushes).values(
            [{"journal": n, "flushed_at": now} for n in names]
        )
        claimed = set(
            conn.execute(
                insert.on_conflict_do_nothing().returning(usage_flushes.c.journal)
            ).scalars()
        )
    conn.execute(sa.delete(usage_flushes).where(usage_flushes.c.flushed_at < now - _FLUSHES_KEPT))
    return claimed


def _add_rows(conn: Connection, totals: dict[tuple[str, str, int], Counts]) -> None:
    """Add each count to its row, made if missing: one INSERT … ON CONFLICT DO UPDATE per
    row, so gateways flushing the same row at the same moment add up (an UPDATE, then an
    INSERT when it found nothing, would fail for one of them on PostgreSQL). In key order,
    so that two flushes lock shared rows in the same order and cannot deadlock."""
    for (tenant, model, hour), counts in sorted(totals.items(), key=lambda item: item[0]):
        values = asdict(counts)
        insert = upsert(conn, usage).values(
            tenant=tenant, model=model, hour=datetime.fromtimestamp(hour, UTC), **values
        )
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=[usage.c.tenant, usage.c.model, usage.c.hour],
                set_={name: getattr(usage.c, name) + insert.excluded[name] for name in values},
            )
        )


def usage_report(
    db: Database,
    *,
    since: datetime,
    until: datetime | None = None,
    tenant: str | None = None,
    model: str | None = None,
    group: str = "total",
) -> list[dict[str, Any]]:
    """Usage rows per tenant and model, summed per hour, per day (UTC) or over the whole
    period. Hours are whole: `since` counts from the start of its hour."""
    if group not in GROUPS:
        raise InvalidRequest(f"group must be one of {', '.join(GROUPS)}.", param="group")
    start = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    query = sa.select(usage).where(usage.c.hour >= start)
    if until is not None:
        query = query.where(usage.c.hour < until)
    if tenant is not None:
        query = query.where(usage.c.tenant == tenant)
    if model is not None:
        query = query.where(usage.c.model == model)
    totals: dict[tuple[str, str, str | None], Counts] = {}
    with db.read() as conn:
        for row in conn.execute(query.order_by(usage.c.hour)).mappings():
            period = _period(row["hour"], group)
            counts = totals.setdefault((row["tenant"], row["model"], period), Counts())
            counts.add(
                Counts(
                    requests=row["requests"],
                    refused=row["refused"],
                    prompt_tokens=row["prompt_tokens"],
                    completion_tokens=row["completion_tokens"],
                    compute_seconds=row["compute_seconds"],
                )
            )
    rows = []
    for (row_tenant, row_model, period), counts in sorted(
        totals.items(), key=lambda item: (item[0][2] or "", item[0][0], item[0][1])
    ):
        rows.append(
            {
                **({"period": period} if group != "total" else {}),
                "tenant": row_tenant,
                "model": row_model,
                **asdict(counts),
                "total_tokens": counts.prompt_tokens + counts.completion_tokens,
                "compute_seconds": round(counts.compute_seconds, 6),
            }
        )
    return rows


def _period(hour: datetime, group: str) -> str | None:
    if group == "hour":
        return hour.isoformat()
    if group == "day":
        return hour.date().isoformat()
    return None


# How far back `since` may reach: further than any usage kept, well inside datetime's range.
MAX_LOOKBACK = timedelta(days=100 * 366)


def parse_since(value: str, now: datetime) -> datetime:
    """`24h`, `7d`, `90m`, `30s` before `now`, or an ISO 8601 date or timestamp (UTC if no
    zone is given); InvalidRequest (400) for anything else, or more than 100 years back."""
    text = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:].lower() in units:
        try:
            seconds = float(text[:-1]) * units[text[-1].lower()]
        except ValueError:
            seconds = -1.0
        if 0 <= seconds <= MAX_LOOKBACK.total_seconds():
            return now - timedelta(seconds=seconds)
        if seconds > MAX_LOOKBACK.total_seconds():
            raise _out_of_range()
    try:
        parsed = datetime.fromisoformat(text)
        parsed = parsed.astimezone(UTC) if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(
            "since must be a duration (30m, 24h, 7d) or an ISO 8601 date or timestamp.",
            param="since",
        ) from None
    if parsed < now - MAX_LOOKBACK:
        raise _out_of_range()
    return parsed


def _out_of_range() -> InvalidRequest:
    return InvalidRequest("since may reach back at most 100 years.", param="since")
