"""The usage meter's journal: every count recorded in memory is also appended to a file, so
a gateway killed at any moment (``kill -9``, the OOM killer) loses none of the usage of
the requests it had answered.

Each gateway appends to ``<home>/usage/<id>.current`` (no fsync: the kernel keeps what was
written when the process dies; a machine crash may lose the last moments), and holds an
exclusive lock on it while it lives. The records of one turn of the gateway's event loop
are written together, in one small write system call, as that turn ends, before any task
it woke runs: the record of a request's answer, made as the worker's reply arrives, is
written before the answer is sent. An answer sent in the turn a record was made in (a
request refused or failing as it is admitted) is preceded by :meth:`UsageJournal.sync`
(the gateway's app calls it before every error answer: a success follows a worker's reply,
so a later turn than its records); a record made outside an event loop is written at
once. (A record no answer waits on, of a request still running or of one whose client left,
is lost if the gateway dies within the turn it was made in, as one made a moment before its
write always could be.) At each flush the current file becomes ``<id>.<n>.pending``; the
flush writes the counts to the ``usage`` table *and* the pending files' names to
``usage_flushes`` in one transaction, then deletes the files. A gateway starting up adds
what dead gateways left behind, skipping files already recorded as flushed (a gateway
killed between the commit and the deletion): nothing is counted twice.

Lines hold tenant names, model names, hours and numbers, separated by tabs (names cannot
hold a tab or a newline: both are validated): never a key or a payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("bastion.quotas.journal")

CURRENT = ".current"
PENDING = ".pending"
# A record: tenant, model, hour (Unix seconds), requests, refused, prompt and completion
# tokens, compute seconds.
Record = tuple[str, str, int, int, int, int, int, float]


@dataclass(frozen=True, slots=True)
class Leftover:
    """A journal file a dead gateway left, and the records it holds."""

    path: Path
    records: list[Record]


class UsageJournal:
    """One gateway's journal files; not thread-safe (the meter holds its lock)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._id = secrets.token_hex(8)
        self._rotations = 0
        self._fd = -1
        self._broken = False
        # Records of this turn of the event loop, written as it ends (see the docstring).
        self._lock = threading.Lock()
        self._buffer: list[str] = []
        self._scheduled = False
        self._open_current()

    @property
    def current(self) -> Path:
        return self.directory / f"{self._id}{CURRENT}"

    def append(self, record: Record) -> None:
        """Write one record: by the end of the event loop's turn (at once outside an event
        loop). A failing disk (full, say) is logged once and then ignored: the count is
        still in memory and will reach the database at the next flush."""
        tenant, model, hour, requests, refused, prompt, completion, compute = record
        line = (
            f"{tenant}\t{model}\t{hour}\t{requests}\t{refused}\t{prompt}\t{completion}\t{compute}\n"
        )
        with self._lock:
            self._buffer.append(line)
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write_buffered()
                return
            self._scheduled = True
        loop.call_soon(self._turn_ended)

    def sync(self) -> None:
        """Write the records not written yet (none, mostly: a cheap call)."""
        if not self._buffer:
            return
        with self._lock:
            self._write_buffered()

    def _turn_ended(self) -> None:
        with self._lock:
            self._scheduled = False
            self._write_buffered()

    def _write_buffered(self) -> None:
        buffer = self._buffer
        if not buffer or self._fd < 0:
            return
        self._buffer = []
        data = (buffer[0] if len(buffer) == 1 else "".join(buffer)).encode()
        try:
            os.write(self._fd, data)
        except OSError as exc:
            if not self._broken:
                self._broken = True
                logger.warning(
                    "the usage journal cannot be written; a gateway killed now would lose "
                    "the usage since the last flush",
                    extra={"error": exc.strerror},
                )
            return
        self._broken = False

    def rotate(self) -> Path:
        """Close the current file as a pending one (returned) and start a new one."""
        # The records not written yet go with the counts they were made with.
        self.sync()
        self._rotations += 1
        pending = self.directory / f"{self._id}.{self._rotations}{PENDING}"
        os.rename(self.current, pending)
        os.close(self._fd)
        self._open_current()
        return pending

    def close(self) -> None:
        """Stop (after a final flush): the empty current file goes, and with it the lock."""
        if self._fd < 0:
            return
        self.sync()
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_size == 0:
                self.current.unlink()
        os.close(self._fd)
        self._fd = -1

    def _open_current(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        self._fd = os.open(self.current, flags, 0o600)
        # Held while this gateway lives: how another one knows the file is not a leftover.
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def leftovers(directory: Path) -> Iterator[Leftover]:
    """The files of gateways that are gone (their current file is not locked)."""
    if not directory.is_dir():
        return
    owners: dict[str, list[Path]] = {}
    for path in directory.iterdir():
        if path.name.endswith((CURRENT, PENDING)):
            owners.setdefault(path.name.split(".", 1)[0], []).append(path)
    for owner, paths in sorted(owners.items()):
        current = directory / f"{owner}{CURRENT}"
        if current.exists() and _locked(current):
            continue
        for path in sorted(paths):
            try:
                records = _read(path)
            except FileNotFoundError:
                # Another gateway recovering the same leftovers got there first.
                continue
            yield Leftover(path, records)


def _locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _read(path: Path) -> list[Record]:
    """The records of a file; a line cut short by the process's death (no newline) is
    dropped."""
    records: list[Record] = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        try:
            fields = line.decode().split("\t")
            if len(fields) != 8:
                continue
            tenant, model, hour, requests, refused, prompt, completion, compute = fields
            records.append(
                (str(tenant), str(model), int(hour), int(requests), int(refused), int(prompt),
                 int(completion), float(compute))
            )  # fmt: skip
        except ValueError:
            continue
    return records
