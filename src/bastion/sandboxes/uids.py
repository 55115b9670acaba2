"""Host user ids for workers: never root, one per worker.

A gateway running as root starts each worker as a host uid of its own, taken from a
configured range (``BASTION_WORKER_UID_BASE`` + 1 … + ``BASTION_WORKER_UID_COUNT``) and
given back when the worker exits, like systemd's dynamic users: the ids need no entry in
``/etc/passwd``, and ids that have one are skipped. Every worker also has one supplementary
group, the base id itself (:attr:`WorkerUids.group`): model directories the gateway serves
from its own home (bundles) are made readable by that group and no one else.

Each id is claimed by an exclusive lock on a file named after it in a root-only directory,
so that two gateways on one host never hand out the same id, and a crashed gateway's claims
end with its process.

Kernel checks that look at the caller's uid (sysctls under ``/proc/sys``, signals,
``/proc/<pid>`` files, per-user process limits) then see an unprivileged user that owns
nothing on the host, different for every worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from bastion.errors import ConfigurationError

DEFAULT_LOCK_DIR = Path("/run/bastion-worker-ids")


@dataclass(slots=True)
class WorkerUid:
    """A claimed host uid (and gid of the same number), held until :meth:`release`."""

    uid: int
    #: The workers' shared supplementary group.
    group: int
    _fd: int = field(repr=False)
    _pool: WorkerUids = field(repr=False)

    @property
    def gid(self) -> int:
        return self.uid

    def release(self) -> None:
        """Give the id back (idempotent)."""
        self._pool.release(self)


class WorkerUids:
    """Hands out host uids from ``[base + 1, base + count]``; thread-safe."""

    def __init__(self, base: int, count: int, lock_dir: Path = DEFAULT_LOCK_DIR) -> None:
        if base < 1000 or count < 1 or base + count >= 2**31 - 1:
            raise ConfigurationError(
                "BASTION_WORKER_UID_BASE must be at least 1000 and the range "
                "(BASTION_WORKER_UID_COUNT ids) must end below 2^31."
            )
        self._base = base
        self._count = count
        self._lock_dir = lock_dir
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}
        self._next = 0
        #: The supplementary group every worker has (the range's base id).
        self.group = base

    def claim(self) -> WorkerUid:
        """A free uid of the range; ConfigurationError if none is left."""
        with self._lock:
            self._prepare_dir()
            for step in range(self._count):
                offset = (self._next + step) % self._count
                uid = self._base + 1 + offset
                if uid in self._held or _known_id(uid):
                    continue
                fd = self._try_lock(uid)
                if fd is None:
                    continue
                self._held[uid] = fd
                self._next = offset + 1
                return WorkerUid(uid, self.group, fd, self)
        raise ConfigurationError(
            f"All {self._count} worker uids after {self._base} are in use; "
            "raise BASTION_WORKER_UID_COUNT."
        )

    def release(self, claimed: WorkerUid) -> None:
        with self._lock:
            fd = self._held.pop(claimed.uid, None)
        if fd is not None:
            # Closing the file ends the lock; the file stays for the next claim.
            os.close(fd)

    @property
    def in_use(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def _prepare_dir(self) -> None:
        try:
            self._lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"Cannot create {self._lock_dir} for the worker uid locks ({exc.strerror})."
            ) from None

    def _try_lock(self, uid: int) -> int | None:
        path = self._lock_dir / str(uid)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd


def _known_id(uid: int) -> bool:
    """Whether `uid` is a user or group the host already knows (then it is not ours)."""
    with contextlib.suppress(KeyError):
        pwd.getpwuid(uid)
        return True
    with contextlib.suppress(KeyError):
        grp.getgrgid(uid)
        return True
    return False


def grant_group_read(directory: Path, gid: int) -> None:
    """Let group `gid` read the tree at `directory` (its own files only, never a link's
    target): directories get g+rx, files g+r, and `gid` as their group. World bits are
    left as they are (none, for a bundle)."""
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in [*dirs, *files]:
            _grant(Path(root) / name, gid)
    _grant(directory, gid)


def _grant(path: Path, gid: int) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return
    wanted = 0o050 if stat.S_ISDIR(info.st_mode) else 0o040
    if info.st_gid != gid:
        os.lchown(path, -1, gid)
    if info.st_mode & wanted != wanted:
        os.chmod(path, stat.S_IMODE(info.st_mode) | wanted)
