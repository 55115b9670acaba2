"""The audit log's sink: at once in a CLI, queued and group-committed in a server."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from bastion.audit.events import AUDIT_VERIFY_FAILED, Event
from bastion.audit.log import AuditLog
from bastion.audit.writer import AuditWriter
from bastion.crypto.keyring import KeyRing, LocalKek
from bastion.store.db import SQLITE_BUSY_TIMEOUT_MS, Database

pytestmark = pytest.mark.unit


@pytest.fixture()
def log(tmp_path: Path) -> AuditLog:
    db = Database(f"sqlite:///{tmp_path / 'bastion.db'}")
    db.migrate()
    return AuditLog(db, KeyRing(LocalKek(os.urandom(32))), checkpoint_interval_s=3600)


def test_a_cli_writes_and_signs_each_event_at_once(log: AuditLog) -> None:
    writer = AuditWriter(log)
    writer.emit(Event(kind="tenant.created", actor="local-operator", tenant="acme"))
    writer.emit(Event(kind="key.created", actor="local-operator", tenant="acme"))
    assert [r.action for r in log.records()] == ["tenant.created", "key.created"]
    assert log.checkpoints()[-1].size == 2


def test_a_server_queues_events_and_writes_them_together(log: AuditLog) -> None:
    writer = AuditWriter(log, flush_interval_s=3600)
    writer.start_background()
    try:
        # The writer thread waits on its interval: nothing is written on the caller's time.
        for i in range(50):
            writer.emit(Event(kind="auth.failed", outcome="failure", detail={"n": i}))
        assert log.records() == []
        writer.flush()
        assert len(log.records()) == 50
        writer.emit(Event(kind="server.stopped"))
    finally:
        writer.close()
    assert len(log.records()) == 51
    assert log.checkpoints()[-1].size == 51  # signed as it stopped


def test_a_full_queue_drops_the_oldest_and_counts_them(log: AuditLog) -> None:
    writer = AuditWriter(log, flush_interval_s=3600, max_pending=10, max_batch=1000)
    writer.start_background()
    try:
        for i in range(25):
            writer.emit(Event(kind="auth.failed", detail={"n": i}))
        assert writer.dropped == 15
    finally:
        writer.close()
    assert [r.fields()["detail"]["n"] for r in log.records()] == list(range(15, 25))


def test_events_wait_while_the_database_cannot_be_written(log: AuditLog, tmp_path: Path) -> None:
    log.append([Event(kind="server.started")])
    writer = AuditWriter(log, flush_interval_s=0.01)
    # Another process holds the write lock past SQLite's busy timeout (5 s): the append
    # fails, and the event waits to be retried instead of being lost.
    blocker = sqlite3.connect(tmp_path / "bastion.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    writer.start_background()
    try:
        writer.emit(Event(kind="auth.failed"))
        threading.Event().wait(SQLITE_BUSY_TIMEOUT_MS / 1000 + 1)
        assert writer.written == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    writer.close()
    assert writer.written == 1
    assert [r.action for r in log.records()] == ["server.started", "auth.failed"]


def test_a_failed_verification_is_reported_as_an_event(log: AuditLog) -> None:
    writer = AuditWriter(log)
    for i in range(5):
        writer.emit(Event(kind="key.created", detail={"n": i}))
    seen: list[Event] = []
    writer.on_event = seen.append
    assert writer.verify() is not None and writer.last_verify is not None
    assert writer.last_verify.ok and seen == []
    with log.database.write(bump_revision=False) as conn:
        conn.exec_driver_sql("UPDATE audit_records SET entry = replace(entry, 'key', 'kex')")
    report = writer.verify()
    assert report is not None and not report.ok
    assert [e.kind for e in seen] == [AUDIT_VERIFY_FAILED]
    assert seen[0].detail["problems"] == len(report.problems)


def test_an_event_the_database_refuses_does_not_block_the_others(log: AuditLog) -> None:
    writer = AuditWriter(log, flush_interval_s=0.01)
    writer.start_background()
    try:
        writer.emit(Event(kind="key.created"))
        writer.emit(Event(kind=None))  # type: ignore[arg-type]  # NOT NULL refuses it
        writer.emit(Event(kind="key.revoked"))
        writer.flush()
    finally:
        writer.close()
    actions = [r.action for r in log.records()]
    assert actions == ["key.created", "audit.event_rejected", "key.revoked"]
    assert writer.rejected == 1


def test_a_tampered_log_is_reported_once_and_its_events_wait(log: AuditLog) -> None:
    writer = AuditWriter(log, flush_interval_s=0.01)
    writer.emit(Event(kind="server.started"))
    # Someone with the database but not the key ring adds a record after it.
    with log.database.write(bump_revision=False) as conn:
        conn.exec_driver_sql(
            "INSERT INTO audit_records (seq, at_ms, actor, tenant, action, target, outcome,"
            " entry, mac) SELECT 1, at_ms, actor, tenant, action, target, outcome,"
            " replace(entry, '\"seq\":0', '\"seq\":1'), zeroblob(32) FROM audit_records"
        )
    seen: list[Event] = []
    writer.on_event = seen.append
    writer.start_background()
    try:
        for _ in range(3):
            writer.emit(Event(kind="auth.failed"))
        threading.Event().wait(0.5)
        assert writer.written == 1  # the first, before the tampering
        assert [e.kind for e in seen] == [AUDIT_VERIFY_FAILED]
        assert "was not written by Bastion" in str(seen[0].detail["first"])
    finally:
        writer.close(timeout_s=1)
    assert len(log.records()) == 2  # nothing signed or written on top of the forgery


def test_a_verification_that_cannot_run_is_a_failed_verification(log: AuditLog) -> None:
    writer = AuditWriter(log)
    writer.emit(Event(kind="server.started"))
    with log.database.write(bump_revision=False) as conn:
        conn.exec_driver_sql("UPDATE audit_keys SET public_key = zeroblob(32)")
    seen: list[Event] = []
    writer.on_event = seen.append
    report = writer.verify()
    assert report is not None and not report.ok
    assert [e.kind for e in seen] == [AUDIT_VERIFY_FAILED]


def test_a_flush_of_an_idle_writer_returns_at_once(log: AuditLog) -> None:
    # The writer sleeps up to the checkpoint interval (an hour here) when idle; a flush
    # wakes it instead of timing out (it returns False when it times out).
    writer = AuditWriter(log, checkpoint_interval_s=3600)
    writer.start_background()
    try:
        threading.Event().wait(0.2)
        assert all(writer.flush(timeout_s=5) for _ in range(3))
        writer.emit(Event(kind="key.created"))
        assert writer.flush(timeout_s=5)
        assert len(log.records()) == 1
    finally:
        writer.close()
