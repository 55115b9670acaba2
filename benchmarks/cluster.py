#!/usr/bin/env python3
"""Issue 15's unit costs: what scaling beyond one machine costs per request, measured on
this machine with real PostgreSQL, Redis and Ray (Debian's servers and the pinned Ray,
each started privately for the run), each against its single-machine baseline in the same
run (the machine is noisy: ratios hold, absolute times do not).

    limiter        reserve + settle of one request in-process: the in-memory limiter vs
                   the Redis one (one subject; tenant + key), per request
    channel        the echo model's OIP inference through one gateway: the worker local
                   (bubblewrap, Unix socket) vs placed on a Ray node (its channel relayed
                   over mutual TLS 1.3), p50 latency and throughput at c=1 and c=16
    gateways       one gateway vs two on the same PostgreSQL + Redis under a tenant quota,
                   total throughput and each gateway's CPU per request (on 2 cores the sum
                   is CPU-bound: the per-gateway cost is what the capacity model uses)
    replacement    kill -9 of the model's worker: seconds until the model is ready again,
                   local vs on Ray (a new actor placed, certificate issued, worker started)

Usage: .venv/bin/python benchmarks/cluster.py [--dur 5] [--reps 2] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bastion.quotas.limiter import InMemoryLimiter, Limiter, QuotaLimits, Subject
from bastion.quotas.redis.limiter import RedisLimiter
from bastion.quotas.redis.link import RedisLink
from gateway_servers import (
    HERE,
    WRK,
    RunningBastion,
    bastion,
    free_port,
    http,
    oip_body,
    start_echo_bastion,
    wait_until,
    wrk_missing,
)
from proctree import Fleet, cpu_seconds

sys.path.insert(0, str(HERE.parent / "tests"))
from services import PostgresServer, RedisServer

RESULTS = HERE / "results"
RAY = str(Path(sys.executable).parent / "ray")
LIMITS = QuotaLimits(requests_per_minute=10**9, tokens_per_minute=10**12, concurrent_requests=10**6)


# ---------------------------------------------------------------------- limiter


def limiter_cost(limiter: Limiter, subjects: int, number: int) -> float:
    """µs per request (reserve, then settle), best of 5 rounds."""
    chosen = [(Subject("tenant", "bench"), LIMITS), (Subject("key", "k1"), LIMITS)][:subjects]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(number):
            reservation = limiter.reserve(chosen, tokens=20)
            limiter.settle(reservation, 15)
        best = min(best, (time.perf_counter() - start) / number * 1e6)
    return best


def limiter_section(redis: RedisServer, number: int) -> dict[str, float]:
    results: dict[str, float] = {}
    local = InMemoryLimiter()
    link = RedisLink.connect(redis.url(), timeout_s=1.0)
    shared = RedisLimiter(link, prefix=f"bench{secrets.token_hex(2)}:")
    try:
        for subjects in (1, 2):
            results[f"in-memory, {subjects} subject(s)"] = limiter_cost(local, subjects, number)
            results[f"Redis, {subjects} subject(s)"] = limiter_cost(shared, subjects, number)
        start = time.perf_counter()
        for _ in range(number):
            link.client.ping()
        results["Redis PING (round trip)"] = (time.perf_counter() - start) / number * 1e6
        # Redis's own time per script run (its one thread is what all gateways share).
        stats = link.client.info("commandstats")
        evalsha = stats.get("cmdstat_evalsha", {})
        if evalsha:
            results["inside Redis, per EVALSHA (server time)"] = float(evalsha["usec_per_call"])
    finally:
        shared.close()
        link.close()
    return results


# ---------------------------------------------------------------------- load


def wrk_post(url: str, auth: str, body: Path, conns: int, dur: int) -> dict[str, float]:
    env = dict(os.environ, BODYFILE=str(body), AUTH=auth, XKEY="")
    command = [WRK, "-t1", f"-c{conns}", f"-d{dur}s", "--timeout", "10s"]
    command += ["-s", str(HERE / "post.lua"), url]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=dur + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no result: {out.stdout}{out.stderr}")
    raw = {k: int(v) for k, v in (p.split("=") for p in line[7:].split())}
    seconds = raw["duration_us"] / 1e6
    return {
        "rps": raw["requests"] / seconds,
        "requests": raw["requests"],
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": raw["err_status"] + raw["err_connect"] + raw["err_timeout"],
    }


def infer_target(server: RunningBastion, work: Path) -> tuple[str, str, Path]:
    return f"{server.base}/v2/models/echo/infer", f"Bearer {server.key}", oip_body(work)


def echo_options() -> tuple[str, ...]:
    spec = json.dumps({"name": "input", "datatype": "FP32", "shape": [-1, 64]})
    return (f"input={spec}",)


# ---------------------------------------------------------------------- Ray


class RayHead:
    """A one-node Ray cluster on loopback with token authentication."""

    def __init__(self, work: Path) -> None:
        self.token = work / "ray-token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token))
        self.client_port = free_port()
        temp = Path(tempfile.mkdtemp(prefix="rbench"))
        self.temp = temp
        self.log = (work / "ray.log").open("ab")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={free_port()}", f"--ray-client-server-port={self.client_port}",
             "--include-dashboard=false", "--num-cpus=2", "--disable-usage-stats",
             f"--temp-dir={temp}"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.address = f"ray://127.0.0.1:{self.client_port}"

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        subprocess.run(["pkill", "-9", "-f", str(self.temp)], check=False)
        self.log.close()


def start_gateway(
    fleet: Fleet, work: Path, name: str, env: dict[str, str], *, cluster_init: bool = False
) -> RunningBastion:
    work.mkdir(parents=True, exist_ok=True)
    return start_echo_bastion(
        fleet,
        work,
        action="infer",
        echo_options=echo_options(),
        env_extra=env,
        name=name,
        init_args=("--cluster",) if cluster_init else (),
    )


def model_pid(server: RunningBastion) -> int:
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    _, raw = http("GET", f"{server.base}/admin/v1/models/echo", headers=admin)
    body = json.loads(raw)
    replicas = body.get("replicas") or []
    pids = [r.get("pid") for r in replicas if r.get("pid")] or [body.get("pid")]
    if pids[0]:
        return int(pids[0])
    # The admin API has no pid field on this tree: the worker's own log line has it.
    for line in reversed(server.server.log.read_text().splitlines()):
        if '"worker started"' in line:
            return int(json.loads(line)["pid"])
    raise SystemExit("cannot find the model's worker pid")


def replacement_s(server: RunningBastion) -> float:
    """kill -9 of the model's worker; seconds until the model answers again."""
    url, auth = f"{server.base}/v2/models/echo/infer", f"Bearer {server.key}"
    payload = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    ).encode()
    pid = model_pid(server)
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    time.sleep(0.05)
    while time.monotonic() - start < 120:
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        status, _ = http("POST", url, headers=headers, body=payload)
        if status == 200 and model_pid(server) != pid:
            return time.monotonic() - start
        time.sleep(0.05)
    raise SystemExit("the model did not come back within 120 s")


# ---------------------------------------------------------------------- sections


def logs(work: Path, name: str) -> Path:
    folder = work / name
    folder.mkdir(exist_ok=True)
    return folder


def channel_section(work: Path, head: RayHead, dur: int, reps: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with Fleet(logs(work, "logs")) as fleet:
        local = start_gateway(fleet, work / "local", "local", {})
        ray_env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(head.token),
            "BASTION_CLUSTER": head.address,
            "BASTION_WORKER_LISTEN": f"127.0.0.1:{free_port()}",
        }
        placed = start_gateway(fleet, work / "ray", "ray", ray_env, cluster_init=True)
        targets = {"local (Unix socket)": local, "Ray node (mutual TLS)": placed}
        for conns in (1, 16):
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for rep in range(reps):
                names = list(targets) if rep % 2 == 0 else list(reversed(targets))
                for name in names:
                    url, auth, body = infer_target(targets[name], work)
                    wrk_post(url, auth, body, conns, 1)
                    runs[name].append(wrk_post(url, auth, body, conns, dur))
            results[f"c={conns}"] = {
                name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                for name, rows in runs.items()
            }
        results["replacement_s"] = {
            "local (bwrap)": statistics.median(replacement_s(local) for _ in range(reps)),
            "Ray node": statistics.median(replacement_s(placed) for _ in range(reps)),
        }
    return results


def gateways_section(
    work: Path, postgres: PostgresServer, redis: RedisServer, dur: int, reps: int
) -> dict[str, Any]:
    """One gateway vs two on one PostgreSQL + Redis, a tenant quota on every request."""
    url = postgres.new_database("bench")
    env = {"BASTION_DATABASE_URL": url, "BASTION_REDIS_URL": redis.url()}
    results: dict[str, Any] = {}
    with Fleet(logs(work, "logs-gw")) as fleet:
        first = start_gateway(fleet, work / "gw1", "gw1", env)
        admin = {"Authorization": f"Bearer {first.admin_key}"}
        quota = json.dumps({"requests_per_minute": 10**8, "concurrent_requests": 10**5})
        status, raw = http(
            "PUT", f"{first.base}/admin/v1/quotas/tenants/bench",
            headers={**admin, "Content-Type": "application/json"},
            body=quota.encode(),
        )  # fmt: skip
        if status >= 300:
            raise SystemExit(f"could not set the quota: {status} {raw[:200]!r}")
        # The second gateway: its own home with the same master key, the same database.
        home2 = work / "gw2" / "home"
        home2.mkdir(parents=True)
        master = home2 / "master.key"
        master.write_bytes((first.home / "master.key").read_bytes())
        master.chmod(0o600)
        port = free_port()
        second_server = fleet.start(
            "gw2",
            bastion("serve", "--home", str(home2), "--port", str(port), "--no-demo-models"),
            dict(first.env),
        )
        second = RunningBastion(
            second_server, f"http://127.0.0.1:{port}", first.key, home2, first.env,
            first.admin_key,
        )  # fmt: skip

        def second_ready() -> bool:
            code, raw = http("GET", f"{second.base}/admin/v1/models/echo", headers=admin)
            return code == 200 and json.loads(raw).get("state") == "ready"

        wait_until(second_server, second_ready, 120)

        def measure(servers: list[RunningBastion], conns: int) -> dict[str, Any]:
            before = [cpu_seconds(s.server.tree()[:1]) for s in servers]
            outcomes: list[dict[str, float]] = [{} for _ in servers]
            threads = []
            for i, server in enumerate(servers):
                url_, auth, body = infer_target(server, work)

                def run(i: int = i, url_: str = url_, auth: str = auth, body: Path = body) -> None:
                    outcomes[i] = wrk_post(url_, auth, body, conns, dur)

                threads.append(threading.Thread(target=run))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            after = [cpu_seconds(s.server.tree()[:1]) for s in servers]
            return {
                "rps": sum(o["rps"] for o in outcomes),
                "errors": sum(o["errors"] for o in outcomes),
                "gateway_cpu_us_per_req": statistics.mean(
                    (a - b) / o["requests"] * 1e6
                    for a, b, o in zip(after, before, outcomes, strict=True)
                ),
            }

        runs: dict[str, list[dict[str, Any]]] = {"1 gateway, c=16": [], "2 gateways, c=8 each": []}
        for _ in range(reps):
            for server in (first, second):
                url_, auth, body = infer_target(server, work)
                wrk_post(url_, auth, body, 8, 1)
            runs["1 gateway, c=16"].append(measure([first], 16))
            runs["2 gateways, c=8 each"].append(measure([first, second], 8))
        for name, rows in runs.items():
            results[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        # The same single gateway without Redis and PostgreSQL is the cost before issue 15.
    return results


def baseline_gateway(work: Path, dur: int, reps: int) -> dict[str, Any]:
    """One gateway on SQLite with the in-memory limiter and the same quota: the baseline."""
    with Fleet(logs(work, "logs-base")) as fleet:
        server = start_gateway(fleet, work / "base", "base", {})
        admin = {"Authorization": f"Bearer {server.admin_key}"}
        quota = json.dumps({"requests_per_minute": 10**8, "concurrent_requests": 10**5})
        headers = {**admin, "Content-Type": "application/json"}
        status, raw = http(
            "PUT", f"{server.base}/admin/v1/quotas/tenants/bench", headers=headers,
            body=quota.encode(),
        )  # fmt: skip
        if status >= 300:
            raise SystemExit(f"could not set the quota: {status} {raw[:200]!r}")
        rows = []
        url, auth, body = infer_target(server, work)
        wrk_post(url, auth, body, 16, 1)
        for _ in range(reps):
            before = cpu_seconds(server.server.tree()[:1])
            outcome = wrk_post(url, auth, body, 16, dur)
            after = cpu_seconds(server.server.tree()[:1])
            outcome["gateway_cpu_us_per_req"] = (after - before) / outcome["requests"] * 1e6
            rows.append(outcome)
        return {k: statistics.median(r[k] for r in rows) for k in ("rps", "errors",
                "gateway_cpu_us_per_req")}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dur", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    if wrk_missing():
        raise SystemExit("wrk is missing: see benchmarks/README.md")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bastion-cluster-bench-") as tmp:
        work = Path(tmp)
        redis = RedisServer()
        postgres = PostgresServer()
        closers: list[Callable[[], None]] = [redis.close, postgres.close]
        try:
            results["limiter_us"] = limiter_section(redis, args.calls)
            redis.flush()
            results["baseline"] = baseline_gateway(work, args.dur, args.reps)
            results["gateways"] = gateways_section(work, postgres, redis, args.dur, args.reps)
            if not args.skip_ray:
                head = RayHead(work)
                closers.append(head.close)
                results["channel"] = channel_section(work, head, args.dur, args.reps)
        finally:
            for close in reversed(closers):
                close()
    report(results, args)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"cluster-{stamp}.json").write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    cores = os.cpu_count()
    print(f"\nLimiter per request, reserve + settle, in-process ({cores} cores, best of 5)\n")
    print("| limiter | µs/request |")
    print("|---|---|")
    for name, cost in results["limiter_us"].items():
        print(f"| {name} | {cost:.1f} |")
    base = results["baseline"]
    print(f"\nGateways, OIP echo under a tenant quota, {args.dur} s x {args.reps} (median)\n")
    print("| setup | req/s | gateway CPU µs/request | errors |")
    print("|---|---|---|---|")
    print(
        f"| 1 gateway, SQLite + in-memory limiter (baseline), c=16 | {base['rps']:,.0f} | "
        f"{base['gateway_cpu_us_per_req']:.0f} | {base['errors']:.0f} |"
    )
    for name, row in results["gateways"].items():
        print(
            f"| {name}, PostgreSQL + Redis | {row['rps']:,.0f} | "
            f"{row['gateway_cpu_us_per_req']:.0f} | {row['errors']:.0f} |"
        )
    if "channel" in results:
        channel = results["channel"]
        print("\nWorker channel: local worker vs placed on a Ray node (OIP echo)\n")
        print("| load | worker | req/s | p50 ms | p99 ms |")
        print("|---|---|---|---|---|")
        for load in ("c=1", "c=16"):
            for name, row in channel[load].items():
                print(
                    f"| {load} | {name} | {row['rps']:,.0f} | {row['p50_ms']:.2f} | "
                    f"{row['p99_ms']:.2f} |"
                )
        print("\nReplacing a worker killed with SIGKILL (until it answers again)\n")
        print("| worker | seconds |")
        print("|---|---|")
        for name, seconds in channel["replacement_s"].items():
            print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
