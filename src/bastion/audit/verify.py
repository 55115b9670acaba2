"""Checking the audit log: recompute its Merkle tree and compare it with what was signed.

One pass over the records in order (bounded memory) finds:

* a record that is missing (deleted) or holds another record's entry (moved, reordered);
* with the records' MAC key (which only the key ring opens), a record Bastion did not
  write, even after the latest checkpoint;
* a record whose columns differ from its hashed entry (edited where queries look);
* a tree that no longer matches a signed checkpoint (any entry edited, inserted, deleted
  or reordered before it), and which checkpoints bracket the change;
* a log shorter than its latest checkpoint (truncated);
* a checkpoint or prune note whose signature does not verify (forged), or two different
  signed roots for one size;
* with checkpoints kept elsewhere (a witness's copies), a log rolled back behind them or
  diverged from them.

Every problem is a sentence in the report; the report is OK only with none. Records after
the latest checkpoint are not yet committed to by any signature; the report says how many.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from bastion.audit import merkle
from bastion.audit.checkpoint import Checkpoint
from bastion.audit.log import (
    AuditRecord,
    PruneNote,
    iso_time,
    record_mac,
    scan_records,
    stored_text,
)
from bastion.audit.note import NoteError, Verifier, open_note
from bastion.store.db import Database
from bastion.store.tables import audit_checkpoints, audit_prunes

_COLUMNS = ("actor", "tenant", "action", "target", "outcome")


@dataclass
class VerifyReport:
    size: int = 0
    root: bytes = merkle.EMPTY_ROOT
    checkpoints: int = 0
    latest_checkpoint: int = 0
    pruned_below: int = 0
    witnesses: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned(self) -> int:
        """Records after the latest checkpoint (not yet covered by a signature)."""
        return max(0, self.size - self.latest_checkpoint)

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "size": self.size,
            "root": self.root.hex(),
            "checkpoints": self.checkpoints,
            "latest_checkpoint": self.latest_checkpoint,
            "unsigned_records": self.unsigned,
            "pruned_below": self.pruned_below,
            "witness_checkpoints": self.witnesses,
            "problems": list(self.problems),
        }


@dataclass(frozen=True, slots=True)
class _Signed:
    size: int
    root: bytes
    what: str


def verify_log(
    db: Database,
    verifier: Verifier,
    *,
    mac_key: bytes | None = None,
    witness_notes: Sequence[bytes] = (),
) -> VerifyReport:
    """Check the whole log against `verifier` (the log's public key, from a source the
    database's writer cannot change), each record's MAC when `mac_key` is given, and
    checkpoints a witness kept. Never raises for what the database holds: damage is a
    problem in the report."""
    report = VerifyReport()
    with db.read(snapshot=True) as conn:
        prune = _check_prunes(conn, verifier, report)
        signed = _check_checkpoints(conn, verifier, report)
        witnessed = _read_witnesses(witness_notes, verifier, report)
        start = 0 if prune is None else prune.size
        builder = (
            merkle.TreeBuilder()
            if prune is None
            else merkle.TreeBuilder.from_frontier(prune.size, prune.frontier)
        )
        report.pruned_below = start
        targets = _targets(signed, witnessed, start, report)
        _fold(conn, builder, start, targets, report, mac_key)
    report.size = builder.size
    report.root = builder.root()
    for size, checks in sorted(targets.items()):
        if size > builder.size:
            for check in checks:
                if check.what.startswith("the checkpoint you hold"):
                    report.problems.append(
                        f"The log was rolled back: it has {builder.size} records, but "
                        f"{check.what} was signed at size {size}."
                    )
                else:
                    report.problems.append(
                        f"The log was truncated: it has {builder.size} records, but "
                        f"{check.what} covers {size}."
                    )
    return report


def _check_prunes(
    conn: sa.Connection, verifier: Verifier, report: VerifyReport
) -> PruneNote | None:
    latest: PruneNote | None = None
    rows = conn.execute(
        sa.select(audit_prunes.c.size, audit_prunes.c.note).order_by(audit_prunes.c.size)
    )
    for size, note in rows:
        try:
            parsed = PruneNote.parse(open_note(stored_text(note).encode(), [verifier])[0])
        except (NoteError, ValueError) as exc:
            report.problems.append(f"The prune note at size {size} does not verify ({exc}).")
            continue
        if parsed.size != size or parsed.origin != verifier.name:
            report.problems.append(f"The prune note at size {size} was moved or re-labelled.")
            continue
        latest = parsed
    return latest


def _check_checkpoints(
    conn: sa.Connection, verifier: Verifier, report: VerifyReport
) -> list[_Signed]:
    signed: list[_Signed] = []
    rows = conn.execute(
        sa.select(
            audit_checkpoints.c.size, audit_checkpoints.c.at_ms, audit_checkpoints.c.note
        ).order_by(audit_checkpoints.c.size)
    )
    for size, at_ms, note in rows:
        try:
            label = f"the checkpoint of size {size} (signed {iso_time(at_ms)})"
        except (TypeError, ValueError):
            label = f"the checkpoint of size {size} (its time is damaged)"
        try:
            checkpoint = Checkpoint.parse(open_note(stored_text(note).encode(), [verifier])[0])
        except (NoteError, ValueError) as exc:
            report.problems.append(f"{_upper(label)} is forged or damaged ({exc}).")
            continue
        if checkpoint.size != size or checkpoint.origin != verifier.name:
            report.problems.append(f"{_upper(label)} was moved or belongs to another log.")
            continue
        signed.append(_Signed(size, checkpoint.root, label))
        report.checkpoints += 1
        report.latest_checkpoint = max(report.latest_checkpoint, size)
    return signed


def _read_witnesses(
    notes: Iterable[bytes], verifier: Verifier, report: VerifyReport
) -> list[_Signed]:
    held = []
    for i, note in enumerate(notes, 1):
        try:
            checkpoint = Checkpoint.parse(open_note(note, [verifier])[0])
        except (NoteError, ValueError) as exc:
            report.problems.append(
                f"The checkpoint you hold (#{i}) is not signed by this log's key ({exc})."
            )
            continue
        if checkpoint.origin != verifier.name:
            report.problems.append(f"The checkpoint you hold (#{i}) is of another log.")
            continue
        held.append(_Signed(checkpoint.size, checkpoint.root, f"the checkpoint you hold (#{i})"))
        report.witnesses += 1
    return held


def _targets(
    signed: list[_Signed], witnessed: list[_Signed], start: int, report: VerifyReport
) -> dict[int, list[_Signed]]:
    """The roots to compare by tree size; sizes inside the pruned range cannot be
    recomputed (the prune note vouches for them), except the pruned size itself."""
    targets: dict[int, list[_Signed]] = {}
    for check in (*signed, *witnessed):
        if check.size < start:
            continue
        targets.setdefault(check.size, []).append(check)
    for size, checks in targets.items():
        if len({check.root for check in checks}) > 1:
            names = " and ".join(check.what for check in checks)
            report.problems.append(
                f"Two different trees were signed at size {size}: {names} (a split view)."
            )
    return targets


def _fold(
    conn: sa.Connection,
    builder: merkle.TreeBuilder,
    start: int,
    targets: dict[int, list[_Signed]],
    report: VerifyReport,
    mac_key: bytes | None,
) -> None:
    last_good = start
    diverged = False
    expected = start
    _compare(builder, targets, last_good, report)
    for record in _records(conn, report):
        if record.seq < start:
            report.problems.append(f"Record {record.seq} lies in the pruned range (below {start}).")
            continue
        if record.seq != expected:
            if record.seq > expected:
                missing = (
                    f"{expected}" if record.seq == expected + 1 else f"{expected}..{record.seq - 1}"
                )
                report.problems.append(f"Record {missing} is missing (deleted).")
            expected = record.seq
        expected += 1
        if mac_key is not None and not hmac.compare_digest(
            record.mac, record_mac(mac_key, record.entry)
        ):
            report.problems.append(
                f"Record {record.seq} was not written by Bastion (its MAC does not match)."
            )
        try:
            entry = json.loads(record.entry)
        except ValueError:
            report.problems.append(f"Record {record.seq}'s entry is not JSON (edited).")
            entry = {}
        if isinstance(entry, dict) and entry:
            if entry.get("seq") != record.seq:
                report.problems.append(
                    f"Record {record.seq} holds the entry of record {entry.get('seq')} "
                    "(moved, inserted or reordered)."
                )
            edited = [name for name in _COLUMNS if entry.get(name) != getattr(record, name)]
            if entry.get("time") != _time_or_none(record.at_ms):
                edited.append("time")
            if edited:
                report.problems.append(
                    f"Record {record.seq}'s {', '.join(edited)} differ from its signed entry "
                    "(edited)."
                )
        builder.append(record.leaf_hash)
        if builder.size in targets and not diverged:
            diverged = not _compare(builder, targets, last_good, report)
            if not diverged:
                last_good = builder.size


def _compare(
    builder: merkle.TreeBuilder,
    targets: dict[int, list[_Signed]],
    last_good: int,
    report: VerifyReport,
) -> bool:
    checks = targets.get(builder.size)
    if not checks:
        return True
    root = builder.root()
    for check in checks:
        if check.root != root:
            if check.what.startswith("the checkpoint you hold"):
                report.problems.append(
                    f"The log diverged from {check.what} at size {check.size}: records "
                    f"{last_good}..{check.size - 1} differ from what it saw."
                )
            else:
                report.problems.append(
                    f"Records {last_good}..{check.size - 1} no longer match {check.what}: "
                    "a record there was edited, inserted, deleted or reordered."
                )
            return False
    return True


def _records(conn: sa.Connection, report: VerifyReport) -> Iterable[AuditRecord]:
    """The records in order; a row that cannot even be read ends the scan as a problem."""
    try:
        yield from scan_records(conn, 0, None)
    except (TypeError, ValueError) as exc:
        report.problems.append(f"A record cannot be read ({type(exc).__name__}): damaged.")


def _time_or_none(at_ms: int) -> str | None:
    try:
        return iso_time(at_ms)
    except ValueError:
        return None


def _upper(text: str) -> str:
    return text[:1].upper() + text[1:]
