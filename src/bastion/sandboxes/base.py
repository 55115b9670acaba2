"""The seam between the supervisor and the thing that isolates a worker process.

The supervisor describes a worker with a :class:`WorkerLaunch` (the command, its private IPC
directory, the model directory) and asks a :class:`Sandbox` to start it. Backends differ only
in how they wrap the same command: :mod:`.unconfined` runs it as a plain child process with
a minimal environment; the bubblewrap and Docker backends wrap the same argv.
:mod:`.factory` builds the backend the settings name and, per model, the one its
``sandbox`` option names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bastion.errors import ConfigurationError

if TYPE_CHECKING:
    pass

# Longest line of worker output forwarded to the gateway's log; the rest is cut off so a
# worker cannot fill the log with one enormous line.
MAX_OUTPUT_LINE = 4096
OUTPUT_LOGGER = "bastion.workers.output"


@dataclass(frozen=True, slots=True)
class WorkerLaunch:
    """Everything a sandbox needs to start one worker.

    `env` holds extra variables for the worker; the sandbox builds the rest of the (minimal)
    environment itself and never passes the gateway's own environment through.
    """

    worker_id: str
    argv: list[str]
    ipc_dir: Path
    model_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    # The model's options (a cluster backend reads its resource needs from them).
    options: Mapping[str, object] = field(default_factory=dict)
    # Set for workers on other hosts: the backend calls it with its worker port and the
    # fingerprint of the certificate it issued for this worker, before the worker starts,
    # so that the gateway waits for exactly that connection.
    expect_certificate: Callable[[Any, str], None] | None = None


class WorkerProcess(Protocol):
    """A started worker, whatever isolates it."""

    @property
    def pid(self) -> int: ...

    @property
    def peer_pid(self) -> int | None:
        """The pid the worker's IPC connection may come from: the worker or an ancestor.

        The gateway accepts the connection from this process or any of its descendants
        (a launcher such as bubblewrap, or a container's init, may start the worker as its
        child). None means the gateway cannot see the worker's pid; any process of the
        gateway's own uid is then accepted.
        """
        ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int:
        """Wait for the worker to exit and return its exit status."""
        ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class Sandbox(Protocol):
    """A way to start worker processes in isolation."""

    name: str

    def check(self) -> None:
        """Raise ConfigurationError, with the reason, if this backend cannot run here."""
        ...

    async def launch(self, launch: WorkerLaunch) -> WorkerProcess: ...


def worker_argv(endpoint: str, log_level: str = "info", python: str | None = None) -> list[str]:
    """The command that starts the worker entry point connected to `endpoint`.

    `endpoint` is the path of the Unix socket the gateway listens on for this worker.

    `-P` keeps the working directory off `sys.path` and `-s` ignores the user's
    site-packages, so nothing beside the worker can shadow Bastion's modules.
    """
    executable = python or sys.executable
    module = ["-P", "-s", "-m", "bastion.worker.main"]
    return [executable, *module, "--endpoint", endpoint, "--log-level", log_level]


def worker_environment(
    launch: WorkerLaunch, parent: Mapping[str, str], *, home: str | None = None
) -> dict[str, str]:
    """The whole environment of a worker: a few fixed variables, never the parent's secrets.

    Only PATH and PYTHONPATH come from the parent. HOME is `home` (a sandbox's private
    tmpfs), else the worker's private directory. `launch.env` may tune the defaults (thread
    counts) but cannot lift the offline switches or move HOME.
    """
    env = {
        "PATH": parent.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # A Rust panic's message without a backtrace (it is withheld from the log anyway).
        "RUST_BACKTRACE": "0",
    }
    if parent.get("PYTHONPATH"):
        env["PYTHONPATH"] = parent["PYTHONPATH"]
    env.update(launch.env)
    env.update(
        {
            "HOME": home or str(launch.ipc_dir),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    return env


def check_readable(path: Path, uid: int, gid: int, groups: tuple[int, ...] = ()) -> None:
    """ConfigurationError unless `uid` (primary group `gid`, supplementary `groups`) may
    list and enter `path`, the model's directory.

    A root gateway's workers run as users of their own, who may not read an owner-only
    model directory; say so, rather than let the worker fail on it.
    """
    info = path.stat()
    if info.st_uid == uid:
        bits = (info.st_mode >> 6) & 0o7
    elif info.st_gid == gid or info.st_gid in groups:
        bits = (info.st_mode >> 3) & 0o7
    else:
        bits = info.st_mode & 0o7
    if bits & 0o5 != 0o5:
        group = f" or group {groups[0]}" if groups else ""
        raise ConfigurationError(
            f"the model's directory is not readable by uid {uid}, the user its worker runs "
            f"as when the gateway runs as root: let that uid{group} read it "
            "(chmod o+rX, or chgrp and g+rX), or run the gateway as another user"
        )


def hand_over(ipc_dir: Path, uid: int, gid: int) -> None:
    """Give the worker's private directory (and the socket in it) to the worker's user.

    It stays 0700 inside the gateway's own 0700 runtime directory: no other user on the
    host can reach it, and no other worker has it mounted (read-only, for its own).
    """
    os.chown(ipc_dir, uid, gid)
    for entry in ipc_dir.iterdir():
        os.chown(entry, uid, gid, follow_symlinks=False)


class SubprocessWorker:
    """A worker running as a direct child process in its own session."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        worker_id: str,
        on_exit: Callable[[], str | None] | None = None,
        *,
        signal_statuses: bool = False,
    ) -> None:
        self._process = process
        # Called once the process has exited: cleans up, and may explain the exit.
        self._on_exit = on_exit
        # The process runs the worker as its child and exits with 128 + N when the worker
        # was killed by signal N (bwrap does, as a shell does).
        self._signal_statuses = signal_statuses
        #: What the sandbox knows of why the worker exited (e.g. its memory limit), if any.
        self.exit_note: str | None = None
        logger = logging.getLogger(OUTPUT_LOGGER)
        assert process.stdout is not None
        self._output = asyncio.create_task(forward_output(process.stdout, logger, worker_id))

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def peer_pid(self) -> int:
        # The command runs as this very process: only it may connect.
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        code = await self._process.wait()
        if self._signal_statuses and 128 < code <= 128 + 64:
            # As for a direct child, a negative status says "killed by that signal".
            code = 128 - code
        if self._on_exit is not None:
            on_exit, self._on_exit = self._on_exit, None
            self.exit_note = on_exit()
        # A grandchild could hold the pipe open; the worker's own exit is what counts.
        try:
            await asyncio.wait_for(asyncio.shield(self._output), 1.0)
        except TimeoutError:
            self._output.cancel()
        return code

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self._process.returncode is not None:
            return
        # The worker leads its own process group, so this also reaches anything it spawned.
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            self._process.send_signal(signum)


# The backends a model's `sandbox` option may name. "none" is not among them: running
# without a sandbox is a server-wide decision (--unsafe-no-sandbox), never a model's.
MODEL_BACKENDS = ("bwrap", "docker")
SANDBOX_OPTION = "sandbox"


def check_sandbox_option(options: Mapping[str, object]) -> None:
    """Raise ConfigurationError unless a model's `sandbox` option, if any, names a backend."""
    chosen = options.get(SANDBOX_OPTION)
    if chosen is not None and chosen not in MODEL_BACKENDS:
        raise ConfigurationError(
            f"The sandbox option must be one of {', '.join(MODEL_BACKENDS)}; "
            f"got {str(chosen)[:40]!r}."
        )


async def forward_output(stream: asyncio.StreamReader, logger: logging.Logger, worker: str) -> None:
    """Log the worker's output line by line, each line cut to MAX_OUTPUT_LINE bytes."""
    pending = b""
    while chunk := await stream.read(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            _log_line(logger, worker, line)
        if len(pending) > MAX_OUTPUT_LINE:
            _log_line(logger, worker, pending)
            pending = b""
    if pending:
        _log_line(logger, worker, pending)


def _log_line(logger: logging.Logger, worker: str, line: bytes) -> None:
    text = line[:MAX_OUTPUT_LINE].decode("utf-8", "replace").rstrip()
    if text:
        logger.log(_level_of(text), "%s", text, extra={"worker": worker})


def _level_of(text: str) -> int:
    """The level a worker's JSON log line carries; INFO for anything else."""
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except ValueError:
            return logging.INFO
        if isinstance(record, dict):
            level = logging.getLevelName(str(record.get("level", "info")).upper())
            if isinstance(level, int):
                return level
    return logging.INFO
