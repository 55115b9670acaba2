"""The status board: live model states copied to the database for `bastion models list`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bastion.models.status import STALE_AFTER_S, TOUCH_INTERVAL_S, PublishedStatus, StatusBoard
from bastion.store.db import Database

SINCE = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def status(name: str, state: str = "ready", detail: str | None = None) -> PublishedStatus:
    return PublishedStatus(name=name, state=state, detail=detail, restarts=0, since=SINCE)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_new_gateway_replaces_what_a_crashed_one_left(db: Database) -> None:
    crashed = StatusBoard(db)
    crashed.publish([status("old"), status("kept", "loading")])
    # The next gateway does not serve "old": its first publish forgets it.
    board = StatusBoard(db)
    board.publish([status("kept")])
    assert {name: row.state for name, row in board.read().items()} == {"kept": "ready"}


def test_only_changes_are_written_until_the_periodic_touch(db: Database) -> None:
    clock = Clock()
    board = StatusBoard(db, clock=clock)
    assert board.publish([status("a"), status("b")])
    first = board.read()["a"].updated_at
    assert not board.publish([status("a"), status("b")])
    assert board.publish([status("a", "integrity_failed", "x: does not decrypt"), status("b")])
    rows = board.read()
    assert rows["a"].state == "integrity_failed" and rows["a"].detail == "x: does not decrypt"
    assert rows["b"].updated_at == first
    # A model that went away is deleted.
    assert board.publish([status("a", "integrity_failed", "x: does not decrypt")])
    assert set(board.read()) == {"a"}
    # Past the touch interval every row is written again, to show the gateway is alive.
    clock.now += TOUCH_INTERVAL_S
    assert board.publish([status("a", "integrity_failed", "x: does not decrypt")])
    assert board.read()["a"].updated_at is not None
    assert board.read()["a"].updated_at >= first  # type: ignore[operator]


def test_rows_nobody_touches_turn_stale(db: Database) -> None:
    board = StatusBoard(db)
    board.publish([status("a")])
    row = board.read()["a"]
    assert not row.stale()
    assert row.updated_at is not None
    assert row.stale(row.updated_at + timedelta(seconds=STALE_AFTER_S + 1))


def test_clear_is_final(db: Database) -> None:
    board = StatusBoard(db)
    board.publish([status("a")])
    board.clear()
    assert board.read() == {}
    # A publish that was on its way when the gateway stopped writes nothing.
    assert not board.publish([status("a")])
    assert board.read() == {}
