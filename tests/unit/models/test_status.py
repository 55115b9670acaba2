"""The status board: live model states copied to the database for `bastion models list`,
one row per gateway and model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bastion.models.status import (
    FORGET_AFTER_S,
    STALE_AFTER_S,
    TOUCH_INTERVAL_S,
    PublishedStatus,
    StatusBoard,
    gateway_name,
    summarize,
)
from bastion.store.db import Database

SINCE = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def status(name: str, state: str = "ready", detail: str | None = None) -> PublishedStatus:
    return PublishedStatus(name=name, state=state, detail=detail, restarts=0, since=SINCE)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class WallClock:
    """The time rows are stamped with, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def states(board: StatusBoard) -> dict[str, str]:
    return {name: row.state for name, row in board.read().items()}


def test_a_gateway_restarted_under_its_name_replaces_what_it_left(db: Database) -> None:
    crashed = StatusBoard(db, "gw-a")
    crashed.publish([status("old"), status("kept", "loading")])
    # The same gateway again: its first publish forgets what it no longer serves.
    board = StatusBoard(db, "gw-a")
    board.publish([status("kept")])
    assert states(board) == {"kept": "ready"}


def test_gateways_keep_their_own_rows(db: Database) -> None:
    first, second = StatusBoard(db, "gw-1"), StatusBoard(db, "gw-2")
    first.publish([status("a"), status("b", "loading")])
    # A second gateway starting up deletes none of the first one's rows.
    second.publish([status("b"), status("c", "failed", "bad weights")])
    rows = {(row.gateway, row.name): row.state for row in first.rows()}
    assert rows == {
        ("gw-1", "a"): "ready",
        ("gw-1", "b"): "loading",
        ("gw-2", "b"): "ready",
        ("gw-2", "c"): "failed",
    }
    # Ready on any gateway: ready.
    assert states(first) == {"a": "ready", "b": "ready", "c": "failed"}
    assert [row.gateway for row in first.rows("b")] == ["gw-1", "gw-2"]
    # A model one gateway stops serving goes from its rows only.
    second.publish([status("c", "failed", "bad weights")])
    assert [row.gateway for row in first.rows("b")] == ["gw-1"]
    # A gateway that stops clears its own rows, not the other's.
    first.clear()
    assert {(row.gateway, row.name) for row in second.rows()} == {("gw-2", "c")}


def test_a_crashed_gateways_rows_turn_stale_and_are_forgotten(db: Database) -> None:
    wall, clock = WallClock(), Clock()
    crashed = StatusBoard(db, "gw-dead", now=wall)
    crashed.publish([status("a", "failed", "out of memory"), status("gone")])
    alive = StatusBoard(db, "gw-live", clock=clock, now=wall)
    alive.publish([status("a", "loading")])
    # Both are live, and neither has it ready: the latest news wins.
    wall.now += timedelta(seconds=1)
    clock.now += 1
    alive.publish([status("a", "loading", "second try")])
    assert alive.read(wall.now)["a"].detail == "second try"
    # The crashed gateway stops vouching for its rows: a live gateway's state is shown,
    # and a model only it reported is shown stale.
    wall.now += timedelta(seconds=STALE_AFTER_S + 1)
    clock.now += TOUCH_INTERVAL_S
    alive.publish([status("a", "loading", "second try")])
    read = alive.read(wall.now)
    assert read["a"].gateway == "gw-live" and not read["a"].stale(wall.now)
    assert read["gone"].gateway == "gw-dead" and read["gone"].stale(wall.now)
    # Long silent, its rows are deleted at the next touch of a live gateway.
    wall.now += timedelta(seconds=FORGET_AFTER_S)
    clock.now += TOUCH_INTERVAL_S
    alive.publish([status("a", "loading", "second try")])
    assert {(row.gateway, row.name) for row in alive.rows()} == {("gw-live", "a")}


def test_summary_prefers_live_and_ready_rows() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    fresh, old = now - timedelta(seconds=1), now - timedelta(seconds=STALE_AFTER_S + 5)

    def row(gateway: str, state: str, updated: datetime) -> PublishedStatus:
        return PublishedStatus("m", state, None, 0, SINCE, updated_at=updated, gateway=gateway)

    assert summarize([row("1", "failed", fresh), row("2", "ready", fresh)], now).gateway == "2"
    # A ready row of a gateway that is gone does not make the model ready.
    assert summarize([row("1", "failed", fresh), row("2", "ready", old)], now).gateway == "1"
    assert summarize(
        [row("1", "failed", old - timedelta(1)), row("2", "ready", old)], now
    ).state == ("ready")
    with pytest.raises(ValueError):
        summarize([], now)


def test_gateway_names_are_unique_and_fit() -> None:
    names = {gateway_name(8000) for _ in range(50)}
    assert len(names) == 50
    assert all(":8000-" in name and len(name) <= 128 for name in names)


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
