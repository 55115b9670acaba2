"""Per-worker cgroups: memory, CPU and process limits the kernel enforces.

Each worker gets a child cgroup of the gateway's own (so the limits nest inside whatever
the gateway itself was given), on cgroup v2 (``memory.max``, ``cpu.max``, ``pids.max``) or
v1 (``memory.limit_in_bytes``, ``cpu.cfs_quota_us``, ``pids.max``, one hierarchy per
controller). The worker joins it before ``exec`` (see :meth:`WorkerCgroup.join`), so it is
limited from its first instruction; its cgroup is removed when it exits.

Where the host does not allow it (no permission, a controller missing, a read-only cgroup
file system), :func:`detect` says why; the gateway logs the reason once and the workers
run with their rlimits only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("bastion.sandboxes.cgroups")

CGROUP_ROOT = Path("/sys/fs/cgroup")
_GROUP = "bastion-workers"
_CPU_PERIOD_US = 100_000


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    """0 means no limit of that kind."""

    memory_bytes: int = 0
    cpus: float = 0.0
    processes: int = 0


class WorkerCgroup:
    """The cgroup directories of one worker (one per v1 controller, or one on v2)."""

    def __init__(self, directories: list[Path]) -> None:
        self.directories = directories
        # Opened in the parent: the child only writes its pid (no allocation, no lookup).
        self._procs = [os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) for d in directories]

    def join(self) -> None:
        """Move the calling process into the cgroup (run in the child before exec)."""
        pid = str(os.getpid()).encode()
        for fd in self._procs:
            os.write(fd, pid)

    def close_files(self) -> None:
        for fd in self._procs:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._procs = []

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process of this cgroup for its memory limit."""
        for directory in self.directories:
            for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
                with contextlib.suppress(OSError, ValueError):
                    for line in (directory / name).read_text().splitlines():
                        field, _, value = line.partition(" ")
                        if field == key and int(value) > 0:
                            return True
        return False

    def remove(self) -> None:
        """Remove the (now empty) cgroup directories."""
        self.close_files()
        for directory in self.directories:
            with contextlib.suppress(OSError):
                directory.rmdir()


class Cgroups:
    """Creates worker cgroups under the gateway's own cgroup."""

    def __init__(self, parents: dict[str, Path], version: int, limits: CgroupLimits) -> None:
        # controller ("memory", "cpu", "pids"; "" on v2) -> the directory workers go under
        self._parents = parents
        self.version = version
        self._limits = limits

    def create(self, worker_id: str) -> WorkerCgroup:
        """A new cgroup for `worker_id`, limits written; OSError if the host refuses."""
        directories = []
        try:
            for controller, parent in self._parents.items():
                directory = parent / worker_id
                directory.mkdir(mode=0o755)
                directories.append(directory)
                self._write_limits(controller, directory)
            return WorkerCgroup(directories)
        except OSError:
            for directory in directories:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise

    def _write_limits(self, controller: str, directory: Path) -> None:
        limits = self._limits
        quota = int(limits.cpus * _CPU_PERIOD_US)
        if self.version == 2:
            if limits.memory_bytes:
                _write(directory / "memory.max", str(limits.memory_bytes))
                _write(directory / "memory.swap.max", "0", optional=True)
            if quota:
                _write(directory / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
            if limits.processes:
                _write(directory / "pids.max", str(limits.processes))
            return
        if controller == "memory" and limits.memory_bytes:
            _write(directory / "memory.limit_in_bytes", str(limits.memory_bytes))
            # Swap counts too where the kernel accounts it, so the limit cannot be dodged.
            _write(
                directory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes), optional=True
            )
        elif controller == "cpu" and quota:
            _write(directory / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
            _write(directory / "cpu.cfs_quota_us", str(quota))
        elif controller == "pids" and limits.processes:
            _write(directory / "pids.max", str(limits.processes))


def detect(limits: CgroupLimits, root: Path = CGROUP_ROOT) -> tuple[Cgroups | None, str]:
    """Cgroups for workers if this host lets us make them, else None and the reason."""
    try:
        own = _own_cgroups()
    except OSError as exc:
        return None, f"cannot read /proc/self/cgroup ({exc.strerror})"
    if (root / "cgroup.controllers").is_file():
        parent = root / own.get("", "/").lstrip("/") / _GROUP
        try:
            parent.mkdir(mode=0o755, exist_ok=True)
            available = set((parent.parent / "cgroup.controllers").read_text().split())
            wanted = {"memory", "cpu", "pids"} & available
            if wanted:
                _write(
                    parent.parent / "cgroup.subtree_control",
                    " ".join(f"+{c}" for c in sorted(wanted)),
                )
                _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(wanted)))
        except OSError as exc:
            return None, f"cgroup v2 at {root} is not writable here ({exc.strerror})"
        missing = {"memory", "cpu", "pids"} - wanted
        if missing:
            logger.warning(
                "cgroup controllers missing; those limits are not enforced",
                extra={"missing": ",".join(sorted(missing))},
            )
        return Cgroups({"": parent}, 2, limits), ""
    parents: dict[str, Path] = {}
    problems = []
    for controller in ("memory", "cpu", "pids"):
        base = root / controller
        if not (base / "cgroup.procs").exists():
            problems.append(f"{controller}: not mounted")
            continue
        relative = own.get(controller, own.get("cpu,cpuacct", "/")).lstrip("/")
        parent = base / relative / _GROUP
        try:
            parent.mkdir(mode=0o755, exist_ok=True)
        except OSError as exc:
            problems.append(f"{controller}: {exc.strerror}")
            continue
        parents[controller] = parent
    if not parents:
        return None, "cgroup v1: " + "; ".join(problems)
    if problems:
        logger.warning(
            "some cgroup limits cannot be enforced", extra={"reason": "; ".join(problems)}
        )
    return Cgroups(parents, 1, limits), ""


def _own_cgroups() -> dict[str, str]:
    """controller -> this process's cgroup path ("" for the v2 hierarchy)."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
        paths.setdefault(controllers, path)
    return paths


def _write(path: Path, value: str, *, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError:
        if not optional:
            raise
