"""The audit log on a real SQLite database: records, checkpoints, tampering, retention.

Each kind of tampering a database writer could try (edit, delete, insert, reorder,
truncate, roll back, forge a checkpoint, swap the public key) is done with plain SQL, as an
attacker would, and verification must name it. Proofs are checked with a verifier written
here from RFC 9162's definitions, not with the module's own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from bastion.audit.checkpoint import Checkpoint
from bastion.audit.events import Event
from bastion.audit.log import AuditLog, AuditLogError, AuditLogTampered
from bastion.audit.note import Signer, open_note, sign
from bastion.audit.verify import verify_log
from bastion.crypto.keyring import KeyRing, LocalKek
from bastion.store.db import Database

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'bastion.db'}")
    database.migrate()
    return database


@pytest.fixture()
def keyring() -> KeyRing:
    return KeyRing(LocalKek(os.urandom(32)))


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def make_log(db: Database, keyring: KeyRing, clock: Clock, every: int = 8) -> AuditLog:
    return AuditLog(
        db,
        keyring,
        origin="test.example/audit",
        checkpoint_every=every,
        checkpoint_interval_s=3600,
        clock=clock,
    )


def events(n: int, start: int = 0, at: float = 1_800_000_000.0) -> list[Event]:
    return [
        Event(
            kind="key.created",
            actor=f"admin{i % 3}",
            tenant="acme",
            target=f"key{i}",
            detail={"role": "consumer", "n": i},
            at=at + i,
        )
        for i in range(start, start + n)
    ]


def filled(db: Database, keyring: KeyRing, clock: Clock, n: int = 40) -> AuditLog:
    log = make_log(db, keyring, clock)
    for i in range(0, n, 5):
        log.append(events(5, i))
    return log


def report_of(log: AuditLog, *witness: bytes) -> list[str]:
    keys = log.own_keys()
    assert keys is not None
    return verify_log(log.database, keys[0], mac_key=keys[1], witness_notes=witness).problems


def sql(db: Database, statement: str, **params: object) -> None:
    with db.write(bump_revision=False) as conn:
        conn.execute(sa.text(statement), params)


# --------------------------------------------------------------------- RFC 9162, by hand


def rfc_leaf(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def rfc_root_from_path(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2, step by step."""
    fn, sn, r = index, size - 1, leaf
    for p in path:
        assert sn != 0
        if fn % 2 == 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while fn % 2 == 0 and fn != 0:
                fn, sn = fn // 2, sn // 2
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn // 2, sn // 2
    assert sn == 0
    return r


# --------------------------------------------------------------------- the happy path


def test_records_are_numbered_canonical_and_metadata_only(db, keyring, clock) -> None:
    log = filled(db, keyring, clock, 10)
    records = log.records()
    assert [r.seq for r in records] == list(range(10))
    first = records[0]
    entry = json.loads(first.entry)
    assert entry == {
        "v": 1,
        "seq": 0,
        "time": "2027-01-15T08:00:00.000Z",
        "actor": "admin0",
        "tenant": "acme",
        "action": "key.created",
        "target": "key0",
        "outcome": "success",
        "detail": {"role": "consumer", "n": 0},
    }
    assert first.entry == json.dumps(entry, sort_keys=True, separators=(",", ":"))
    assert report_of(log) == []


def test_a_checkpoint_is_signed_every_n_records_and_on_time(db, keyring, clock) -> None:
    log = filled(db, keyring, clock, 40)
    # Appends of 5 with N = 8: the first append (no checkpoint yet), then whenever 8 or
    # more records wait.
    assert [c.size for c in log.checkpoints()] == [5, 15, 25, 35]
    verifier = log.own_verifier()
    assert verifier is not None
    for stored in log.checkpoints():
        text, names = open_note(stored.note.encode(), [verifier])
        assert names == ["test.example/audit"]
        assert Checkpoint.parse(text).size == stored.size
    log.append(events(1, 40))
    assert log.checkpoints()[-1].size == 35  # 6 waiting: not due yet
    assert log.checkpoint() is False
    clock.now += 3601
    assert log.checkpoint() is True
    assert log.checkpoints()[-1].size == 41


def test_inclusion_proofs_check_with_an_independent_verifier(db, keyring, clock) -> None:
    from bastion.audit import merkle

    log = filled(db, keyring, clock, 37)
    leaves = log.leaves(37)
    verifier = log.own_verifier()
    assert verifier is not None
    note = next(c.note for c in log.checkpoints() if c.size == 35)
    root = Checkpoint.parse(open_note(note.encode(), [verifier])[0]).root
    for record in log.records(limit=35):
        path = merkle.inclusion_proof(record.seq, list(leaves)[:35])
        assert rfc_root_from_path(record.seq, 35, rfc_leaf(record.entry.encode()), path) == root


def test_two_writers_on_one_database_keep_one_tree(db, keyring, clock) -> None:
    one, two = make_log(db, keyring, clock), make_log(db, keyring, clock)
    for i in range(0, 30, 3):
        (one if i % 2 else two).append(events(3, i))
    assert [r.seq for r in one.records()] == list(range(30))
    assert report_of(one) == []


# --------------------------------------------------------------------- tampering


def test_an_edited_entry_is_detected(db, keyring, clock) -> None:
    log = filled(db, keyring, clock)
    entry = json.loads(log.records()[12].entry)
    entry["detail"]["role"] = "admin"
    sql(
        db,
        "UPDATE audit_records SET entry = :e WHERE seq = 12",
        e=json.dumps(entry, sort_keys=True, separators=(",", ":")),
    )
    problems = report_of(log)
    assert any("no longer match" in p and "5..14" in p for p in problems), problems


def test_an_edited_column_is_detected(db, keyring, clock) -> None:
    log = filled(db, keyring, clock)
    sql(db, "UPDATE audit_records SET actor = 'someone-else' WHERE seq = 3")
    assert any("Record 3's actor differ" in p for p in report_of(log))


def test_a_deleted_record_is_detected(db, keyring, clock) -> None:
    log = filled(db, keyring, clock)
    sql(db, "DELETE FROM audit_records WHERE seq = 7")
    problems = report_of(log)
    assert any("Record 7 is missing" in p for p in problems), problems
    assert any("no longer match" in p for p in problems)


def test_an_inserted_record_is_detected(db, keyring, clock) -> None:
    log = filled(db, keyring, clock)
    # Make room at 20 by moving every later record up one, then write a forged entry there.
    sql(db, "UPDATE audit_records SET seq = seq + 1000 WHERE seq >= 20")
    sql(db, "UPDATE audit_records SET seq = seq - 999 WHERE seq >= 1000")
    forged = log.records(after_seq=18, limit=1)[0]
    sql(
        db,
        "INSERT INTO audit_records (seq, at_ms, actor, tenant, action, target, outcome, entry,"
        " mac) VALUES (20, :at, :actor, 'acme', 'key.created', 'key99', 'success', :entry, :mac)",
        at=forged.at_ms,
        actor=forged.actor,
        entry=forged.entry.replace('"seq":19', '"seq":20'),
        mac=os.urandom(32),
    )
    problems = report_of(log)
    assert any("holds the entry of record" in p for p in problems), problems
    assert any("no longer match" in p for p in problems)


def test_reordered_records_are_detected(db, keyring, clock) -> None:
    log = filled(db, keyring, clock)
    a, b = log.records()[5], log.records()[6]
    sql(db, "UPDATE audit_records SET entry = :e WHERE seq = 5", e=b.entry)
    sql(db, "UPDATE audit_records SET entry = :e WHERE seq = 6", e=a.entry)
    problems = report_of(log)
    assert any("Record 5 holds the entry of record 6" in p for p in problems), problems


def test_a_truncated_log_is_detected(db, keyring, clock) -> None:
    log = filled(db, keyring, clock)
    sql(db, "DELETE FROM audit_records WHERE seq >= 30")
    problems = report_of(log)
    assert any("truncated" in p and "30 records" in p for p in problems), problems


def test_a_rollback_behind_a_witnessed_checkpoint_is_detected(db, keyring, clock) -> None:
    log = filled(db, keyring, clock)
    witnessed = log.checkpoints()[-1].note.encode()  # size 35, kept by a witness
    # The attacker rolls back records and checkpoints alike: the log alone looks fine.
    sql(db, "DELETE FROM audit_records WHERE seq >= 25")
    sql(db, "DELETE FROM audit_checkpoints WHERE size > 25")
    assert report_of(log) == []
    problems = report_of(log, witnessed)
    assert any("rolled back" in p and "25 records" in p for p in problems), problems


def test_a_log_diverged_from_a_witnessed_checkpoint_is_detected(db, keyring, clock) -> None:
    log = filled(db, keyring, clock)
    witnessed = log.checkpoints()[-1].note.encode()
    # Rewrite history from 30 on and drop the checkpoints that would show it.
    sql(db, "DELETE FROM audit_checkpoints WHERE size > 25")
    sql(
        db,
        "UPDATE audit_records SET actor = 'x', entry = replace(entry, 'admin', 'x') "
        "WHERE seq >= 30",
    )
    problems = report_of(log, witnessed)
    assert any("diverged from the checkpoint you hold" in p for p in problems), problems


def test_a_forged_checkpoint_is_detected(db, keyring, clock) -> None:
    log = filled(db, keyring, clock)
    impostor = Signer("test.example/audit", os.urandom(32))
    text = Checkpoint("test.example/audit", 35, os.urandom(32)).encode()
    sql(
        db,
        "UPDATE audit_checkpoints SET note = :n WHERE size = 35",
        n=sign(text, impostor).decode(),
    )
    problems = report_of(log)
    assert any("size 35" in p and "forged" in p for p in problems), problems
    # An edited root under the real signature fails the signature too.
    note = log.checkpoints()[0].note
    lines = note.split("\n")
    lines[2] = base64.b64encode(os.urandom(32)).decode()
    sql(
        db,
        "UPDATE audit_checkpoints SET note = :n WHERE size = :s",
        n="\n".join(lines),
        s=log.checkpoints()[0].size,
    )
    assert sum("forged" in p for p in report_of(log)) == 2


def test_a_replaced_public_key_is_refused(db, keyring, clock) -> None:
    filled(db, keyring, clock)
    impostor = Signer("test.example/audit", os.urandom(32))
    sql(db, "UPDATE audit_keys SET public_key = :k", k=impostor.verifier().public_key)
    fresh = make_log(db, keyring, clock)
    with pytest.raises(AuditLogError, match="not its signing key"):
        fresh.own_verifier()
    with pytest.raises(AuditLogError):
        fresh.append(events(1, 40))


# --------------------------------------------------------------------- retention


def test_pruning_keeps_the_log_verifiable_and_later_proofs_valid(db, keyring, clock) -> None:
    from bastion.audit import merkle

    log = filled(db, keyring, clock, 40)
    clock.now = 1_800_000_000.0 + 23 + 10 * 86_400  # records 0..22 are over 10 days old
    assert log.prune(10 * 86_400) == 23
    assert [r.seq for r in log.records()][:1] == [23]
    assert report_of(log) == []
    log.append(events(5, 40, at=clock.now))
    assert report_of(log) == []
    leaves = log.leaves(45)
    root = merkle.root_hash(leaves)
    for record in log.records():
        path = merkle.inclusion_proof(record.seq, leaves)
        assert rfc_root_from_path(record.seq, 45, rfc_leaf(record.entry.encode()), path) == root
    # Tampering after a prune is still found.
    sql(db, "UPDATE audit_records SET entry = replace(entry, 'consumer', 'admin') WHERE seq = 30")
    assert any("no longer match" in p for p in report_of(log))


def test_pruning_refuses_to_launder_edited_records(db, keyring, clock) -> None:
    log = filled(db, keyring, clock, 40)
    sql(db, "UPDATE audit_records SET entry = replace(entry, 'consumer', 'admin') WHERE seq = 4")
    clock.now += 30 * 86_400
    with pytest.raises(AuditLogError, match="do not match"):
        log.prune(10 * 86_400)
    assert len(log.records()) == 40


def test_a_forged_prune_note_is_detected(db, keyring, clock) -> None:
    log = filled(db, keyring, clock, 40)
    clock.now = 1_800_000_000.0 + 23 + 10 * 86_400
    assert log.prune(10 * 86_400) == 23
    sql(db, "UPDATE audit_prunes SET note = replace(note, :a, :b)", a="\n23\n", b="\n24\n")
    assert any("prune note" in p for p in report_of(log))


# --------------------------------------------------------------------- review findings


def test_a_record_forged_after_the_latest_checkpoint_is_never_signed(db, keyring, clock) -> None:
    log = filled(db, keyring, clock, 40)  # the latest checkpoint is at 35
    forged = json.loads(log.records()[39].entry)
    forged.update(seq=40, actor="framed-admin")
    entry = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    sql(
        db,
        "INSERT INTO audit_records (seq, at_ms, actor, tenant, action, target, outcome, entry,"
        " mac) VALUES (40, 0, 'framed-admin', 'acme', 'key.created', 'key40', 'success', :e, :m)",
        e=entry,
        m=os.urandom(32),
    )
    for writer in (log, make_log(db, keyring, clock)):  # this process, and a fresh one
        with pytest.raises(AuditLogTampered, match="record 40 was not written by Bastion"):
            writer.append(events(1, 41))
        with pytest.raises(AuditLogTampered):
            writer.checkpoint(force=True)
    assert log.latest_checkpoint() is not None and log.latest_checkpoint().size == 35
    assert any("Record 40 was not written by Bastion" in p for p in report_of(log))


def test_a_log_that_lost_its_newest_records_is_caught_by_its_writer(db, keyring, clock) -> None:
    log = filled(db, keyring, clock, 40)
    sql(db, "DELETE FROM audit_records WHERE seq >= 36")
    sql(db, "DELETE FROM audit_checkpoints WHERE size > 30")
    with pytest.raises(AuditLogTampered, match="lost records"):
        log.append(events(1, 40))


def test_a_forged_checkpoint_above_the_tree_stops_signing(db, keyring, clock) -> None:
    filled(db, keyring, clock, 40)
    sql(db, "UPDATE audit_checkpoints SET size = 1000000000 WHERE size = 35")
    with pytest.raises(AuditLogTampered, match="not genuine"):
        make_log(db, keyring, clock).append(events(1, 40))


def test_verification_reports_rows_it_cannot_read_instead_of_failing(db, keyring, clock) -> None:
    log = filled(db, keyring, clock, 20)
    sql(db, "UPDATE audit_checkpoints SET at_ms = 9000000000000000000 WHERE size = 5")
    sql(db, "UPDATE audit_records SET at_ms = 9000000000000000000 WHERE seq = 3")
    sql(db, "UPDATE audit_records SET entry = CAST(entry AS BLOB) WHERE seq = 4")
    sql(db, "UPDATE audit_checkpoints SET note = CAST(note AS BLOB) WHERE size = 15")
    # Same bytes stored as BLOBs hash the same (and are read, not crashed on); the times
    # out of any calendar are reported.
    assert report_of(log) == ["Record 3's time differ from its signed entry (edited)."]


def test_a_failed_first_append_leaves_no_phantom_key(db, keyring, clock) -> None:
    log = make_log(db, keyring, clock)
    with pytest.raises(Exception):  # noqa: B017 - the database refuses a record without action
        log.append([Event(kind=None)])  # type: ignore[arg-type]
    assert log.own_verifier() is None
    other = make_log(db, keyring, clock)
    other.append(events(3))
    log.append(events(3, 3))
    assert report_of(log) == []


def test_control_characters_never_reach_an_entry(db, keyring, clock) -> None:
    log = make_log(db, keyring, clock)
    log.append([Event(kind="auth.failed", actor="a\x00b\ud800c", detail={"k\n": "v\x1b[31m"})])
    entry = log.records()[0].fields()
    assert entry["actor"] == "abc" and entry["detail"] == {"k": "v[31m"}
    assert report_of(log) == []


def test_another_process_pruning_ahead_of_a_writer_raises_no_false_alarm(
    db, keyring, clock
) -> None:
    first = make_log(db, keyring, clock)
    first.append(events(10))
    second = make_log(db, keyring, clock)
    second.append(events(10, 10))
    clock.now = 1_800_000_000.0 + 15 + 100  # records 0..14 are older than 100 s
    assert second.prune(100) == 15
    first.append(events(8, 20, at=clock.now))
    first.checkpoint(force=True)
    assert report_of(first) == []


def test_a_junk_prune_note_does_not_stop_the_writer(db, keyring, clock) -> None:
    log = filled(db, keyring, clock, 10)
    sql(db, "INSERT INTO audit_prunes (size, at_ms, note) VALUES (5, 0, 'junk')")
    make_log(db, keyring, clock).append(events(2, 10))
    assert any("prune note at size 5" in p for p in report_of(log))


def test_proofs_after_a_prune(db, keyring, clock) -> None:
    from bastion.audit import merkle

    log = filled(db, keyring, clock, 40)
    full = log.leaves(40)
    clock.now = 1_800_000_000.0 + 23 + 10 * 86_400
    log.prune(10 * 86_400)
    cut = log.leaves(40)
    assert isinstance(cut, merkle.PrunedLeaves)
    for old in (23, 30, 35):
        assert log.tree_root(old, cut) == merkle.root_hash(list(full)[:old])
        assert merkle.consistency_proof(old, cut) == merkle.consistency_proof(old, full)
    with pytest.raises(ValueError, match="pruned"):
        log.tree_root(10, cut)


def test_old_checkpoints_are_thinned_to_one_an_hour(db, keyring, clock) -> None:
    log = make_log(db, keyring, clock)
    for i in range(12):  # a checkpoint every 10 minutes, for two hours
        clock.now = 1_800_000_000.0 + 600 * i
        log.append(events(1, i, at=clock.now), checkpoint=True)
    assert len(log.checkpoints()) == 12
    clock.now += 2 * 86_400
    assert log.prune(30 * 86_400) == 0  # nothing old enough to prune; still thinned
    kept = log.checkpoints()
    hours = {c.at_ms // 3_600_000 for c in kept}
    assert len(kept) == len(hours) <= 3 and kept[-1].size == 12
    assert report_of(log) == []
