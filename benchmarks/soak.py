#!/usr/bin/env python3
"""Soak: mixed traffic for a long while, and whether the server's resources stay flat.

One `bastion serve` with the demo models and the echo model. For `--minutes` (10 by
default) a few clients send a steady mix, open loop: chat and streamed chat (tiny-chat),
completions of several prompts (echo), embeddings (minilm-l6), OIP inference (digits),
end-to-end encrypted chat (OHTTP, echo), requests with made-up keys, and requests that
are refused as bad input. Every `--every` seconds (10) it samples the gateway's resident
memory, open file descriptors and threads, the workers' memory, and the interval's
latencies, and prints one row; the last rows compare the first and the last samples.
Target: flat (no growth beyond noise once warm).

Not part of `make test`. Usage: .venv/bin/python benchmarks/soak.py [--minutes 10] [--rps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bastion.client import OHTTPTransport
from gateway_servers import bastion, bastion_env, free_port, http, run_command, wait_until
from proctree import Fleet, rss_mb

DIGIT = [round((i % 16) / 16, 3) for i in range(64)]


def _rank(latencies: list[float], q: float) -> float:
    """The `q` quantile in ms by nearest rank (so p50 <= p99 however few there are)."""
    if not latencies:
        return float("nan")
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


class Traffic:
    """The mix, sent open loop at `rps`; latencies and statuses per kind."""

    def __init__(self, base: str, key: str, fingerprints: list[str], rps: float) -> None:
        self.base, self.key, self.rps = base, key, rps
        self.fingerprints = fingerprints
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()

    async def run(self, seconds: float) -> None:
        headers = {"authorization": f"Bearer {self.key}"}
        limits = httpx.Limits(max_connections=64)
        async with (
            httpx.AsyncClient(base_url=self.base, headers=headers, timeout=60, limits=limits)
            as plain,
            httpx.AsyncClient(
                base_url=self.base, headers=headers, timeout=60,
                transport=OHTTPTransport(fingerprints=self.fingerprints),
            ) as sealed,
        ):  # fmt: skip
            tasks: set[asyncio.Task[None]] = set()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                task = asyncio.create_task(self._one(plain, sealed))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(random.expovariate(self.rps))
            await asyncio.gather(*tasks)

    async def _one(self, plain: httpx.AsyncClient, sealed: httpx.AsyncClient) -> None:
        kind = random.choices(
            ["chat", "stream", "prompts", "embed", "oip", "sealed", "bad_key", "bad_input"],
            weights=[2, 1, 3, 3, 4, 2, 2, 1],
        )[0]
        started = time.perf_counter()
        expected = {"bad_key": 401, "bad_input": 400}.get(kind, 200)
        try:
            status = await self._send(kind, plain, sealed)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        self.latencies.append(time.perf_counter() - started)
        self.statuses[f"{kind}:{status}"] += 1
        if status != expected:
            self.unexpected[f"{kind}:{status}"] += 1

    async def _send(self, kind: str, plain: httpx.AsyncClient, sealed: httpx.AsyncClient) -> Any:
        chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8}  # fmt: skip
        if kind == "chat":
            return (await plain.post("/v1/chat/completions", json=chat)).status_code
        if kind == "stream":
            async with plain.stream("POST", "/v1/chat/completions",
                                    json={**chat, "stream": True}) as answer:  # fmt: skip
                async for _ in answer.aiter_lines():
                    pass
                return answer.status_code
        if kind == "prompts":
            body = {"model": "echo", "prompt": ["one two", "three four five"] * 4, "n": 2}
            return (await plain.post("/v1/completions", json=body)).status_code
        if kind == "embed":
            body = {"model": "minilm-l6", "input": ["a cat", "a dog", "soak testing"]}
            return (await plain.post("/v1/embeddings", json=body)).status_code
        if kind == "oip":
            body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                "data": DIGIT}]}  # fmt: skip
            return (await plain.post("/v2/models/digits/infer", json=body)).status_code
        if kind == "sealed":
            body = {"model": "echo", "messages": [{"role": "user", "content": "sealed hi"}]}
            return (await sealed.post("/v1/chat/completions", json=body)).status_code
        if kind == "bad_key":
            made_up = f"bsk_{random.getrandbits(64):016x}_{'a' * 52}"
            answer = await plain.get("/v1/models", headers={"authorization": f"Bearer {made_up}"})
            return answer.status_code
        body = {"model": "echo", "prompt": "x", "temperature": 7}
        return (await plain.post("/v1/completions", json=body)).status_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--rps", type=float, default=20.0, help="requests per second")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bastion-soak-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        env, home = bastion_env(), work / "home"
        print("building the demo models (bastion init) ...", flush=True)
        init = json.loads(run_command(bastion("init", "--home", str(home), "--json"), env, 900))
        model_dir = work / "echo-model"
        model_dir.mkdir()
        run_command(bastion("models", "add", "echo", "--runtime", "echo", "--path",
                            str(model_dir), "--home", str(home)), env)  # fmt: skip
        run_command(bastion("tenants", "create", "soak", "--home", str(home), "--json"), env)
        key = json.loads(run_command(bastion("keys", "create", "--tenant", "soak", "--home",
                                             str(home), "--json"), env))["key"]  # fmt: skip
        keys = json.loads(run_command(bastion("ohttp", "keys", "--home", str(home), "--json"), env))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        admin = {"Authorization": f"Bearer {init['admin_key']}"}
        with Fleet(work / "logs") as fleet:
            server = fleet.start("bastion", bastion("serve", "--home", str(home), "--port",
                                                    str(port)), env)  # fmt: skip

            def all_ready() -> bool:
                status, raw = http("GET", f"{base}/admin/v1/models", headers=admin)
                models = json.loads(raw)["data"] if status == 200 else []
                return len(models) == 4 and all(m["state"] == "ready" for m in models)

            wait_until(server, all_ready, 600)
            traffic = Traffic(base, key, [k["fingerprint"] for k in keys], args.rps)
            rows = asyncio.run(_soak(traffic, server.pid, server.tree, args))
        _report(rows, traffic)
    return 0


async def _soak(
    traffic: Traffic, pid: int, tree: Any, args: argparse.Namespace
) -> list[dict[str, Any]]:
    runner = asyncio.create_task(traffic.run(args.minutes * 60))
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    while not runner.done():
        await asyncio.sleep(args.every)
        if runner.done():
            break  # the traffic ended during this interval: not a full sample
        latencies, traffic.latencies = traffic.latencies, []
        workers = [p for p in tree() if p != pid]
        rows.append(
            {
                "t": time.monotonic() - started,
                "rss": rss_mb(pid),
                "fds": _fds(pid),
                "threads": _threads(pid),
                "workers_rss": sum(rss_mb(p) for p in workers),
                "requests": len(latencies),
                "p50": _rank(latencies, 0.50),
                "p99": _rank(latencies, 0.99),
            }
        )  # fmt: skip
        row = rows[-1]
        print(
            f"{row['t']:6.0f}s rss {row['rss']:7.1f} MB fds {row['fds']:4d} threads "
            f"{row['threads']:3d} workers {row['workers_rss']:7.1f} MB  {row['requests']:5d} req "
            f"p50 {row['p50']:7.1f} ms p99 {row['p99']:8.1f} ms",
            flush=True,
        )
    await runner
    return rows


def _report(rows: list[dict[str, Any]], traffic: Traffic) -> None:
    print(
        "\n| t (s) | gateway RSS MB | open fds | threads | workers RSS MB | requests "
        "| p50 ms | p99 ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['t']:.0f} | {row['rss']:.1f} | {row['fds']} | {row['threads']} | "
            f"{row['workers_rss']:.1f} | {row['requests']} | {row['p50']:.1f} | {row['p99']:.1f} |"
        )
    if len(rows) >= 4:
        warm, last = rows[1], rows[-1]
        print(
            f"\nFrom the second sample to the last: gateway RSS {warm['rss']:.1f} -> "
            f"{last['rss']:.1f} MB, fds {warm['fds']} -> {last['fds']}, threads "
            f"{warm['threads']} -> {last['threads']}, workers {warm['workers_rss']:.1f} -> "
            f"{last['workers_rss']:.1f} MB, p99 {warm['p99']:.1f} -> {last['p99']:.1f} ms"
        )
    total = sum(traffic.statuses.values())
    print(f"\n{total} requests; by kind and status: {dict(sorted(traffic.statuses.items()))}")
    print(f"unexpected answers: {dict(traffic.unexpected) or 'none'}")
    print(f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    sys.exit(main())
