#!/usr/bin/env python3
"""Sandbox overhead: a worker's cold start and steady-state throughput, bubblewrap and
Docker vs none.

In one run, the backends taking turns going first, a supervisor (the gateway's own)
starts the echo model's worker and measures:

- cold start: from asking for the worker to the worker reporting Ready (process start,
  Python and Bastion imports, model load), each rep a fresh worker;
- steady state: echo chat requests over the worker's IPC channel, `--conc` in flight, for
  `--dur` seconds: the traffic pattern with the most system calls per unit of work, so
  the most exposed to seccomp and namespace costs.

The `bwrap` backend is the full sandbox, cgroups included where the host allows; `docker`
is the Docker backend (a running engine needed: `make docker-deps`), its image built
before the first measurement. Targets: bwrap throughput >= 95% of none; cold start <= none
+ 300 ms. Docker's figures are reported beside them, without a target.

Usage: .venv/bin/python benchmarks/sandbox.py [--reps 5] [--dur 5] [--conc 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from bastion.audit.events import MemoryEventSink
from bastion.config import Settings
from bastion.sandboxes.base import Sandbox
from bastion.sandboxes.factory import make_sandbox
from bastion.supervision.supervisor import ModelSpec, ModelState, Supervisor
from bastion.wire.protocol import Generate

SETTINGS = Settings(heartbeat_interval_s=1.0, load_timeout_s=60.0)
# The echo model reads nothing, but a sandbox binds its directory: an empty one.
# World-readable: a root gateway's Docker workers run as uid 65534.
MODEL_DIR = Path(tempfile.mkdtemp(prefix="bastion-bench-echo-"))
MODEL_DIR.chmod(0o755)


def sandbox(name: str) -> Sandbox:
    if name == "none":
        return make_sandbox(SETTINGS.with_changes(unsafe_no_sandbox=True))
    backend = make_sandbox(SETTINGS.with_changes(sandbox=name))
    check = getattr(backend, "check", None)
    if check is not None:
        check()
    return backend


async def cold_start(backend: Sandbox) -> float:
    supervisor = Supervisor(SETTINGS, backend, MemoryEventSink())
    await supervisor.start()
    try:
        started = time.perf_counter()
        await supervisor.ensure(ModelSpec("echo", "echo", MODEL_DIR, {}))
        status = await supervisor.wait_ready("echo", 60)
        elapsed = time.perf_counter() - started
        if status.state is not ModelState.READY:
            raise RuntimeError(f"the worker did not start: {status.detail}")
        return elapsed
    finally:
        await supervisor.stop(drain_timeout_s=1.0)


async def throughput(backend: Sandbox, seconds: float, concurrency: int) -> float:
    supervisor = Supervisor(SETTINGS, backend, MemoryEventSink())
    await supervisor.start()
    try:
        await supervisor.ensure(ModelSpec("echo", "echo", MODEL_DIR, {}))
        await supervisor.wait_ready("echo", 60)
        message = Generate(id=0, prompt="the quick brown fox jumps over the lazy dog")
        done = 0
        stop_at = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await supervisor.call("echo", message)
                done += 1

        # Warm-up, then the measured window.
        for _ in range(200):
            await supervisor.call("echo", message)
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)
    finally:
        await supervisor.stop(drain_timeout_s=1.0)


async def main_async(args: argparse.Namespace) -> int:
    backends = {name: sandbox(name) for name in ("none", "bwrap", "docker")}
    starts: dict[str, list[float]] = {name: [] for name in backends}
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for rep in range(args.reps):
        order = list(backends) if rep % 2 == 0 else list(reversed(backends))
        for name in order:
            starts[name].append(await cold_start(backends[name]))
        for name in order:
            rates[name].append(await throughput(backends[name], args.dur, args.conc))
    start = {name: statistics.median(values) for name, values in starts.items()}
    rate = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.reps} reps\n")
    print(f"| backend | cold start (median) | echo requests/s, conc {args.conc} (median) |")
    print("|---|---|---|")
    for name in backends:
        print(f"| {name} | {start[name] * 1000:.0f} ms | {rate[name]:.0f} |")
    ratio = rate["bwrap"] / rate["none"]
    extra_ms = (start["bwrap"] - start["none"]) * 1000
    print()
    print(f"{'PASS' if ratio >= 0.95 else 'FAIL'}  bwrap throughput >= 95% of none: {ratio:.1%}")
    verdict = "PASS" if extra_ms <= 300 else "FAIL"
    print(f"{verdict}  bwrap cold start <= none + 300 ms: {extra_ms:+.0f} ms")
    docker_ratio = rate["docker"] / rate["none"]
    docker_ms = (start["docker"] - start["none"]) * 1000
    print(f"info  docker throughput {docker_ratio:.1%} of none; cold start {docker_ms:+.0f} ms")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dur", type=float, default=5.0)
    parser.add_argument("--conc", type=int, default=8)
    return uvloop.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
