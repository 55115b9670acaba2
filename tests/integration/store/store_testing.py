"""Helpers of the database-level tests (tests/integration/store)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable


def run_processes(script: str, *args: str, copies: int = 2) -> list[str]:
    """Run `copies` Python processes of `script` at once (each gets its index and `args`);
    their outputs. Fails if any of them fails."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(index), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for index in range(copies)
    ]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        outputs.append(stdout)
    return outputs


def run_threads(*targets: Callable[[], None]) -> None:
    """Run each target in a thread of its own, started together; re-raise the first
    exception any of them raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def run(target: Callable[[], None]) -> None:
        try:
            start.wait(timeout=30)
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    if errors:
        raise errors[0]
