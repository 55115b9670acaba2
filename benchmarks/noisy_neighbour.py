#!/usr/bin/env python3
"""Noisy neighbour: does tenant A's flood slow tenant B down?

One `bastion serve` (bubblewrap sandbox, default settings) with the echo model made to
take `--work-ms` per request (a model whose time is spent computing, not in the gateway).
Two tenants with the same quota, `--quota` requests per minute each. In the same run:

1. baseline: B alone sends a steady open-loop load (`--b-rps` requests per second);
2. flood:    B sends the same load while A sends 10x its quota share, open loop;
3. flood, no quota on A (for context): A's flood is limited only by the fair queue.

Reported: B's p50/p99 latency and errors per phase, and what happened to A's requests.
Target: B's p99 under A's flood (phase 2) at most 2x its baseline p99.

Usage: .venv/bin/python benchmarks/noisy_neighbour.py [--dur 15] [--work-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

from bastion.config import Settings
from gateway_servers import bastion, run_command, start_echo_bastion
from proctree import Fleet


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def open_loop(
    base: str, key: str, rps: float, seconds: float, delay: float, work_ms: float
) -> tuple[list[float], Counter[int]]:
    """After `delay` s, send `rps` requests per second for `seconds`, whatever the answers
    take; the latencies of the 200s and the count of each status."""
    body = {"model": "echo", "prompt": f"__sleep__:{work_ms / 1000} hello", "max_tokens": 8}
    headers = {"authorization": f"Bearer {key}"}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def one() -> None:
            started = time.perf_counter()
            try:
                answer = await client.post("/v1/completions", json=body, headers=headers)
                statuses[answer.status_code] += 1
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - started)
            except httpx.HTTPError:
                statuses[0] += 1

        await asyncio.sleep(delay)
        tasks = []
        start = time.perf_counter()
        sent = 0
        while (now := time.perf_counter()) - start < seconds:
            due = int((now - start) * rps) + 1
            while sent < due:
                tasks.append(asyncio.create_task(one()))
                sent += 1
            await asyncio.sleep(min(0.005, 1 / rps))
        await asyncio.gather(*tasks)
    return latencies, statuses


def sender(job: tuple[str, str, float, float, float, float]) -> tuple[list[float], Counter[int]]:
    return asyncio.run(open_loop(*job))


def phase(
    pool: ProcessPoolExecutor, base: str, b_key: str, a_key: str | None, args: argparse.Namespace
) -> tuple[list[float], Counter[int], Counter[int]]:
    """B's steady load; A's flood (if any) starts `--warmup` s before B and lasts until B is
    done, so B meets a flood in its steady state (A's minute of burst allowance spent).
    Each tenant's client runs in a process of its own: A's client must not slow B's."""
    b_job = (base, b_key, args.b_rps, args.dur, 0.0, args.work_ms)
    if a_key is None:
        b_lat, b_status = sender(b_job)
        return b_lat, b_status, Counter()
    a_job = (base, a_key, 10 * args.quota / 60, args.warmup + args.dur, 0.0, args.work_ms)
    flood = pool.submit(sender, a_job)
    b = pool.submit(sender, (*b_job[:4], args.warmup, b_job[5]))
    b_lat, b_status = b.result()
    _, a_status = flood.result()
    return b_lat, b_status, a_status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dur", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--work-ms", type=float, default=20.0, help="model time per request")
    parser.add_argument("--quota", type=int, default=600, help="requests/minute per tenant")
    parser.add_argument("--b-rps", type=float, default=10.0, help="B's steady load")
    parser.add_argument(
        "--model-concurrency",
        type=int,
        default=Settings().model_concurrency,
        help="requests at the worker at once (BASTION_MODEL_CONCURRENCY; 0: adaptive window)",
    )
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="seconds of flood before B is measured"
    )
    args = parser.parse_args()
    capacity = 1000 / args.work_ms
    window = (
        "an adaptive window at the worker"
        if args.model_concurrency <= 0
        else f"{args.model_concurrency} request(s) at the worker at once"
    )
    print(
        f"model: {args.work_ms:g} ms per request (capacity ~{capacity:.0f} req/s); quota "
        f"{args.quota}/min per tenant ({args.quota / 60:.0f} req/s); B sends "
        f"{args.b_rps:g} req/s; A floods at {10 * args.quota / 60:.0f} req/s; "
        f"{args.dur:g} s per phase; {window}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-noisy-"))
    with Fleet(work) as fleet, ProcessPoolExecutor(2) as pool:
        echo = start_echo_bastion(
            fleet,
            work,
            action="completions",
            echo_options=("test_hooks=true",),
            env_extra={"BASTION_MODEL_CONCURRENCY": str(args.model_concurrency)},
        )
        home = ["--home", str(echo.home)]
        keys = {}
        for tenant in ("tenant-a", "tenant-b", "tenant-c"):
            run_command(bastion("tenants", "create", tenant, *home, "--json"), echo.env)
            create = ["keys", "create", "--tenant", tenant, "--model", "echo"]
            created = run_command(
                bastion(*create, "--action", "completions", *home, "--json"), echo.env
            )
            keys[tenant] = json.loads(created)["key"]
        for tenant in ("tenant-a", "tenant-b"):
            quota = ["quotas", "set", "--tenant", tenant, "--rpm", str(args.quota)]
            run_command(bastion(*quota, *home, "--json"), echo.env)
        time.sleep(2.5)  # the server picks the quotas up within its refresh interval
        rows = []
        plans = [
            ("B alone (baseline)", None),
            ("B + A flooding at 10x its quota", keys["tenant-a"]),
            ("B + C flooding, no quota (fair queue only)", keys["tenant-c"]),
        ]
        for name, flooder in plans:
            b_lat, b_status, a_status = phase(pool, echo.base, keys["tenant-b"], flooder, args)
            rows.append((name, b_lat, b_status, a_status))
            time.sleep(1.0)
    baseline_p99 = percentile(rows[0][1], 0.99)
    print()
    print("| phase | B p50 ms | B p99 ms | B ok / errors | flooder: 200 / 429 / 503 / other |")
    print("|---|---:|---:|---:|---|")
    for name, b_lat, b_status, a_status in rows:
        b_errors = sum(v for k, v in b_status.items() if k != 200)
        flooder = (
            f"{a_status[200]} / {a_status[429]} / {a_status[503]} / "
            f"{sum(v for k, v in a_status.items() if k not in (200, 429, 503))}"
            if a_status
            else "-"
        )
        print(
            f"| {name} | {statistics.median(b_lat) * 1000:.1f} | "
            f"{percentile(b_lat, 0.99) * 1000:.1f} | {b_status[200]} / {b_errors} | {flooder} |"
        )
    ratio = percentile(rows[1][1], 0.99) / baseline_p99
    verdict = (
        "PASS" if ratio <= 2.0 and not sum(v for k, v in rows[1][2].items() if k != 200) else "FAIL"
    )
    print(f"\nB's p99 under A's flood / baseline p99 = {ratio:.2f} (target <= 2.0): {verdict}")
    context = percentile(rows[2][1], 0.99) / baseline_p99
    print(f"B's p99 under an unquota'd flood (fair queue only) / baseline = {context:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
