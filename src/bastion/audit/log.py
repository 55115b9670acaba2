"""The tamper-evident audit log: an append-only table whose records are Merkle tree leaves.

Every event an :class:`~bastion.audit.events.EventSink` receives becomes one record: a
sequence number (its leaf index), the time, actor, tenant, action, target, outcome and a
small detail object, written as canonical JSON (the *entry*, stored as the exact bytes
hashed). The entries are the leaves of an RFC 9162 Merkle tree; every N records or T
seconds the log signs a checkpoint of the tree (c2sp.org/tlog-checkpoint, as a signed note
with an Ed25519 key whose seed the key ring seals). Editing, deleting, inserting or
reordering a record changes the root the next signed checkpoint committed to, which
:mod:`bastion.audit.verify` detects; a copy of a checkpoint kept elsewhere (a witness)
detects a log rolled back behind it.

Retention prunes the oldest records only together with a signed *prune note* holding the
frontier of the pruned prefix (the roots of the complete subtrees that cover it), so the
tree, its checkpoints and proofs for later records still verify.

Entries hold metadata only (ids, names, statuses, reasons), never payloads or secrets: the
events already carry nothing else, and text fields are cut to the columns' sizes.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Connection

from bastion.audit import merkle
from bastion.audit.checkpoint import Checkpoint
from bastion.audit.events import Event
from bastion.audit.note import Signer, Verifier, open_note, sign
from bastion.crypto.keyring import KeyRing
from bastion.errors import ConfigurationError
from bastion.store.db import Database
from bastion.store.tables import audit_checkpoints, audit_keys, audit_prunes, audit_records

ENTRY_VERSION = 1
PRUNE_HEADER = "bastion-audit-prune/v1"
DEFAULT_CHECKPOINT_EVERY = 256
DEFAULT_CHECKPOINT_INTERVAL_S = 10.0
DEFAULT_RETENTION_DAYS = 180
# The key ring context of the checkpoint key's sealed seed.
SEED_CONTEXT = "audit-checkpoint-key/1"
_KEY_ROW = 1
_MAX_DETAIL_KEYS = 32
_MAX_DETAIL_TEXT = 256
# Text columns' sizes (store/tables.py): a longer value is cut, in the entry too.
_LIMITS = {"actor": 128, "tenant": 63, "action": 64, "target": 255, "outcome": 16}
_READ_BATCH = 10_000


class AuditLogError(ConfigurationError):
    """The audit log cannot be used (its key does not open, or its state is inconsistent)."""

    code = "audit_log_error"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    at_ms: int
    actor: str | None
    tenant: str | None
    action: str
    target: str | None
    outcome: str
    entry: str

    @property
    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.entry.encode())

    def fields(self) -> dict[str, Any]:
        """The entry as a dict (what an export writes)."""
        value: dict[str, Any] = json.loads(self.entry)
        return value


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    size: int
    at_ms: int
    note: str


@dataclass(frozen=True, slots=True)
class PruneNote:
    """What retention removed: every record below `size`, whose tree had `root`."""

    origin: str
    size: int
    root: bytes
    cutoff_ms: int
    frontier: tuple[bytes, ...]

    def encode(self) -> str:
        lines = [PRUNE_HEADER, self.origin, str(self.size), _b64(self.root), str(self.cutoff_ms)]
        lines += [_b64(node) for node in self.frontier]
        return "".join(f"{line}\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> PruneNote:
        lines = text.rstrip("\n").split("\n")
        if len(lines) < 5 or lines[0] != PRUNE_HEADER:
            raise ValueError("not a prune note")
        size = int(lines[2])
        frontier = tuple(base64.b64decode(line, validate=True) for line in lines[5:])
        root = base64.b64decode(lines[3], validate=True)
        note = cls(lines[1], size, root, int(lines[4]), frontier)
        if merkle.TreeBuilder.from_frontier(size, frontier).root() != note.root:
            raise ValueError("the prune note's frontier does not make its root")
        return note


def canonical_entry(seq: int, event: Event) -> tuple[str, dict[str, Any]]:
    """The entry of `event` as record `seq`: canonical JSON (sorted keys, no spaces, UTF-8)
    and the column values it repeats."""
    at_ms = round(event.at * 1000)
    columns: dict[str, Any] = {
        "actor": _cut(event.actor, "actor"),
        "tenant": _cut(event.tenant, "tenant"),
        "action": _cut(event.kind, "action"),
        "target": _cut(event.target, "target"),
        "outcome": _cut(event.outcome, "outcome"),
    }
    entry = {
        "v": ENTRY_VERSION,
        "seq": seq,
        "time": iso_time(at_ms),
        **columns,
        "detail": _clean_detail(event.detail),
    }
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text, {"seq": seq, "at_ms": at_ms, **columns, "entry": text}


def iso_time(at_ms: int) -> str:
    moment = datetime.fromtimestamp(at_ms // 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{at_ms % 1000:03d}Z"


class AuditLog:
    """Appends events as records, signs checkpoints, prunes past the retention.

    Safe to share between threads; several processes (a server and the CLI) may append to
    one database: each append runs in a write transaction that re-reads the log's size."""

    def __init__(
        self,
        db: Database,
        keyring: KeyRing,
        *,
        origin: str | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
        clock: Any = time.time,
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._origin = origin
        self._every = max(1, checkpoint_every)
        self._interval_s = checkpoint_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._builder: merkle.TreeBuilder | None = None
        self._next_seq = 0
        self._signer: Signer | None = None

    @property
    def database(self) -> Database:
        return self._db

    # ------------------------------------------------------------------ writing

    def append(self, events: Sequence[Event], *, checkpoint: bool = False) -> int:
        """Write `events` as records in one transaction; the log's size after it. With
        `checkpoint`, the same transaction signs a checkpoint covering them."""
        if not events:
            return self.size()
        with self._lock:
            try:
                with self._db.write(bump_revision=False) as conn:
                    signer = self._signer_in(conn)
                    builder = self._synced(conn)
                    rows = []
                    for event in events:
                        entry, row = canonical_entry(self._next_seq, event)
                        rows.append(row)
                        builder.append(merkle.leaf_hash(entry.encode()))
                        self._next_seq += 1
                    conn.execute(sa.insert(audit_records), rows)
                    self._checkpoint_in(conn, signer, builder, force=checkpoint)
                    return builder.size
            except BaseException:
                self._builder = None  # the transaction rolled back: re-read next time
                raise

    def checkpoint(self, *, force: bool = False) -> bool:
        """Sign a checkpoint if one is due (N records or T seconds since the last), or with
        `force` whenever records were appended since; whether one was signed."""
        with self._lock:
            try:
                with self._db.write(bump_revision=False) as conn:
                    signer = self._signer_in(conn)
                    builder = self._synced(conn)
                    return self._checkpoint_in(conn, signer, builder, force=force)
            except BaseException:
                self._builder = None
                raise

    def prune(self, retention_s: float) -> int:
        """Remove the records older than `retention_s`, with a signed prune note; how many."""
        cutoff_ms = int((self._clock() - retention_s) * 1000)
        with self._lock:
            try:
                with self._db.write(bump_revision=False) as conn:
                    signer = self._signer_in(conn)
                    self._synced(conn)
                    prune = _latest_prune(conn, signer.verifier(), upto=None)
                    start = 0 if prune is None else prune.size
                    builder = (
                        merkle.TreeBuilder()
                        if prune is None
                        else merkle.TreeBuilder.from_frontier(prune.size, prune.frontier)
                    )
                    first_kept = conn.execute(
                        sa.select(sa.func.min(audit_records.c.seq)).where(
                            audit_records.c.at_ms >= cutoff_ms
                        )
                    ).scalar_one_or_none()
                    end = self._next_seq if first_kept is None else int(first_kept)
                    if end <= start:
                        return 0
                    _fold_checked(conn, signer.verifier(), builder, start, end)
                    frontier = tuple(builder.frontier)
                    note = PruneNote(signer.name, end, builder.root(), cutoff_ms, frontier)
                    conn.execute(
                        sa.insert(audit_prunes).values(
                            size=end,
                            at_ms=int(self._clock() * 1000),
                            note=sign(note.encode(), signer).decode(),
                        )
                    )
                    removed = conn.execute(
                        sa.delete(audit_records).where(audit_records.c.seq < end)
                    ).rowcount
                    return int(removed or 0)
            except BaseException:
                self._builder = None
                raise

    # ------------------------------------------------------------------ reading

    def size(self) -> int:
        with self._db.read() as conn:
            return _stored_size(conn)

    def origin(self) -> str | None:
        with self._db.read() as conn:
            return conn.execute(
                sa.select(audit_keys.c.origin).where(audit_keys.c.id == _KEY_ROW)
            ).scalar_one_or_none()

    def stored_verifier(self) -> Verifier | None:
        """The public key the database holds (trust it only after :meth:`own_verifier`)."""
        with self._db.read() as conn:
            row = conn.execute(
                sa.select(audit_keys.c.origin, audit_keys.c.public_key).where(
                    audit_keys.c.id == _KEY_ROW
                )
            ).one_or_none()
        return None if row is None else Verifier.from_public_key(row.origin, bytes(row.public_key))

    def own_verifier(self) -> Verifier | None:
        """The public key of the seed the key ring seals (None before the first record):
        what a verifier on this machine trusts, since a database writer cannot forge it."""
        with self._db.read() as conn:
            row = conn.execute(
                sa.select(audit_keys).where(audit_keys.c.id == _KEY_ROW)
            ).one_or_none()
        if row is None:
            return None
        return self._open_signer(row).verifier()

    def records(
        self,
        *,
        after_seq: int | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        tenant: str | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        query = sa.select(*_RECORD_COLUMNS).order_by(audit_records.c.seq)
        if after_seq is not None:
            query = query.where(audit_records.c.seq > after_seq)
        if since_ms is not None:
            query = query.where(audit_records.c.at_ms >= since_ms)
        if until_ms is not None:
            query = query.where(audit_records.c.at_ms < until_ms)
        if tenant is not None:
            query = query.where(audit_records.c.tenant == tenant)
        if limit is not None:
            query = query.limit(limit)
        with self._db.read() as conn:
            return [AuditRecord(*row) for row in conn.execute(query)]

    def checkpoints(self, *, after_size: int | None = None) -> list[StoredCheckpoint]:
        query = sa.select(
            audit_checkpoints.c.size, audit_checkpoints.c.at_ms, audit_checkpoints.c.note
        ).order_by(audit_checkpoints.c.size)
        if after_size is not None:
            query = query.where(audit_checkpoints.c.size > after_size)
        with self._db.read() as conn:
            return [StoredCheckpoint(*row) for row in conn.execute(query)]

    def prune_notes(self) -> list[StoredCheckpoint]:
        query = sa.select(audit_prunes.c.size, audit_prunes.c.at_ms, audit_prunes.c.note)
        with self._db.read() as conn:
            return [StoredCheckpoint(*row) for row in conn.execute(query.order_by("size"))]

    def leaves(self, size: int) -> Sequence[bytes]:
        """The leaf hashes of the tree of `size` records (a pruned prefix by its frontier)."""
        with self._db.read() as conn:
            prune = _latest_prune(conn, None, upto=size)
            start = 0 if prune is None else prune.size
            tail = [record.leaf_hash for record in scan_records(conn, start, size)]
        if len(tail) != size - start:
            raise AuditLogError("the log does not hold every record of that tree size")
        if prune is None:
            return tail
        return merkle.PrunedLeaves(prune.size, prune.frontier, tail)

    # ------------------------------------------------------------------ internals

    def _signer_in(self, conn: Connection) -> Signer:
        if self._signer is not None:
            return self._signer
        row = conn.execute(sa.select(audit_keys).where(audit_keys.c.id == _KEY_ROW)).one_or_none()
        if row is None:
            origin = self._origin or f"bastion/audit/{secrets.token_hex(6)}"
            seed = Ed25519PrivateKey.generate().private_bytes_raw()
            signer = Signer(origin, seed)
            conn.execute(
                sa.insert(audit_keys).values(
                    id=_KEY_ROW,
                    origin=origin,
                    public_key=signer.verifier().public_key,
                    sealed_seed=self._keyring.seal(seed, SEED_CONTEXT),
                    created_at=datetime.fromtimestamp(self._clock(), UTC),
                )
            )
        else:
            signer = self._open_signer(row)
        self._signer = signer
        return signer

    def _open_signer(self, row: Any) -> Signer:
        try:
            signer = Signer(row.origin, self._keyring.open(bytes(row.sealed_seed), SEED_CONTEXT))
        except Exception as exc:
            raise AuditLogError("The audit log's signing key does not open.") from exc
        if signer.verifier().public_key != bytes(row.public_key):
            raise AuditLogError("The audit log's stored public key is not its signing key's.")
        return signer

    def _synced(self, conn: Connection) -> merkle.TreeBuilder:
        """The tree builder at the log's current size (another process may have appended)."""
        next_seq = _next_seq(conn)
        builder = self._builder
        if builder is None or builder.size > next_seq or self._next_seq > next_seq:
            assert self._signer is not None
            start, builder = _resume_point(conn, self._signer.verifier(), upto=None)
            self._next_seq = start
        for record in scan_records(conn, self._next_seq, None):
            builder.append(record.leaf_hash)
            self._next_seq = record.seq + 1
        self._next_seq = max(self._next_seq, next_seq)
        self._builder = builder
        return builder

    def _checkpoint_in(
        self, conn: Connection, signer: Signer, builder: merkle.TreeBuilder, *, force: bool
    ) -> bool:
        last = conn.execute(
            sa.select(audit_checkpoints.c.size, audit_checkpoints.c.at_ms)
            .order_by(audit_checkpoints.c.size.desc())
            .limit(1)
        ).one_or_none()
        last_size, last_ms = (0, 0) if last is None else (int(last.size), int(last.at_ms))
        now = self._clock()
        pending = builder.size - last_size
        if pending <= 0:
            return False
        due = force or pending >= self._every or now - last_ms / 1000 >= self._interval_s
        if not due:
            return False
        text = Checkpoint(signer.name, builder.size, builder.root()).encode()
        conn.execute(
            sa.insert(audit_checkpoints).values(
                size=builder.size,
                at_ms=int(now * 1000),
                note=sign(text, signer).decode(),
                frontier=b"".join(builder.frontier),
            )
        )
        return True


_RECORD_COLUMNS = (
    audit_records.c.seq,
    audit_records.c.at_ms,
    audit_records.c.actor,
    audit_records.c.tenant,
    audit_records.c.action,
    audit_records.c.target,
    audit_records.c.outcome,
    audit_records.c.entry,
)


def scan_records(conn: Connection, start: int, end: int | None) -> Iterator[AuditRecord]:
    """Records with start <= seq < end in order, read in batches (bounded memory)."""
    seq = start
    while True:
        query = sa.select(*_RECORD_COLUMNS).where(audit_records.c.seq >= seq)
        if end is not None:
            query = query.where(audit_records.c.seq < end)
        rows = conn.execute(query.order_by(audit_records.c.seq).limit(_READ_BATCH)).all()
        for row in rows:
            yield AuditRecord(*row)
        if len(rows) < _READ_BATCH:
            return
        seq = rows[-1].seq + 1


def _fold_checked(
    conn: Connection, verifier: Verifier, builder: merkle.TreeBuilder, start: int, end: int
) -> None:
    """Fold records start..end-1 into `builder`, checking them against the signed
    checkpoints in that range: pruning must never launder records edited before it."""
    roots: dict[int, bytes] = {}
    for (note,) in conn.execute(
        sa.select(audit_checkpoints.c.note).where(
            audit_checkpoints.c.size > start, audit_checkpoints.c.size <= end
        )
    ):
        checkpoint = Checkpoint.parse(open_note(note.encode(), [verifier])[0])
        roots[checkpoint.size] = checkpoint.root
    expected = start
    for record in scan_records(conn, start, end):
        if record.seq != expected:
            raise AuditLogError(
                f"Record {expected} is missing; run `bastion audit verify` before pruning."
            )
        builder.append(record.leaf_hash)
        expected += 1
        root = roots.get(builder.size)
        if root is not None and builder.root() != root:
            raise AuditLogError(
                f"The records below {builder.size} do not match their signed checkpoint; "
                "run `bastion audit verify` before pruning."
            )
    if expected != end:
        raise AuditLogError(
            f"Record {expected} is missing; run `bastion audit verify` before pruning."
        )


def _next_seq(conn: Connection) -> int:
    top = conn.execute(sa.select(sa.func.max(audit_records.c.seq))).scalar_one_or_none()
    return 0 if top is None else int(top) + 1


def _stored_size(conn: Connection) -> int:
    """The log's size: one past its last record, or its last checkpoint or prune."""
    sizes = [_next_seq(conn)]
    for table in (audit_checkpoints, audit_prunes):
        top = conn.execute(sa.select(sa.func.max(table.c.size))).scalar_one_or_none()
        sizes.append(0 if top is None else int(top))
    return max(sizes)


def _latest_prune(
    conn: Connection, verifier: Verifier | None, *, upto: int | None
) -> PruneNote | None:
    query = sa.select(audit_prunes.c.note).order_by(audit_prunes.c.size.desc()).limit(1)
    if upto is not None:
        query = query.where(audit_prunes.c.size <= upto)
    note = conn.execute(query).scalar_one_or_none()
    if note is None:
        return None
    text = open_note(note.encode(), [verifier])[0] if verifier is not None else _note_text(note)
    return PruneNote.parse(text)


def _resume_point(
    conn: Connection, verifier: Verifier, *, upto: int | None
) -> tuple[int, merkle.TreeBuilder]:
    """Where a writer may go on from without rereading the log: the latest checkpoint's
    cached frontier (checked against its signed root) or prune note, else the start."""
    best: tuple[int, merkle.TreeBuilder] = (0, merkle.TreeBuilder())
    prune = _latest_prune(conn, verifier, upto=upto)
    if prune is not None:
        best = (prune.size, merkle.TreeBuilder.from_frontier(prune.size, prune.frontier))
    row = conn.execute(
        sa.select(audit_checkpoints.c.note, audit_checkpoints.c.frontier)
        .order_by(audit_checkpoints.c.size.desc())
        .limit(1)
    ).one_or_none()
    if row is not None:
        try:
            checkpoint = Checkpoint.parse(open_note(row.note.encode(), [verifier])[0])
            frontier = bytes(row.frontier)
            nodes = [frontier[i : i + 32] for i in range(0, len(frontier), 32)]
            builder = merkle.TreeBuilder.from_frontier(checkpoint.size, nodes)
        except ValueError:
            return best  # a damaged cache: verification reports the damage, not the writer
        # The records up to it must still be there for a writer to resume from it.
        if (
            builder.root() == checkpoint.root
            and checkpoint.size > best[0]
            and _next_seq(conn) >= checkpoint.size
        ):
            best = (checkpoint.size, builder)
    return best


def _note_text(note: str) -> str:
    return note.split("\n\n", 1)[0] + "\n"


def _cut(value: str | None, column: str) -> str | None:
    if value is None:
        return None
    return value[: _LIMITS[column]]


def _clean_detail(detail: Mapping[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in list(detail.items())[:_MAX_DETAIL_KEYS]:
        key = str(key)[:64]
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif isinstance(value, str):
            value = value[:_MAX_DETAIL_TEXT]
        elif value is not None and not isinstance(value, bool | int | float):
            value = str(value)[:_MAX_DETAIL_TEXT]
        clean[key] = value
    return clean


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
