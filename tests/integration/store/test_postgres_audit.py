"""The tamper-evident audit log on both backends: appends, checkpoints, verification and
pruning; and two gateways (two Database objects) appending to one log at once, from its
very first record, keep one log that verifies, also while they append."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import sqlalchemy as sa
from store_testing import run_threads

from bastion.audit.events import Event
from bastion.audit.log import AuditLog
from bastion.audit.verify import VerifyReport, verify_log
from bastion.crypto.keyring import KeyRing, LocalKek
from bastion.store.db import Database
from bastion.store.tables import audit_keys

BATCHES = 40
PER_BATCH = 5


def _verify(log: AuditLog) -> VerifyReport:
    keys = log.own_keys()
    assert keys is not None
    return verify_log(log.database, keys[0], mac_key=keys[1])


def test_appends_checkpoints_verification_and_pruning(
    open_database: Callable[[], Database],
) -> None:
    keyring = KeyRing(LocalKek(os.urandom(32)))
    now = [1_800_000_000.0]
    log = AuditLog(
        open_database(), keyring, origin="test/audit", checkpoint_every=4, clock=lambda: now[0]
    )
    for i in range(10):
        log.append([Event(kind="key.created", at=now[0], detail={"n": i, "text": "é\x00"})])
        now[0] += 60
    log.checkpoint(force=True)
    report = _verify(log)
    assert report.ok, report.problems
    assert (report.size, report.latest_checkpoint) == (10, 10)
    other = AuditLog(open_database(), keyring, clock=lambda: now[0])
    assert [r.seq for r in other.records()] == list(range(10))
    assert other.records()[3].fields()["detail"] == {"n": 3, "text": "é"}
    assert other.prune(retention_s=60 * 6.5) == 4  # the records of the first 4 minutes
    assert _verify(other).ok
    # A record edited behind the log's back is found.
    with other.database.write(bump_revision=False) as conn:
        conn.exec_driver_sql("UPDATE audit_records SET actor = 'mallory' WHERE seq = 7")
    assert not _verify(log).ok


def test_two_gateways_appending_at_once_keep_one_log(
    open_database: Callable[[], Database],
) -> None:
    keyring = KeyRing(LocalKek(os.urandom(32)))
    # Two gateways, no record yet: both race to make the log's signing key too.
    logs = [AuditLog(open_database(), keyring, checkpoint_every=16) for _ in range(2)]
    appending = threading.Event()
    reports: list[VerifyReport] = []

    def append(log: AuditLog, gateway: int) -> Callable[[], None]:
        def run() -> None:
            for batch in range(BATCHES):
                events = [
                    Event(kind="auth.failed", actor=f"gw{gateway}", detail={"b": batch, "i": i})
                    for i in range(PER_BATCH)
                ]
                log.append(events, checkpoint=batch % 7 == 0)
                appending.set()

        return run

    def verify_meanwhile() -> None:
        # Each verification reads one snapshot: it never sees half of another's append.
        assert appending.wait(60)
        for _ in range(5):
            reports.append(_verify(logs[0]))

    run_threads(append(logs[0], 0), append(logs[1], 1), verify_meanwhile)
    assert all(r.ok for r in reports), [r.problems for r in reports]
    logs[1].checkpoint(force=True)
    final = _verify(logs[0])
    assert final.ok, final.problems
    assert final.size == final.latest_checkpoint == 2 * BATCHES * PER_BATCH
    records = logs[1].records()
    assert [r.seq for r in records] == list(range(2 * BATCHES * PER_BATCH))
    assert {r.actor for r in records} == {"gw0", "gw1"}
    # Each gateway's batches stayed whole and in order.
    for gateway in ("gw0", "gw1"):
        batches = [r.fields()["detail"]["b"] for r in records if r.actor == gateway]
        assert batches == sorted(batches)
    with logs[0].database.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_keys)).scalar() == 1
