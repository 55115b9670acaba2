"""Metering: usage adds up per tenant, model and hour, and reads back by period."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from bastion.api.admin import parse_expiry
from bastion.errors import InvalidRequest, StorageUnavailable
from bastion.quotas.usage import UsageMeter, parse_since, usage_report
from bastion.store.db import Database

# 2026-11-27 12:00:00 UTC
NOON = 1_795_780_800.0
T0 = datetime.fromtimestamp(NOON, UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOON

    def __call__(self) -> float:
        return self.now


def test_usage_adds_up_across_flushes_and_meters(db: Database) -> None:
    clock = Clock()
    meter = UsageMeter(db, clock)
    meter.record("acme", "echo", requests=1)
    meter.record("acme", "echo", prompt_tokens=5, completion_tokens=7, compute_seconds=0.25)
    meter.flush()
    # A second gateway on the same database adds to the same row.
    other = UsageMeter(db, clock)
    other.record("acme", "echo", requests=1, refused=1, compute_seconds=0.5)
    other.flush()
    meter.flush()  # nothing pending: no change
    clock.now += 3600
    meter.record("acme", "echo", requests=2, prompt_tokens=1)
    meter.record("globex", "echo", requests=1)
    meter.flush()
    total = usage_report(db, since=T0, tenant="acme")
    assert total == [
        {
            "tenant": "acme",
            "model": "echo",
            "requests": 4,
            "refused": 1,
            "prompt_tokens": 6,
            "completion_tokens": 7,
            "total_tokens": 13,
            "compute_seconds": 0.75,
        }
    ]
    hourly = usage_report(db, since=T0, tenant="acme", group="hour")
    assert [(r["period"], r["requests"]) for r in hourly] == [
        (T0.isoformat(), 2),
        ((T0 + timedelta(hours=1)).isoformat(), 2),
    ]
    # `since` counts from the start of its hour; `until` ends before its hour.
    later = usage_report(db, since=T0 + timedelta(minutes=90))
    assert {(r["tenant"], r["requests"]) for r in later} == {("acme", 2), ("globex", 1)}
    assert (
        usage_report(db, since=T0, until=T0 + timedelta(hours=1), tenant="acme")[0]["requests"] == 2
    )
    daily = usage_report(db, since=T0, group="day", model="echo")
    assert {r["period"] for r in daily} == {"2026-11-27"}
    with pytest.raises(InvalidRequest):
        usage_report(db, since=T0, group="week")


def test_a_failed_flush_keeps_the_usage_for_the_next(db: Database) -> None:
    meter = UsageMeter(db, Clock())
    meter.record("acme", "echo", requests=3)
    with db.write(bump_revision=False) as conn:
        conn.execute(sa.text("ALTER TABLE usage RENAME TO usage_away"))
    with pytest.raises(StorageUnavailable):
        meter.flush()
    with db.write(bump_revision=False) as conn:
        conn.execute(sa.text("ALTER TABLE usage_away RENAME TO usage"))
    meter.record("acme", "echo", requests=1)
    meter.flush()
    assert usage_report(db, since=T0)[0]["requests"] == 4


def test_parse_since() -> None:
    now = T0
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since("2026-11-01T10:00:00+01:00", now).astimezone(UTC).hour == 9
    for bad in ("yesterday", "-5h", "h", ""):
        with pytest.raises(InvalidRequest):
            parse_since(bad, now)
    # Out of any range: an OverflowError (a 500) before.
    for bad in ("99999999999d", "1e309h", "inf", "nanh", "0001-01-01T00:00:00+01:00",
                "9999-12-31T23:59:59-01:00", "1800-01-01"):  # fmt: skip
        with pytest.raises(InvalidRequest, match="since"):
            parse_since(bad, now)
    assert parse_since("36500d", now) == now - timedelta(days=36500)


def test_parse_expiry() -> None:
    assert parse_expiry(None) is None
    assert parse_expiry("2030-01-01T01:00:00+01:00") == datetime(2030, 1, 1, tzinfo=UTC)
    for bad in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "1969-12-31T00:00Z",
                "2030-01-01T00:00:00", "tomorrow"):  # fmt: skip
        with pytest.raises(InvalidRequest):
            parse_expiry(bad)


def _total(db: Database) -> tuple[int, int, int]:
    rows = usage_report(db, since=T0 - timedelta(days=1))
    return (
        sum(r["requests"] for r in rows),
        sum(r["prompt_tokens"] for r in rows),
        sum(r["completion_tokens"] for r in rows),
    )


def test_a_gateway_killed_before_its_flush_loses_no_usage(db: Database, tmp_path: Path) -> None:
    journal = tmp_path / "usage"
    dead = UsageMeter(db, Clock(), journal_dir=journal)
    dead.record("acme", "echo", requests=1)
    dead.record("acme", "echo", prompt_tokens=3, completion_tokens=5, compute_seconds=0.5)
    dead.flush()
    dead.record("acme", "echo", requests=2, prompt_tokens=7)
    # It dies here (kill -9): no flush, its file lock goes with its process.
    dead._journal._fd = os.close(dead._journal._fd) or -1  # type: ignore[union-attr]
    assert _total(db) == (1, 3, 5)
    # A live gateway's journal is not taken from it.
    alive = UsageMeter(db, Clock(), journal_dir=journal)
    alive.record("acme", "echo", requests=100)
    assert alive.recover() == 1
    assert _total(db) == (3, 10, 5)
    assert alive.recover() == 0
    alive.flush()
    assert _total(db) == (103, 10, 5)


def test_a_journal_flushed_just_before_the_death_is_not_counted_twice(
    db: Database, tmp_path: Path
) -> None:
    journal = tmp_path / "usage"
    dead = UsageMeter(db, Clock(), journal_dir=journal)
    dead.record("acme", "echo", requests=1, prompt_tokens=4)
    files = list(journal.iterdir())
    # The flush committed, and the process died before it deleted the pending file.
    original_unlink = Path.unlink
    Path.unlink = lambda self, missing_ok=False: None  # type: ignore[assignment,method-assign]
    try:
        dead.flush()
    finally:
        Path.unlink = original_unlink  # type: ignore[method-assign]
    os.close(dead._journal._fd)  # type: ignore[union-attr]
    assert any(p.name.endswith(".pending") for p in journal.iterdir()), files
    assert UsageMeter(db, Clock(), journal_dir=journal).recover() == 0
    assert _total(db) == (1, 4, 0)
    assert not any(p.name.endswith(".pending") for p in journal.iterdir())


def test_a_torn_last_line_is_dropped_and_the_rest_recovered(db: Database, tmp_path: Path) -> None:
    journal = tmp_path / "usage"
    dead = UsageMeter(db, Clock(), journal_dir=journal)
    dead.record("acme", "echo", requests=1)
    dead.record("acme", "echo", requests=1)
    # Torn in the last field: eight fields, all numbers, but no newline.
    os.write(dead._journal._fd, b"acme\techo\t1700000000\t1\t0\t0\t0\t0.")  # type: ignore[union-attr]
    os.close(dead._journal._fd)  # type: ignore[union-attr]
    assert UsageMeter(db, Clock(), journal_dir=journal).recover() == 2
    assert _total(db)[0] == 2
