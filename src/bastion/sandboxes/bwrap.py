"""The bubblewrap sandbox: each worker in its own namespaces, with no network and a file
system holding only what it needs.

A worker started by :class:`BwrapSandbox` runs as ``bwrap ... -- python -m
bastion.worker.main``:

- never as host root. A gateway running as root builds the sandbox with bubblewrap's own
  privileges (it can read what the gateway reads), and the worker starts as a host uid of
  its own (:mod:`bastion.sandboxes.uids`) through ``setpriv``, with empty capability sets.
  bubblewrap cannot map the sandbox's user onto another host user than its caller: with
  ``--unshare-user`` under a root gateway, the worker's uid 65534 *was* host uid 0, and
  could write the host's sysctls (``kernel.core_pattern``: host root). A gateway that is
  not root keeps a user namespace (uid 65534 inside, the gateway's own uid outside);
- new PID, network, IPC, UTS and cgroup namespaces; no network at all (the IPC socket, a
  file in its private directory, is its only way out); every capability dropped, its own
  session; no new user namespaces (seccomp, and ``--disable-userns`` where there is one);
- a file system of read-only binds: the system's ``/usr``, the Python runtime (its
  installation, the virtual environment, Bastion's own source when installed in place,
  ``PYTHONPATH`` entries), the model's directory (for a bundle: that one bundle) and the
  worker's private IPC directory; private, size-limited tmpfs ``/tmp`` (also its HOME) and
  ``/dev/shm``, its only writable places; a private ``/proc`` whose ``/proc/sys`` is
  read-only, a minimal ``/dev``, no ``/sys``. No home directory, no ``$BASTION_HOME``, no
  ``/etc`` beyond the linker cache and the time zone;
- a seccomp allow-list (:mod:`bastion.sandboxes.policy`), and ``no_new_privs``;
- rlimits on address space, open files, processes, file size and core dumps, set before
  ``bwrap`` starts and inherited by the worker; ``--die-with-parent`` so that a worker never
  outlives the gateway.

cgroup limits (memory, CPU, processes) come from :mod:`bastion.sandboxes.cgroups`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import resource
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import ConfigurationError
from bastion.sandboxes.base import (
    SubprocessWorker,
    WorkerLaunch,
    check_readable,
    hand_over,
    worker_environment,
)
from bastion.sandboxes.cgroups import Cgroups, WorkerCgroup
from bastion.sandboxes.policy import WORKER_TMP, bpf_program, runtime_paths
from bastion.sandboxes.uids import WorkerUid, WorkerUids

logger = logging.getLogger("bastion.sandboxes.bwrap")

# The uid and gid a worker has inside its user namespace ("nobody"), when there is one.
SANDBOX_ID = 65534
# Where the worker's writable tmpfs is mounted; also its HOME.
_PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    """Hard per-worker limits (0: no limit of that kind)."""

    address_space_bytes: int = 32 * 1024**3
    open_files: int = 4096
    processes: int = 512
    file_bytes: int = 1024**3
    tmp_bytes: int = 256 * 1024**2


class BwrapSandbox:
    """Starts each worker inside bubblewrap; see the module documentation."""

    name = "bwrap"

    def __init__(
        self,
        limits: WorkerLimits | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        bwrap: str | None = None,
        cgroups: Cgroups | None = None,
        uids: WorkerUids | None = None,
    ) -> None:
        self._limits = limits or WorkerLimits()
        self._environ = environ
        found = bwrap or shutil.which("bwrap")
        if found is None:
            raise ConfigurationError(
                "bubblewrap (bwrap) is not installed: install Debian's 'bubblewrap' package, "
                "or run without a sandbox with --unsafe-no-sandbox (not for untrusted models)."
            )
        self._bwrap = found
        self._seccomp = bpf_program()
        self._cgroups = cgroups
        # As root, workers run as host uids of their own, never as root (see the module
        # documentation); otherwise as the gateway's own uid, in a user namespace.
        self._uids = uids
        self._setpriv = ""
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
            if setpriv is None:
                raise ConfigurationError(
                    "setpriv (Debian's util-linux) is missing: a root gateway needs it to "
                    "start workers as unprivileged users."
                )
            self._setpriv = setpriv
            if self._uids is None:
                raise ConfigurationError("A root gateway needs a range of worker uids.")

    def check(self) -> None:
        """Start one empty sandbox; ConfigurationError with bwrap's reason if it cannot."""
        probe = WorkerLaunch(
            worker_id="probe", argv=["/usr/bin/true"], ipc_dir=Path("/"), model_dir=Path("/")
        )
        user = self._uids.claim() if self._uids is not None else None
        try:
            argv = self._argv(probe, seccomp_fd=None, user=user)
            result = subprocess.run(
                argv, capture_output=True, timeout=30, check=False, preexec_fn=self._limiter(None)
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigurationError(f"bubblewrap cannot start: {exc}") from None
        finally:
            if user is not None:
                user.release()
        if result.returncode != 0:
            reason = result.stderr.decode("utf-8", "replace").strip()[:300]
            raise ConfigurationError(
                f"bubblewrap cannot create a sandbox here ({reason}); user namespaces may be "
                "disabled. Use --unsafe-no-sandbox only for trusted models."
            )

    async def launch(self, launch: WorkerLaunch) -> SubprocessWorker:
        parent = os.environ if self._environ is None else self._environ
        user = self._uids.claim() if self._uids is not None else None
        cgroup: WorkerCgroup | None = None
        try:
            if user is not None:
                if launch.model_dir != Path("/"):
                    check_readable(launch.model_dir, user.uid, user.gid, (user.group,))
                hand_over(launch.ipc_dir, user.uid, user.gid)
            cgroup = self._cgroups.create(launch.worker_id) if self._cgroups is not None else None
            seccomp_fd = _sealed_fd(self._seccomp)
            try:
                process = await asyncio.create_subprocess_exec(
                    *self._argv(launch, seccomp_fd=seccomp_fd, environ=parent, user=user),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    env=worker_environment(launch, parent, home=WORKER_TMP),
                    cwd="/",
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(seccomp_fd,),
                    preexec_fn=self._limiter(cgroup, per_user=user is not None),
                )
            finally:
                os.close(seccomp_fd)
                if cgroup is not None:
                    cgroup.close_files()
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            if user is not None:
                user.release()
            raise

        def on_exit() -> str | None:
            # The worker's pid namespace died with bwrap: nothing runs as its uid any more.
            if user is not None:
                user.release()
            if cgroup is None:
                return None
            note = "killed at its memory limit" if cgroup.out_of_memory() else None
            cgroup.remove()
            return note

        # bwrap runs the worker as its descendant, which the gateway accepts as the peer,
        # and exits with 128 + N when a signal N killed it.
        return SubprocessWorker(process, launch.worker_id, on_exit, signal_statuses=True)

    def _limiter(
        self, cgroup: WorkerCgroup | None, *, per_user: bool = False
    ) -> Callable[[], None]:
        limits = self._limits
        libc = ctypes.CDLL(None, use_errno=True)

        def limit() -> None:
            """In the child, before exec: cgroup, rlimits, no_new_privs."""
            if cgroup is not None:
                cgroup.join()
            _set_limit(resource.RLIMIT_AS, limits.address_space_bytes)
            _set_limit(resource.RLIMIT_NOFILE, limits.open_files)
            if cgroup is None or per_user:
                # Counts every process of the (real) user: exact when the worker has a uid
                # of its own; otherwise only when no pids cgroup counts the worker's own.
                _set_limit(resource.RLIMIT_NPROC, limits.processes)
            _set_limit(resource.RLIMIT_FSIZE, limits.file_bytes)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                os._exit(126)

        return limit

    def _argv(
        self,
        launch: WorkerLaunch,
        *,
        seccomp_fd: int | None,
        environ: Mapping[str, str] | None = None,
        user: WorkerUid | None = None,
    ) -> list[str]:
        if user is not None:
            # bwrap keeps only what setpriv needs to become the worker's user; setpriv
            # then clears every capability set, the bounding set included.
            identity = [
                "--cap-drop", "ALL",
                "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
            ]  # fmt: skip
        else:
            identity = [
                "--unshare-user", "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID),
                "--disable-userns", "--cap-drop", "ALL",
            ]  # fmt: skip
        argv = [
            self._bwrap,
            *identity,
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
            "bastion-worker",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
            *_system_binds(),
            "--proc",
            "/proc",
            # bwrap covers /proc/sys only where the directory itself looks writable, which
            # it never does (0555), while files in it are writable by a root-mapped user.
            "--ro-bind",
            "/proc/sys",
            "/proc/sys",
            "--dev",
            "/dev",
        ]
        for tmpfs in ("/dev/shm", WORKER_TMP):  # noqa: S108 - the sandbox's own tmpfs
            argv += ["--perms", "01777"]
            if self._limits.tmp_bytes:
                argv += ["--size", str(self._limits.tmp_bytes)]
            argv += ["--tmpfs", tmpfs]
        # After /tmp: the runtime (a checkout and its venv), the model and the worker's
        # directory may all lie under the host's /tmp, and are mounted over the tmpfs.
        binds = [p for p in runtime_paths(environ or {}) if not p.is_relative_to("/usr")]
        if launch.model_dir != Path("/"):
            binds.append(launch.model_dir)
        if launch.ipc_dir != Path("/"):
            # Read-only: the worker only connects to its socket, and writes nothing to the
            # host's disk.
            binds.append(launch.ipc_dir)
        argv += _ro_binds(binds)
        argv += ["--chdir", WORKER_TMP]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        # Last: the root bwrap built is read-only too (the tmpfs mounted on it stay writable).
        argv += ["--remount-ro", "/"]
        command = list(launch.argv)
        if user is not None:
            command = [
                self._setpriv,
                f"--reuid={user.uid}",
                f"--regid={user.gid}",
                f"--groups={user.group}",
                "--inh-caps=-all",
                "--ambient-caps=-all",
                "--bounding-set=-all",
                "--",
                *command,
            ]
        return [*argv, "--", *command]


def _system_binds() -> list[str]:
    """/usr read-only, and the top-level links (or binds) a merged-/usr system has."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64"):
        path = Path("/") / name
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), str(path)]
    # Made first as 0755 (bubblewrap would make it owner-only, closed to a worker's user).
    argv += ["--perms", "0755", "--dir", "/etc"]
    for name in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", name, name]
    return argv


def _ro_binds(paths: Sequence[Path]) -> list[str]:
    """Read-only binds of `paths`, each at its own path, with the directories above them
    made first as 0755: bubblewrap would make them owner-only (root's), which a worker
    that is not root could not pass through."""
    argv: list[str] = []
    made = {Path("/"), Path(WORKER_TMP)}
    bound: list[Path] = []
    for path in paths:
        for parent in reversed(path.parents):
            if parent in made or any(parent.is_relative_to(b) for b in bound):
                continue
            argv += ["--perms", "0755", "--dir", str(parent)]
            made.add(parent)
        argv += ["--ro-bind", str(path), str(path)]
        bound.append(path)
    return argv


def _sealed_fd(data: bytes) -> int:
    """A file descriptor from which `data` can be read from the start (a memfd)."""
    fd = os.memfd_create("bastion-seccomp", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _set_limit(kind: int, value: int) -> None:
    if value > 0:
        resource.setrlimit(kind, (value, value))
