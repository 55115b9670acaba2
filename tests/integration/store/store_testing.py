"""Helpers of the database-level tests (tests/integration/store)."""

from __future__ import annotations

import os
import subprocess
import sys

from bastion_testing import run_threads

__all__ = ["run_processes", "run_threads"]


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
