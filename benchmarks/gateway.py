#!/usr/bin/env python3
"""Gateway overhead: Bastion's full request path against the Python ceiling and LitServe.

One run starts three servers on 127.0.0.1, drives each with wrk (keep-alive POSTs) at each
concurrency, interleaving the targets across repetitions so that a noisy machine hurts them
alike, and prints the medians as one table with the ratios to the ceiling measured in the
same run, then the target checks and Bastion's idle memory and time to ready.

    ceiling   uvicorn + httptools + uvloop, one Starlette route, fixed answer, no auth
    bastion   POST /v2/models/echo/infer with a tenant's API key: auth, routing, worker IPC
    litserve  LitServe 0.2.19 with its API key on, a LitAPI that echoes 64 floats

Usage: .venv/bin/python benchmarks/gateway.py [--reps 2] [--dur 8] [--conns 1,16,64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway_report import checks, figures, medians, report
from gateway_servers import (
    HERE,
    LITSERVE_VERSION,
    WRK,
    BenchmarkError,
    Target,
    baseline_checkout,
    check_answers,
    litserve_python,
    measure_startup,
    package_versions,
    raise_interrupt,
    start_bastion,
    start_ceiling,
    start_litserve,
    wrk_missing,
)
from proctree import Fleet, cpu_seconds, rss_mb

TARGET_NAMES = ("ceiling", "bastion", "litserve")


# ---------------------------------------------------------------- load


def run_wrk(target: Target, conns: int, dur: int) -> dict[str, Any]:
    env = dict(os.environ, BODYFILE=str(target.body_file), AUTH=target.auth, XKEY=target.xkey)
    command = [WRK, "-t1", f"-c{conns}", f"-d{dur}s", "--timeout", "10s"]
    command += ["-s", str(HERE / "post.lua"), target.url]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=dur + 60)
    found = re.search(r"^RESULT (.*)$", out.stdout, re.MULTILINE)
    if found is None:
        raise BenchmarkError(f"`{' '.join(command)}` printed no result:\n{out.stdout}{out.stderr}")
    raw = {k: int(v) for k, v in (pair.split("=") for pair in found.group(1).split())}
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "requests": raw["requests"],
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "non2xx": raw["err_status"],
        "socket_errors": sum(
            raw[k] for k in ("err_connect", "err_read", "err_write", "err_timeout")
        ),
    }


def measure(target: Target, conns: int, dur: int, warmup: int) -> dict[str, Any]:
    if warmup > 0:
        run_wrk(target, conns, warmup)
    pids = target.server.tree()
    main_before, all_before = cpu_seconds(pids[:1]), cpu_seconds(pids)
    row = run_wrk(target, conns, dur)
    after = target.server.tree()
    per_request = 1e6 / max(row["requests"], 1)
    row.update(
        cpu_us_per_req=(cpu_seconds(after) - all_before) * per_request,
        # The main process apart (Bastion's gateway), to show where the CPU goes.
        main_cpu_us_per_req=(cpu_seconds(after[:1]) - main_before) * per_request,
        server_processes=len(pids),
    )
    return row


def idle_cpu_percent(targets: dict[str, Target], seconds: float = 3.0) -> dict[str, float]:
    before = {n: cpu_seconds(t.server.tree()) for n, t in targets.items()}
    time.sleep(seconds)
    return {
        n: round((cpu_seconds(t.server.tree()) - before[n]) / seconds * 100, 1)
        for n, t in targets.items()
    }


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=2, help="repetitions (medians over them)")
    parser.add_argument("--dur", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each")
    parser.add_argument("--conns", default="1,16,64", help="concurrencies, comma-separated")
    parser.add_argument("--targets", default=",".join(TARGET_NAMES), help="subset to run")
    parser.add_argument("--startup-runs", type=int, default=2, help="Bastion start-up samples")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for JSON")
    parser.add_argument(
        "--baseline-ref", help="also measure Bastion at this git commit (row 'baseline')"
    )
    args = parser.parse_args()
    args.conns = [int(c) for c in args.conns.split(",")]
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(TARGET_NAMES)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {TARGET_NAMES}")
    return args


def start_targets(
    fleet: Fleet, work: Path, names: list[str], baseline: Path | None = None
) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for name in names:
        if name == "ceiling":
            targets[name] = start_ceiling(fleet, work)
        elif name == "bastion":
            targets[name] = start_bastion(fleet, work)
        elif name == "baseline" and baseline is not None:
            targets[name] = start_bastion(fleet, work / "baseline", name=name, source=baseline)
        else:
            targets[name] = start_litserve(fleet, work)
    check_answers(targets)
    return targets


def run_load(targets: dict[str, Target], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every target at every concurrency, each repetition; the targets take turns going first."""
    names, rows = list(targets), []
    for rep in range(args.reps):
        for i, c in enumerate(args.conns):
            shift = (rep * len(args.conns) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                row = measure(targets[name], c, args.dur, args.warmup)
                row.update(target=name, conns=c, rep=rep)
                rows.append(row)
                print(
                    f"rep {rep} c={c:<3} {name:9s} {row['rps']:9,.0f} req/s "
                    f"p50 {row['p50_ms']:6.2f} ms p99 {row['p99_ms']:7.2f} ms "
                    f"CPU {row['cpu_us_per_req']:6.0f} µs/req errors "
                    f"{row['non2xx'] + row['socket_errors']}",
                    flush=True,
                )
    return rows


def bastion_memory(target: Target) -> dict[str, Any]:
    """RSS of the gateway process, of each worker, and of both together."""
    pids = target.server.tree()
    workers = {str(pid): round(rss_mb(pid), 1) for pid in pids[1:]}
    gateway = round(rss_mb(pids[0]), 1)
    return {
        "gateway_rss_mb": gateway,
        "worker_rss_mb": workers,
        "gateway_plus_workers_rss_mb": round(gateway + sum(workers.values()), 1),
    }


def versions() -> dict[str, str]:
    return package_versions(
        ("bastion", "uvicorn", "starlette", "uvloop", "httptools"), litserve=LITSERVE_VERSION
    )


def main() -> int:
    args = parse_args()
    if wrk_missing():
        return 2
    # Stop the servers on SIGTERM as on Ctrl-C, also when started with SIGINT ignored (as a
    # background job of a script is).
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, raise_interrupt)
    names = [n for n in TARGET_NAMES if n in args.targets]
    if args.baseline_ref:
        names.insert(names.index("bastion") + 1 if "bastion" in names else 0, "baseline")
    if "litserve" in names:
        litserve_python()  # create the venv (first use) before any server runs
    planned = args.reps * len(args.conns) * len(names) * (args.dur + args.warmup)
    load_at_start = os.getloadavg()
    print(
        f"{planned} s of load: {args.reps} reps x c={args.conns} x {names}, {args.warmup} s "
        f"warm-up + {args.dur} s each; Bastion runs with BASTION_LOG_LEVEL=warning",
        flush=True,
    )
    startup: list[dict[str, Any]] = []
    idle: dict[str, Any] | None = None
    after_load: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bastion-bench-"))
        baseline = None
        if args.baseline_ref:
            baseline = stack.enter_context(baseline_checkout(args.baseline_ref, Path(tmp)))
        fleet = stack.enter_context(Fleet(Path(tmp)))
        try:
            if "bastion" in names:
                startup = measure_startup(fleet, Path(tmp), args.startup_runs)
            targets = start_targets(fleet, Path(tmp), names, baseline)
            if "bastion" in targets:
                time.sleep(2)  # let start-up work settle before reading idle memory
                idle = bastion_memory(targets["bastion"])
            idle_cpu = idle_cpu_percent(targets)
            rows = run_load(targets, args)
            if "bastion" in targets:
                after_load = bastion_memory(targets["bastion"])
        except BenchmarkError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
    med = medians(rows)
    load_at_end = os.getloadavg()
    machine = {
        "cpus": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": load_at_end,
    }
    lines = [
        f"{os.cpu_count()} CPUs, 1-min load average {load_at_start[0]:.2f} at start, "
        f"{load_at_end[0]:.2f} at end; wrk -t1, keep-alive POSTs; "
        f"medians of {args.reps} runs of {args.dur} s",
        "",
        *report(names, args.conns, med),
        "",
        *checks(med, idle, startup),
        "",
        *figures(med, idle, after_load, startup, idle_cpu),
    ]
    print("\n" + "\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gateway-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine,
        "versions": versions(),
        "rows": rows,
        "medians": [{"target": n, "conns": c, **m} for (n, c), m in med.items()],
        "report": lines,
        "bastion_memory_idle": idle,
        "bastion_memory_after_load": after_load,
        "bastion_startup": startup,
        "idle_cpu_percent": idle_cpu,
    }
    path.write_text(json.dumps(results, indent=1))
    print(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
