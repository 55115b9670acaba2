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

Each record also carries an HMAC of its entry under a key derived from the signing seed:
the log's writer folds into the tree, and signs, only records it can authenticate, so a
database writer without the key ring cannot slip a record into the unsigned tail (records
after the latest checkpoint) and have Bastion sign it; verification reports such records.

Entries hold metadata only (ids, names, statuses, reasons), never payloads or secrets: the
events already carry nothing else, and text fields are cut to the columns' sizes, control
characters removed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Connection

from bastion.audit import merkle
from bastion.audit.checkpoint import Checkpoint
from bastion.audit.events import Event
from bastion.audit.note import Signer, Verifier, b64encode, open_note, sign
from bastion.crypto.keyring import KeyRing
from bastion.errors import ConfigurationError
from bastion.store.db import AUDIT_LOG_LOCK, Database
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
_T = TypeVar("_T")
_MAC_LABEL = b"bastion audit record mac v1"
# Characters no audit field needs: C0/C1 controls (NUL included, which PostgreSQL refuses
# in text) and lone surrogates (which no encoding takes).
_UNWANTED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Checkpoints older than this are thinned to one an hour when the log is pruned: the
# verification of a long log reads every checkpoint's signature.
_THIN_AFTER_MS = 86_400_000
_THIN_TO_MS = 3_600_000


class AuditLogError(ConfigurationError):
    """The audit log cannot be used (its key does not open, or its state is inconsistent)."""

    code = "audit_log_error"


class AuditLogTampered(AuditLogError):
    """The log holds records or checkpoints its writer did not write, or lost some it did:
    the writer signs nothing more until the cause is removed (and says why)."""

    code = "audit_log_tampered"


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
    mac: bytes = b""

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
        lines = [
            PRUNE_HEADER,
            self.origin,
            str(self.size),
            b64encode(self.root),
            str(self.cutoff_ms),
        ]
        lines += [b64encode(node) for node in self.frontier]
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


def record_mac(key: bytes, entry: str) -> bytes:
    return hmac.new(key, entry.encode(), hashlib.sha256).digest()


def mac_key_of(seed: bytes) -> bytes:
    """The records' MAC key, derived from the checkpoint key's seed (a key ring secret)."""
    return hmac.new(seed, _MAC_LABEL, hashlib.sha256).digest()


def iso_time(at_ms: int) -> str:
    """UTC with milliseconds; ValueError for a time outside years 1..9999."""
    try:
        moment = datetime.fromtimestamp(at_ms // 1000, UTC)
    except (OverflowError, OSError) as exc:
        raise ValueError("time out of range") from exc
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{at_ms % 1000:03d}Z"


class AuditLog:
    """Appends events as records, signs checkpoints, prunes past the retention.

    Safe to share between threads; several processes (a server and the CLI, or gateways
    sharing PostgreSQL) may append to one database: each append runs in a write
    transaction that first locks the log (SQLite's write lock; a row lock on PostgreSQL)
    and re-reads its size."""

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
        self._signer: Signer | None = None
        self._mac_key = b""
        # The latest checkpoint this process knows to be genuine (its note text).
        self._known_note: str | None = None

    @property
    def database(self) -> Database:
        return self._db

    # ------------------------------------------------------------------ writing

    def append(self, events: Sequence[Event], *, checkpoint: bool = False) -> int:
        """Write `events` as records in one transaction; the log's size after it. With
        `checkpoint`, the same transaction signs a checkpoint covering them."""
        if not events:
            return self.size()

        def write(conn: Connection, signer: Signer, builder: merkle.TreeBuilder) -> int:
            rows = []
            for event in events:
                entry, row = canonical_entry(builder.size, event)
                row["mac"] = record_mac(self._mac_key, entry)
                rows.append(row)
                builder.append(merkle.leaf_hash(entry.encode()))
            conn.execute(sa.insert(audit_records), rows)
            self._checkpoint_in(conn, signer, builder, force=checkpoint)
            return builder.size

        return self._in_write(write)

    def checkpoint(self, *, force: bool = False) -> bool:
        """Sign a checkpoint if one is due (N records or T seconds since the last), or with
        `force` whenever records were appended since; whether one was signed."""
        return self._in_write(
            lambda conn, signer, builder: self._checkpoint_in(conn, signer, builder, force=force)
        )

    def prune(self, retention_s: float) -> int:
        """Remove the records older than `retention_s`, with a signed prune note; how many.

        The pruned records are read and checked against their checkpoints first, outside
        the write lock; the write transaction then only stores the note and deletes."""
        if not math.isfinite(retention_s) or retention_s < 0:
            raise ValueError("the retention must be a finite, non-negative number of seconds")
        cutoff_ms = int((self._clock() - retention_s) * 1000)
        verifier = self.own_verifier()
        if verifier is None:
            return 0
        with self._db.read(snapshot=True) as conn:
            prune = _latest_prune(conn, verifier)
            start = 0 if prune is None else prune.size
            builder = _builder_at(prune)
            first_kept = conn.execute(
                sa.select(sa.func.min(audit_records.c.seq)).where(
                    audit_records.c.at_ms >= cutoff_ms, audit_records.c.seq >= start
                )
            ).scalar_one_or_none()
            end = _next_seq(conn) if first_kept is None else int(first_kept)
            if end > start:
                _fold_checked(conn, verifier, builder, start, end)
        if end <= start:

            def thin(conn: Connection, _: Signer, __: merkle.TreeBuilder) -> int:
                _thin_checkpoints(conn, start, int(self._clock() * 1000))
                return 0

            return self._in_write(thin)

        def write(conn: Connection, signer: Signer, _: merkle.TreeBuilder) -> int:
            latest = _latest_prune(conn, verifier)
            if (0 if latest is None else latest.size) != start:
                return 0  # another process pruned meanwhile
            frontier = tuple(builder.frontier)
            note = PruneNote(signer.name, end, builder.root(), cutoff_ms, frontier)
            now_ms = int(self._clock() * 1000)
            conn.execute(
                sa.insert(audit_prunes).values(
                    size=end, at_ms=now_ms, note=sign(note.encode(), signer).decode()
                )
            )
            removed = conn.execute(
                sa.delete(audit_records).where(audit_records.c.seq < end)
            ).rowcount
            _thin_checkpoints(conn, end, now_ms)
            return int(removed or 0)

        return self._in_write(write)

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
        keys = self.own_keys()
        return None if keys is None else keys[0]

    def own_keys(self) -> tuple[Verifier, bytes] | None:
        """The verifier and the records' MAC key, from the sealed seed."""
        with self._db.read() as conn:
            row = conn.execute(
                sa.select(audit_keys).where(audit_keys.c.id == _KEY_ROW)
            ).one_or_none()
        if row is None:
            return None
        signer, mac_key = self._open_signer(row)
        return signer.verifier(), mac_key

    def records(
        self,
        *,
        after_seq: int | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        tenant: str | None = None,
        limit: int | None = None,
        before_seq: int | None = None,
        newest_first: bool = False,
    ) -> list[AuditRecord]:
        """Records in order of `seq` (the newest first with `newest_first`: a page of the
        latest ones, then `before_seq` for the page before)."""
        order = audit_records.c.seq.desc() if newest_first else audit_records.c.seq
        query = sa.select(*_RECORD_COLUMNS).order_by(order)
        if after_seq is not None:
            query = query.where(audit_records.c.seq > after_seq)
        if before_seq is not None:
            query = query.where(audit_records.c.seq < before_seq)
        if since_ms is not None:
            query = query.where(audit_records.c.at_ms >= since_ms)
        if until_ms is not None:
            query = query.where(audit_records.c.at_ms < until_ms)
        if tenant is not None:
            query = query.where(audit_records.c.tenant == tenant)
        if limit is not None:
            query = query.limit(limit)
        with self._db.read() as conn:
            return [as_record(row) for row in conn.execute(query)]

    def iter_records(
        self,
        *,
        since_ms: int | None = None,
        until_ms: int | None = None,
        tenant: str | None = None,
    ) -> Iterator[AuditRecord]:
        """Every matching record in order, a page at a time (bounded memory: exports)."""
        after = -1
        while True:
            page = self.records(
                after_seq=after,
                since_ms=since_ms,
                until_ms=until_ms,
                tenant=tenant,
                limit=_READ_BATCH,
            )
            yield from page
            if len(page) < _READ_BATCH:
                return
            after = page[-1].seq

    def checkpoints(
        self, *, after_size: int | None = None, limit: int | None = None
    ) -> list[StoredCheckpoint]:
        query = sa.select(
            audit_checkpoints.c.size, audit_checkpoints.c.at_ms, audit_checkpoints.c.note
        ).order_by(audit_checkpoints.c.size)
        if after_size is not None:
            query = query.where(audit_checkpoints.c.size > after_size)
        if limit is not None:
            query = query.limit(limit)
        with self._db.read() as conn:
            return [StoredCheckpoint(*row) for row in conn.execute(query)]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        query = (
            sa.select(audit_checkpoints.c.size, audit_checkpoints.c.at_ms, audit_checkpoints.c.note)
            .order_by(audit_checkpoints.c.size.desc())
            .limit(1)
        )
        with self._db.read() as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else StoredCheckpoint(*row)

    def checkpoint_at(self, size: int) -> StoredCheckpoint | None:
        query = sa.select(
            audit_checkpoints.c.size, audit_checkpoints.c.at_ms, audit_checkpoints.c.note
        ).where(audit_checkpoints.c.size == size)
        with self._db.read() as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else StoredCheckpoint(*row)

    def prune_notes(self) -> list[StoredCheckpoint]:
        query = sa.select(audit_prunes.c.size, audit_prunes.c.at_ms, audit_prunes.c.note)
        with self._db.read() as conn:
            return [StoredCheckpoint(*row) for row in conn.execute(query.order_by("size"))]

    def leaves(self, size: int) -> Sequence[bytes]:
        """The leaf hashes of the tree of `size` records (a pruned prefix by its frontier);
        AuditLogError if the log does not hold them."""
        with self._db.read(snapshot=True) as conn:
            prune = _latest_prune(conn, None, upto=size)
            start = 0 if prune is None else prune.size
            tail = [record.leaf_hash for record in scan_records(conn, start, size)]
        if len(tail) != size - start:
            raise AuditLogError(f"The log does not hold every record of a tree of {size}.")
        if prune is None:
            return tail
        return merkle.PrunedLeaves(prune.size, prune.frontier, tail)

    def tree_root(self, size: int, leaves: Sequence[bytes] | None = None) -> bytes:
        """The root of the first `size` records (from `leaves`, the tree of a larger size,
        when given); ValueError when they lie in the pruned range."""
        leaves = self.leaves(size) if leaves is None else leaves
        if isinstance(leaves, merkle.PrunedLeaves):
            if size < leaves.pruned_size:
                raise ValueError(f"records below {leaves.pruned_size} were pruned")
            builder = merkle.TreeBuilder.from_frontier(leaves.pruned_size, leaves.frontier)
            for leaf in list(leaves.tail)[: size - leaves.pruned_size]:
                builder.append(leaf)
            return builder.root()
        return merkle.root_hash(list(leaves)[:size])

    # ------------------------------------------------------------------ internals

    def _in_write(self, action: Callable[[Connection, Signer, merkle.TreeBuilder], _T]) -> _T:
        """Run `action(conn, signer, builder)` in a write transaction on the synced tree;
        on any failure forget what this process believed (it is re-read next time)."""
        with self._lock:
            try:
                with self._db.write(bump_revision=False) as conn:
                    _lock_log(conn)
                    signer, mac_key = self._signer_in(conn)
                    self._mac_key = mac_key
                    builder = self._synced(conn, signer)
                    result = action(conn, signer, builder)
                self._signer = signer
                return result
            except BaseException:
                self._builder = None
                self._signer = None
                self._known_note = None
                raise

    def _signer_in(self, conn: Connection) -> tuple[Signer, bytes]:
        """The signing key and MAC key, made (in this transaction) with the first record;
        kept by the process only once that transaction commits."""
        if self._signer is not None:
            return self._signer, self._mac_key
        row = conn.execute(sa.select(audit_keys).where(audit_keys.c.id == _KEY_ROW)).one_or_none()
        if row is not None:
            return self._open_signer(row)
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
        return signer, mac_key_of(seed)

    def _open_signer(self, row: Any) -> tuple[Signer, bytes]:
        try:
            seed = self._keyring.open(bytes(row.sealed_seed), SEED_CONTEXT)
            signer = Signer(row.origin, seed)
        except Exception as exc:
            raise AuditLogError("The audit log's signing key does not open.") from exc
        if signer.verifier().public_key != bytes(row.public_key):
            raise AuditLogError("The audit log's stored public key is not its signing key's.")
        return signer, mac_key_of(seed)

    def _synced(self, conn: Connection, signer: Signer) -> merkle.TreeBuilder:
        """The tree builder at the log's current size, having folded in (and authenticated)
        what other processes appended; AuditLogTampered when the log lost records this
        process saw, or holds one its writers did not write."""
        verifier = signer.verifier()
        prune = _latest_prune(conn, verifier)
        pruned = 0 if prune is None else prune.size
        builder = self._builder
        if builder is not None:
            top = _next_seq(conn)
            if top < builder.size and pruned < builder.size:
                raise AuditLogTampered(
                    f"The audit log lost records: this process wrote up to {builder.size - 1}, "
                    f"the database ends before {top}."
                )
            if pruned > builder.size:
                builder = None  # another process pruned past what this one had read
        if builder is None:
            builder = _resume_point(conn, verifier, prune)
        expected = builder.size
        for record in scan_records(conn, builder.size, None):
            if record.seq != expected:
                raise AuditLogTampered(f"Audit record {expected} is missing.")
            if not hmac.compare_digest(record.mac, record_mac(self._mac_key, record.entry)):
                raise AuditLogTampered(
                    f"Audit record {record.seq} was not written by Bastion (its MAC is wrong)."
                )
            builder.append(record.leaf_hash)
            expected += 1
        self._builder = builder
        return builder

    def _checkpoint_in(
        self, conn: Connection, signer: Signer, builder: merkle.TreeBuilder, *, force: bool
    ) -> bool:
        last_size, last_ms = self._latest_genuine(conn, signer.verifier(), builder)
        now = self._clock()
        pending = builder.size - last_size
        if pending <= 0:
            return False
        due = force or pending >= self._every or now - last_ms / 1000 >= self._interval_s
        if not due:
            return False
        occupied = conn.execute(
            sa.select(audit_checkpoints.c.note).where(audit_checkpoints.c.size == builder.size)
        ).scalar_one_or_none()
        if occupied is not None:
            raise AuditLogTampered(
                f"A checkpoint this log did not sign sits at size {builder.size}."
            )
        text = Checkpoint(signer.name, builder.size, builder.root()).encode()
        note = sign(text, signer).decode()
        conn.execute(
            sa.insert(audit_checkpoints).values(
                size=builder.size,
                at_ms=int(now * 1000),
                note=note,
                frontier=b"".join(builder.frontier),
            )
        )
        self._known_note = note
        return True

    def _latest_genuine(
        self, conn: Connection, verifier: Verifier, builder: merkle.TreeBuilder
    ) -> tuple[int, int]:
        """The size and time of the latest checkpoint that is signed by this log and no
        larger than the tree; a forged one above it is refused."""
        rows = conn.execute(
            sa.select(audit_checkpoints.c.size, audit_checkpoints.c.at_ms, audit_checkpoints.c.note)
            .order_by(audit_checkpoints.c.size.desc())
            .limit(1)
        ).all()
        for size, at_ms, note in rows:
            if note == self._known_note:
                return int(size), int(at_ms)
            checkpoint = _genuine_checkpoint(note, verifier)
            if checkpoint is None or checkpoint.size != size or checkpoint.size > builder.size:
                raise AuditLogTampered(f"The audit checkpoint at size {size} is not genuine.")
            if checkpoint.size == builder.size and checkpoint.root != builder.root():
                raise AuditLogTampered(
                    f"The audit checkpoint at size {size} signs another tree than the log's."
                )
            self._known_note = note
            return int(size), int(at_ms)
        return 0, 0


_RECORD_COLUMNS = (
    audit_records.c.seq,
    audit_records.c.at_ms,
    audit_records.c.actor,
    audit_records.c.tenant,
    audit_records.c.action,
    audit_records.c.target,
    audit_records.c.outcome,
    audit_records.c.entry,
    audit_records.c.mac,
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
            yield as_record(row)
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


def as_record(row: Any) -> AuditRecord:
    """A record from its row, whatever types a tampered row holds (a BLOB entry on SQLite
    reads as bytes): verification must report such a row, not fail on it."""
    seq, at_ms, actor, tenant, action, target, outcome, entry, mac = row
    if not isinstance(entry, str):
        entry = bytes(entry).decode("utf-8", "replace")
    return AuditRecord(
        int(seq),
        int(at_ms),
        actor,
        tenant,
        action,
        target,
        outcome,
        entry,
        bytes(mac) if mac is not None else b"",
    )


def _lock_log(conn: Connection) -> None:
    """Serialise the log's writers: SQLite's BEGIN IMMEDIATE already holds the database's
    write lock; on PostgreSQL a transaction-scoped advisory lock (which also covers the
    first record, before the key row exists) and the key row (FOR UPDATE renders nothing
    on SQLite). Every statement after it sees what earlier writers committed."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(AUDIT_LOG_LOCK)))
    conn.execute(
        sa.select(audit_keys.c.id).where(audit_keys.c.id == _KEY_ROW).with_for_update()
    ).all()


def stored_text(note: object) -> str:
    """A note as the database returned it: text, or bytes where a tampered row holds a
    BLOB (SQLite); ValueError for anything else."""
    if isinstance(note, str):
        return note
    if isinstance(note, bytes | bytearray | memoryview):
        return bytes(note).decode("utf-8", "replace")
    raise ValueError("not a note")


def _genuine_checkpoint(note: Any, verifier: Verifier) -> Checkpoint | None:
    try:
        text = stored_text(note)
        checkpoint = Checkpoint.parse(open_note(text.encode(), [verifier])[0])
    except (ValueError, UnicodeDecodeError):
        return None
    return checkpoint if checkpoint.origin == verifier.name else None


def _thin_checkpoints(conn: Connection, pruned: int, now_ms: int) -> None:
    """Drop checkpoints below the pruned size (their records are gone) and, of those older
    than a day, keep the latest of each hour: verification reads every signature."""
    conn.execute(sa.delete(audit_checkpoints).where(audit_checkpoints.c.size < pruned))
    old = conn.execute(
        sa.select(audit_checkpoints.c.size, audit_checkpoints.c.at_ms)
        .where(audit_checkpoints.c.at_ms < now_ms - _THIN_AFTER_MS)
        .order_by(audit_checkpoints.c.size.desc())
    ).all()
    kept_hours: set[int] = set()
    drop = []
    for size, at_ms in old:
        hour = int(at_ms) // _THIN_TO_MS
        if hour in kept_hours:
            drop.append(size)
        else:
            kept_hours.add(hour)
    for i in range(0, len(drop), 500):
        conn.execute(
            sa.delete(audit_checkpoints).where(audit_checkpoints.c.size.in_(drop[i : i + 500]))
        )


def _builder_at(prune: PruneNote | None) -> merkle.TreeBuilder:
    if prune is None:
        return merkle.TreeBuilder()
    return merkle.TreeBuilder.from_frontier(prune.size, prune.frontier)


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
    conn: Connection, verifier: Verifier | None, *, upto: int | None = None
) -> PruneNote | None:
    """The latest prune note (at most `upto`) that parses and, with `verifier`, is signed by
    the log; damaged or forged ones are passed over (verification reports them)."""
    query = sa.select(audit_prunes.c.note).order_by(audit_prunes.c.size.desc())
    if upto is not None:
        query = query.where(audit_prunes.c.size <= upto)
    for (note,) in conn.execute(query.limit(20)):
        try:
            text = stored_text(note)
            body = open_note(text.encode(), [verifier])[0] if verifier else _note_text(text)
            parsed = PruneNote.parse(body)
        except (ValueError, UnicodeDecodeError):
            continue
        if verifier is None or parsed.origin == verifier.name:
            return parsed
    return None


def _resume_point(
    conn: Connection, verifier: Verifier, prune: PruneNote | None
) -> merkle.TreeBuilder:
    """Where a writer goes on from without rereading the whole log: the latest genuine
    checkpoint's cached frontier (checked against its signed root) or prune note, else the
    start."""
    best = _builder_at(prune)
    row = conn.execute(
        sa.select(audit_checkpoints.c.note, audit_checkpoints.c.frontier)
        .order_by(audit_checkpoints.c.size.desc())
        .limit(1)
    ).one_or_none()
    if row is None:
        return best
    checkpoint = _genuine_checkpoint(row.note, verifier)
    if checkpoint is None or checkpoint.size <= best.size:
        return best
    frontier = bytes(row.frontier or b"")
    nodes = [frontier[i : i + 32] for i in range(0, len(frontier), 32)]
    try:
        builder = merkle.TreeBuilder.from_frontier(checkpoint.size, nodes)
    except ValueError:
        return best  # a damaged cache: the writer rereads from the prune point
    return builder if builder.root() == checkpoint.root else best


def _note_text(note: str) -> str:
    return note.split("\n\n", 1)[0] + "\n"


def _cut(value: str | None, column: str) -> str | None:
    if value is None:
        return None
    return _text_of(value, _LIMITS[column])


def _text_of(value: object, limit: int) -> str:
    """Printable text only (no controls, no lone surrogates), at most `limit` characters."""
    return _UNWANTED.sub("", str(value))[:limit]


def _clean_detail(detail: Mapping[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in list(detail.items())[:_MAX_DETAIL_KEYS]:
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            value = value if abs(value) < 2**63 else str(value)[:_MAX_DETAIL_TEXT]
        elif value is not None and not isinstance(value, bool):
            value = _text_of(value, _MAX_DETAIL_TEXT)
        clean[_text_of(key, 64)] = value
    return clean
