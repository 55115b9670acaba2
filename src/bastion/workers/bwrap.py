"""The bubblewrap sandbox: each worker in its own namespaces, with no network and a file
system holding only what it needs.

A worker started by :class:`BwrapSandbox` runs as ``bwrap ... -- python -m
bastion.workers.main``:

- new user (uid/gid 65534 inside), PID, network, IPC, UTS and cgroup namespaces; no
  network at all (the IPC socket, a file in its private directory, is its only way out);
  user namespaces disabled inside, every capability dropped, its own session;
- a file system of read-only binds: the system's ``/usr``, the Python runtime (its
  installation, the virtual environment, Bastion's own source when installed in place,
  ``PYTHONPATH`` entries), the model's directory (for a bundle: that one bundle), and a
  writable bind of its private IPC directory; a private, size-limited tmpfs ``/tmp``; a
  private ``/proc`` and a minimal ``/dev``; everything else read-only. No home directory,
  no ``$BASTION_HOME``, no ``/etc`` beyond the linker cache and the time zone;
- a seccomp filter (libseccomp, through ``pyseccomp``) that makes the dangerous system
  calls fail with EPERM, and ``no_new_privs``;
- rlimits on address space, open files, processes, file size and core dumps, set before
  ``bwrap`` starts and inherited by the worker; ``--die-with-parent`` so that a worker never
  outlives the gateway.

cgroup limits (memory, CPU, processes) come from :mod:`bastion.workers.cgroups`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import ConfigurationError
from bastion.workers.cgroups import Cgroups, WorkerCgroup
from bastion.workers.sandbox import SubprocessWorker, WorkerLaunch, worker_environment

logger = logging.getLogger("bastion.workers.bwrap")

# The uid and gid a worker has inside its user namespace ("nobody").
SANDBOX_ID = 65534
# System calls a model's code has no business making; they fail with EPERM.
DENIED_SYSCALLS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "unshare",
    "setns",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "perf_event_open",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    "iopl",
    "ioperm",
    "settimeofday",
    "clock_settime",
    "adjtimex",
    "sethostname",
    "setdomainname",
)
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
        self._seccomp = seccomp_program()
        self._cgroups = cgroups

    def check(self) -> None:
        """Start one empty sandbox; ConfigurationError with bwrap's reason if it cannot."""
        probe = WorkerLaunch(
            worker_id="probe", argv=["/usr/bin/true"], ipc_dir=Path("/"), model_dir=Path("/")
        )
        argv = self._argv(probe, seccomp_fd=None)
        try:
            result = subprocess.run(
                argv, capture_output=True, timeout=30, check=False, preexec_fn=self._limiter(None)
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigurationError(f"bubblewrap cannot start: {exc}") from None
        if result.returncode != 0:
            reason = result.stderr.decode("utf-8", "replace").strip()[:300]
            raise ConfigurationError(
                f"bubblewrap cannot create a sandbox here ({reason}); user namespaces may be "
                "disabled. Use --unsafe-no-sandbox only for trusted models."
            )

    async def launch(self, launch: WorkerLaunch) -> SubprocessWorker:
        parent = os.environ if self._environ is None else self._environ
        cgroup = self._cgroups.create(launch.worker_id) if self._cgroups is not None else None
        seccomp_fd = _sealed_fd(self._seccomp)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv(launch, seccomp_fd=seccomp_fd, environ=parent),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=worker_environment(launch, parent),
                cwd="/",
                start_new_session=True,
                close_fds=True,
                pass_fds=(seccomp_fd,),
                preexec_fn=self._limiter(cgroup),
            )
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        finally:
            os.close(seccomp_fd)
            if cgroup is not None:
                cgroup.close_files()

        def on_exit() -> str | None:
            if cgroup is None:
                return None
            note = "killed at its memory limit" if cgroup.out_of_memory() else None
            cgroup.remove()
            return note

        # bwrap runs the worker as its descendant, which the gateway accepts as the peer.
        return SubprocessWorker(process, launch.worker_id, on_exit)

    def _limiter(self, cgroup: WorkerCgroup | None) -> Callable[[], None]:
        limits = self._limits
        libc = ctypes.CDLL(None, use_errno=True)

        def limit() -> None:
            """In the child, before exec: cgroup, rlimits, no_new_privs."""
            if cgroup is not None:
                cgroup.join()
            _set_limit(resource.RLIMIT_AS, limits.address_space_bytes)
            _set_limit(resource.RLIMIT_NOFILE, limits.open_files)
            if cgroup is None:
                # Counts every process of the (real) user, so only when no pids cgroup
                # can count the worker's own.
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
    ) -> list[str]:
        argv = [
            self._bwrap,
            "--unshare-user",
            "--uid",
            str(SANDBOX_ID),
            "--gid",
            str(SANDBOX_ID),
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
            "bastion-worker",
            "--unshare-cgroup-try",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            *_system_binds(),
            "--proc",
            "/proc",
            "--dev",
            "/dev",
        ]
        if self._limits.tmp_bytes:
            argv += ["--size", str(self._limits.tmp_bytes)]
        argv += ["--tmpfs", "/tmp"]  # noqa: S108 - the sandbox's own, private tmpfs
        # After /tmp: the runtime (a checkout and its venv), the model and the worker's
        # directory may all lie under the host's /tmp, and are mounted over the tmpfs.
        argv += _ro_binds(runtime_paths(environ or {}))
        if launch.model_dir != Path("/"):
            argv += ["--ro-bind", str(launch.model_dir), str(launch.model_dir)]
        if launch.ipc_dir != Path("/"):
            argv += ["--bind", str(launch.ipc_dir), str(launch.ipc_dir)]
            argv += ["--chdir", str(launch.ipc_dir)]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        # Last: the root bwrap built is read-only too (/tmp, /dev/shm and the private
        # directory, mounted on it, stay writable).
        argv += ["--remount-ro", "/"]
        return [*argv, "--", *launch.argv]


def runtime_paths(environ: Mapping[str, str]) -> list[Path]:
    """What a worker needs to run Python and Bastion, each as its real path."""
    import bastion

    paths = {Path(sys.base_prefix), Path(sys.prefix)}
    package = Path(bastion.__file__).resolve().parent
    if not any(package.is_relative_to(p.resolve()) for p in paths):
        # Installed in place (pip install -e): the source tree, not the whole checkout,
        # which may hold the home directory.
        paths.add(package.parent)
    for entry in environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and Path(entry).is_dir():
            paths.add(Path(entry))
    return sorted({p.resolve() for p in paths} | {p for p in paths if p.is_absolute()})


def _system_binds() -> list[str]:
    """/usr read-only, and the top-level links (or binds) a merged-/usr system has."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64"):
        path = Path("/") / name
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), str(path)]
    for name in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", name, name]
    return argv


def _ro_binds(paths: Sequence[Path]) -> list[str]:
    argv: list[str] = []
    for path in paths:
        if str(path).startswith("/usr/") or path == Path("/usr"):
            continue
        argv += ["--ro-bind", str(path), str(path)]
    return argv


def seccomp_program() -> bytes:
    """The BPF program denying :data:`DENIED_SYSCALLS` (EPERM), allowing the rest."""
    import errno

    import pyseccomp

    program = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            program.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
        except (OSError, ValueError):
            # Not a system call on this architecture.
            continue
    reader, writer = os.pipe()
    try:
        with os.fdopen(writer, "wb", closefd=False) as handle:
            program.export_bpf(handle)
        os.close(writer)
        writer = -1
        chunks = []
        while chunk := os.read(reader, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(reader)
        if writer >= 0:
            os.close(writer)


def _sealed_fd(data: bytes) -> int:
    """A file descriptor from which `data` can be read from the start (a memfd)."""
    fd = os.memfd_create("bastion-seccomp", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _set_limit(kind: int, value: int) -> None:
    if value > 0:
        resource.setrlimit(kind, (value, value))
