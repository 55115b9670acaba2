"""No sandbox: a worker as a plain child process (``--unsafe-no-sandbox`` only)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

from bastion.sandboxes.base import SubprocessWorker, WorkerLaunch, worker_environment


class SubprocessSandbox:
    """No isolation beyond a separate process, a private directory and a minimal environment."""

    name = "none"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ

    def check(self) -> None:
        """A plain child process runs anywhere."""

    async def launch(self, launch: WorkerLaunch) -> SubprocessWorker:
        parent = os.environ if self._environ is None else self._environ
        # A new session keeps the terminal's Ctrl+C away from workers: the supervisor stops
        # them itself, after draining their requests.
        process = await asyncio.create_subprocess_exec(
            *launch.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=worker_environment(launch, parent),
            cwd=launch.ipc_dir,
            start_new_session=True,
            close_fds=True,
        )
        return SubprocessWorker(process, launch.worker_id)
