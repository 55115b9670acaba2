"""The gateway's protection desk: acting on the workers' extraction reports."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from bastion.audit.events import MemoryEventSink
from bastion.errors import ExtractionSuspected, RateLimited
from bastion.gateway.protection import ProtectionDesk
from bastion.identity.principal import OPERATOR
from bastion.models.risk import RiskBoard, RiskRecord
from bastion.observability.metrics import Metrics
from bastion.protection.monitor import MonitorPolicy
from bastion.store.db import Database
from bastion.wire.protocol import Caller, ExtractionRisk


def _report(level: str, risk: float, key: str = "k1") -> ExtractionRisk:
    return ExtractionRisk(
        caller=Caller(tenant="acme", key=key),
        risk=risk,
        level=level,
        queries=120,
        signals={"ood": risk, "prada": 0.1},
    )


def _desk(policy: MonitorPolicy | None = None) -> tuple[ProtectionDesk, MemoryEventSink, list]:
    events = MemoryEventSink()
    cleared: list[tuple[str, str]] = []
    desk = ProtectionDesk(
        events,
        Metrics(),
        policy_of=lambda model, tenant, key: policy or MonitorPolicy(),
        clear_worker=lambda model, key: cleared.append((model, key)),
    )
    for key in ("k1", "k2"):
        desk.saw(key, "acme", "digits")
    return desk, events, cleared


def test_a_block_refuses_the_key_on_that_model_only() -> None:
    desk, events, _ = _desk()
    desk.check("k1", "digits")
    desk.reported("digits", _report("alert", 0.8))
    desk.check("k1", "digits")
    desk.reported("digits", _report("block", 1.4))
    with pytest.raises(ExtractionSuspected) as refused:
        desk.check("k1", "digits")
    assert refused.value.status == 403 and refused.value.code == "extraction_suspected"
    desk.check("k1", "other-model")
    desk.check("k2", "digits")
    assert events.kinds() == ["protect.extraction_suspected", "protect.key_blocked"]
    blocked = events.events[-1]
    assert (blocked.actor, blocked.tenant, blocked.target) == ("k1", "acme", "digits")
    assert blocked.detail["risk"] == 1.4 and blocked.detail["signal_ood"] == 1.4


def test_a_lower_report_after_a_block_does_not_lift_it() -> None:
    desk, _, _ = _desk()
    desk.reported("digits", _report("block", 1.4))
    desk.reported("digits", _report("ok", 0.1))
    with pytest.raises(ExtractionSuspected):
        desk.check("k1", "digits")
    assert desk.snapshot()[0].level == "block"


def test_a_throttled_key_passes_at_the_policy_rate() -> None:
    desk, events, _ = _desk(MonitorPolicy(throttle_at=0.8, throttle_rps=0.5))
    desk.reported("digits", _report("throttle", 0.9))
    desk.check("k1", "digits")
    with pytest.raises(RateLimited) as slowed:
        desk.check("k1", "digits")
    assert slowed.value.code == "extraction_throttled"
    assert int(slowed.value.headers["retry-after"]) >= 1
    assert events.kinds() == ["protect.key_throttled"]


def test_blocks_persist_and_a_clear_reaches_the_gateway_and_the_worker(db: Database) -> None:
    desk, _, cleared = _desk()
    board = RiskBoard(db, MemoryEventSink())
    before = db.revision()
    desk.reported("digits", _report("alert", 0.8, key="k2"))
    desk.reported("digits", _report("block", 1.4))
    desk.flush(board)
    # A block bumps the revision: every gateway picks it up.
    assert db.revision() > before
    blocked, present = board.pairs()
    assert blocked == {("k1", "digits")} and present == {("k1", "digits"), ("k2", "digits")}
    rows = {r.key_id: r for r in board.read()}
    assert rows["k1"].blocked and rows["k1"].signals == {"ood": 1.4, "prada": 0.1}
    # Another gateway learns of it from the database.
    other, _, _ = _desk()
    other.update_blocked(blocked, present)
    with pytest.raises(ExtractionSuspected):
        other.check("k1", "digits")
    # An admin clears k1: both lift it; the worker forgets k1's history.
    assert board.clear(OPERATOR, "k1") == 1
    desk.update_blocked(*board.pairs())
    desk.check("k1", "digits")
    assert cleared == [("digits", "k1")]
    assert [r.key_id for r in board.read()] == ["k2"]


def test_a_score_never_unblocks_in_the_database(db: Database) -> None:
    board = RiskBoard(db)
    at = datetime.now(UTC)
    board.record([RiskRecord("k", "m", "t", 2.0, "block", 60, blocked_at=at, new_block=True)])
    board.record([RiskRecord("k", "m", "t", 0.1, "ok", 200)])
    (row,) = board.read()
    assert row.blocked and row.level == "block" and row.queries == 200


def test_clearing_needs_an_admin_and_is_an_event(db: Database) -> None:
    from bastion.errors import PermissionDenied
    from bastion.identity.principal import Principal

    events = MemoryEventSink()
    board = RiskBoard(db, events)
    blocked = RiskRecord(
        "k", "m", "t", 2.0, "block", 60, blocked_at=datetime.now(UTC), new_block=True
    )
    board.record([blocked])
    consumer = Principal(key_id="c", tenant_id=1, tenant_name="t", role="consumer")
    with pytest.raises(PermissionDenied):
        board.clear(consumer, "k")
    assert board.clear(OPERATOR, "k") == 1
    assert events.kinds() == ["protect.key_cleared"]
    assert board.clear(OPERATOR, "k") == 0


def test_a_worker_cannot_report_on_callers_it_never_served_or_name_their_tenant() -> None:
    """A worker runs model code: a report on a key sent to another model is ignored, and
    the tenant of a report is the gateway's, whatever the worker says."""
    desk, events, _ = _desk()
    desk.reported("other-model", _report("block", 5.0))
    desk.check("k1", "other-model")
    lying = ExtractionRisk(
        caller=Caller(tenant="victim-tenant", key="k1"), risk=0.9, level="alert", queries=60
    )
    desk.reported("digits", lying)
    assert events.events[-1].tenant == "acme"
    assert desk.snapshot()[0].tenant == "acme"


def test_watermark_records_are_checked_before_they_are_kept() -> None:
    from bastion.models.marks import MarksStore
    from bastion.wire.protocol import WatermarkRecord

    desk, _, _ = _desk()
    good = WatermarkRecord(
        caller=Caller(tenant="x", key="k1"), kind="marks", classes=10, count=1, blob=b"s" * 100
    )
    for bad in (
        msgspec.structs.replace(good, kind="secrets"),
        msgspec.structs.replace(good, classes=1),
        msgspec.structs.replace(good, blob=b"s" * (5 * 1024 * 1024)),
        msgspec.structs.replace(good, caller=Caller(tenant="x", key="never-seen")),
    ):
        desk.notice("digits", bad)
    desk.notice("digits", good)
    # Two records per request sent: no more (the fixture sent none beyond its two keys).
    for _ in range(5):
        desk.notice("digits", good)

    class Store(MarksStore):
        def __init__(self) -> None:
            self.added: list[object] = []

        def add(self, records: object) -> None:
            self.added.extend(records)  # type: ignore[call-overload]

    store = Store()
    desk.flush_records(store)
    kept = [(r.key_id, r.tenant) for r in store.added]  # type: ignore[attr-defined]
    assert kept == [("k1", "acme")] * 4


@pytest.mark.parametrize(
    "bad",
    [
        {"risk": float("nan")},
        {"risk": -1.0},
        {"queries": 2**63},
        {"signals": {"exfiltrated": 1.0}},
        {"signals": {"ood": float("inf")}},
        {"level": "nuke"},
    ],
)
def test_a_malformed_report_is_ignored(bad: dict[str, object]) -> None:
    desk, events, _ = _desk()
    desk.reported("digits", msgspec.structs.replace(_report("block", 5.0), **bad))
    desk.check("k1", "digits")
    assert desk.snapshot() == [] and events.events == []


def test_a_report_racing_an_admin_clear_does_not_block_the_key_again(db: Database) -> None:
    desk, _, cleared = _desk()
    board = RiskBoard(db, MemoryEventSink())
    desk.reported("digits", _report("block", 1.4))
    desk.flush(board)
    desk.update_blocked(*board.pairs())
    # The admin clears k1; before this gateway's next refresh, k1's worker reports again.
    board.clear(OPERATOR, "k1")
    desk.reported("digits", _report("block", 1.5))
    desk.flush(board)
    blocked, present = board.pairs()
    assert ("k1", "digits") not in blocked
    desk.update_blocked(blocked, present)
    desk.check("k1", "digits")
    assert cleared == [("digits", "k1")]
    # Still attacking after the clear (a fresh history in the worker): blocked anew.
    desk.reported("digits", _report("block", 1.6))
    with pytest.raises(ExtractionSuspected):
        desk.check("k1", "digits")
    desk.flush(board)
    assert ("k1", "digits") in board.pairs()[0]
