#!/usr/bin/env python3
"""A flood of made-up API keys: how much does it slow the legitimate requests down?

One `bastion serve` with the echo model. A legitimate client sends completions one after
another (closed loop) and its latencies are measured twice in the same run: alone, and
while wrk floods the server with well-formed keys whose public ids do not exist (as a
client guessing keys would), `--conns` connections at once.

With `--baseline-ref REF` (for example 17f592f, before the key-id set), the same two
phases run first against that commit's code (a git worktree), so that before and after
are measured in one run on one machine.

Usage: .venv/bin/python benchmarks/auth_flood.py [--dur 10] [--conns 16] [--baseline-ref REF]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from gateway_servers import HERE, WRK, baseline_checkout, start_echo_bastion, wrk_missing
from proctree import Fleet

ROOT = HERE.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def legitimate(base: str, key: str, seconds: float) -> list[float]:
    """Completions one after another for `seconds`; their latencies in ms."""
    body = {"model": "echo", "prompt": "hello there", "max_tokens": 8}
    latencies: list[float] = []
    with httpx.Client(base_url=base, headers={"authorization": f"Bearer {key}"}) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            answer = client.post("/v1/completions", json=body)
            if answer.status_code != 200:
                raise SystemExit(f"the legitimate request failed: {answer.status_code}")
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def flood(base: str, conns: int, seconds: float, result: dict[str, float]) -> None:
    command = [WRK, "-t1", f"-c{conns}", f"-d{int(seconds)}s", "-s", str(HERE / "flood.lua"), base]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    fields = dict(part.split("=") for part in line.split()[1:])
    result["rps"] = int(fields["requests"]) / (int(fields["duration_us"]) / 1e6)


def measure(name: str, source: Path, args: argparse.Namespace, work: Path) -> dict[str, object]:
    (work / "logs").mkdir()
    fleet = Fleet(work / "logs")
    env = {"PYTHONPATH": str(source / "src")}
    try:
        target = start_echo_bastion(fleet, work, action="completions", env_extra=env)
        legitimate(target.base, target.key, 2)  # warm-up
        alone = legitimate(target.base, target.key, args.dur)
        flooded: dict[str, float] = {}
        flooder = threading.Thread(
            target=flood, args=(target.base, args.conns, args.dur + 2, flooded)
        )
        flooder.start()
        time.sleep(1)
        under = legitimate(target.base, target.key, args.dur)
        flooder.join()
        return {
            "version": name,
            "alone": (statistics.median(alone), percentile(alone, 0.99)),
            "flood": (statistics.median(under), percentile(under, 0.99)),
            "flood_rps": flooded.get("rps", 0.0),
        }
    finally:
        fleet.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dur", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--conns", type=int, default=16, help="wrk connections of the flood")
    parser.add_argument("--baseline-ref", help="also measure this commit, first")
    args = parser.parse_args()
    if wrk_missing():
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="bastion-flood-") as tmp:
        work = Path(tmp)
        if args.baseline_ref:
            (work / "a").mkdir()
            with baseline_checkout(args.baseline_ref, work) as baseline:
                rows.append(measure(f"before ({args.baseline_ref})", baseline, args, work / "a"))
        (work / "b").mkdir()
        rows.append(measure("this tree", ROOT, args, work / "b"))
    print(f"\nLegitimate completions, ms (flood: wrk -c{args.conns}, made-up key ids)\n")
    print("| version | p50 alone | p99 alone | p50 under flood | p99 under flood | flood req/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        alone, under = row["alone"], row["flood"]
        assert isinstance(alone, tuple) and isinstance(under, tuple)
        print(
            f"| {row['version']} | {alone[0]:.2f} | {alone[1]:.2f} | {under[0]:.2f} | "
            f"{under[1]:.2f} | {row['flood_rps']:,.0f} |"
        )
    print(f"\n(python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
