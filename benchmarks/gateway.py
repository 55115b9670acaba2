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
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from proctree import Fleet, Server, cpu_seconds, rss_mb

HERE = Path(__file__).resolve().parent
WRK = "/usr/bin/wrk"
LITSERVE_VERSION = "0.2.19"
LITSERVE_VENV = HERE / ".venv-litserve"
VECTOR = [round(i * 0.01, 2) for i in range(64)]
TARGET_NAMES = ("ceiling", "bastion", "litserve")
# The targets.
MIN_SHARE_OF_CEILING_C16 = 0.20
MAX_P50_ADDED_MS_C1 = 1.0
MAX_GATEWAY_RSS_MB = 150.0
MAX_READY_S = 3.0


class BenchmarkError(Exception):
    """A server or tool the benchmark needs did not work; the message says what failed."""


@dataclass
class Target:
    """One server under load and how to call it."""

    name: str
    url: str
    body_file: Path
    server: Server
    auth: str = ""  # Authorization header value
    xkey: str = ""  # X-API-Key header value (LitServe's scheme)


# ---------------------------------------------------------------- small tools


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One request; the status and body, also for 4xx/5xx answers."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(server: Server, ready: Callable[[], bool], timeout_s: float) -> float:
    """Poll until `ready()`; the seconds since the server's process started."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            fail(server, f"exited with code {server.process.returncode} before it was ready")
        try:
            if ready():
                return time.monotonic() - server.started_at
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.01)
    fail(server, f"not ready after {timeout_s:.0f} s")


def fail(server: Server, what: str) -> NoReturn:
    raise BenchmarkError(
        f"{server.name}: `{' '.join(server.command)}` {what}; its last output:\n{server.log_tail()}"
    )


def run_command(command: list[str], env: dict[str, str], timeout_s: float = 300) -> str:
    """Run a set-up command; its stdout, or BenchmarkError with the command and its error."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-25:])
        tail = re.sub(r"bsk_\S+", "bsk_<redacted>", tail)
        raise BenchmarkError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def write_body(path: Path, body: dict[str, Any]) -> Path:
    path.write_text(json.dumps(body))
    return path


# ---------------------------------------------------------------- the three servers


def start_ceiling(fleet: Fleet, work: Path) -> Target:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "ceiling_app:app", "--app-dir", str(HERE)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"]
    command += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
    server = fleet.start("ceiling", [*command, "--no-server-header"], os.environ)
    url = f"http://127.0.0.1:{port}/predict"
    wait_until(server, lambda: http("POST", url, b"{}")[0] == 200, 30)
    # It gets the same bytes as Bastion, though it does not read them.
    return Target("ceiling", url, oip_body(work), server)


def litserve_python() -> Path:
    """The LitServe venv's interpreter, creating the venv on first use."""
    python = LITSERVE_VENV / "bin" / "python"
    probe = [str(python), "-c", "import litserve; print(litserve.__version__)"]
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == LITSERVE_VERSION:
            return python
    base = shutil.which("python3.11") or sys.executable
    print(f"creating {LITSERVE_VENV} with litserve=={LITSERVE_VERSION} (first use) ...", flush=True)
    run_command([base, "-m", "venv", "--clear", str(LITSERVE_VENV)], dict(os.environ))
    pip = [str(python), "-m", "pip", "install", "--quiet", f"litserve=={LITSERVE_VERSION}"]
    run_command(pip, dict(os.environ), timeout_s=900)
    run_command(probe, dict(os.environ))
    return python


def start_litserve(fleet: Fleet, work: Path) -> Target:
    python = litserve_python()
    port, key = free_port(), "ls-" + os.urandom(16).hex()
    env = dict(os.environ, LIT_SERVER_API_KEY=key)
    command = [str(python), str(HERE / "litserve_server.py"), str(port)]
    server = fleet.start("litserve", command, env)
    url = f"http://127.0.0.1:{port}/predict"
    body = write_body(work / "litserve.json", {"input": VECTOR})
    headers = {"Content-Type": "application/json", "X-API-Key": key}
    wait_until(server, lambda: http("POST", url, body.read_bytes(), headers)[0] == 200, 120)
    return Target("litserve", url, body, server, xkey=key)


def bastion_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    # Warnings only, so access logs do not dominate the measurement.
    env.update(BASTION_LOG_LEVEL="warning", BASTION_DRAIN_TIMEOUT_S="5", HF_HUB_OFFLINE="1")
    return env


def bastion(*args: str) -> list[str]:
    return [sys.executable, "-m", "bastion", *args]


def start_bastion(fleet: Fleet, work: Path) -> tuple[Target, dict[str, Any]]:
    """Bastion with the echo model and a tenant key scoped to it; plus its idle memory."""
    env, home = bastion_env(), work / "home"
    init = json.loads(
        run_command(bastion("init", "--home", str(home), "--no-demo-models", "--json"), env)
    )
    admin = {"Authorization": f"Bearer {init['admin_key']}"}
    model_dir = work / "echo-model"
    model_dir.mkdir()
    spec = json.dumps({"name": "input", "datatype": "FP32", "shape": [-1, 64]})
    add = ["models", "add", "echo", "--runtime", "echo", "--path", str(model_dir)]
    run_command(bastion(*add, "--option", f"input={spec}", "--home", str(home)), env)
    run_command(bastion("tenants", "create", "bench", "--home", str(home), "--json"), env)
    create_key = ["keys", "create", "--tenant", "bench", "--model", "echo", "--action", "infer"]
    key = json.loads(run_command(bastion(*create_key, "--home", str(home), "--json"), env))["key"]

    port = free_port()
    serve = ["serve", "--home", str(home), "--port", str(port), "--no-demo-models"]
    server = fleet.start("bastion", bastion(*serve), env)
    base = f"http://127.0.0.1:{port}"

    def echo_ready() -> bool:
        status, raw = http("GET", f"{base}/admin/v1/models/echo", headers=admin)
        state = json.loads(raw).get("state") if status == 200 else None
        if state == "failed":
            fail(server, "reports the echo model failed")
        return state == "ready"

    wait_until(server, echo_ready, 120)
    url, auth = f"{base}/v2/models/echo/infer", f"Bearer {key}"
    target = Target("bastion", url, oip_body(work), server, auth=auth)
    time.sleep(2)  # let start-up work settle before reading idle memory
    pids = server.tree()
    workers = {pid: round(rss_mb(pid), 1) for pid in pids[1:]}
    memory = {
        "gateway_rss_mb": round(rss_mb(pids[0]), 1),
        "worker_rss_mb": workers,
        "gateway_plus_workers_rss_mb": round(rss_mb(pids[0]) + sum(workers.values()), 1),
    }
    return target, memory


def answered_values(name: str, answer: Any) -> list[Any]:
    """The 64 values each target sends back (the ceiling answers a fixed 3)."""
    if name == "ceiling":
        return [answer["output"]] * 64 if answer.get("output") == 3 else []
    values: list[Any] = answer["outputs"][0]["data"] if name == "bastion" else answer["output"]
    return values


def check_answers(targets: dict[str, Target]) -> None:
    """Each target answers the benchmark request correctly and refuses one without a key."""
    for t in targets.values():
        headers = {"Content-Type": "application/json"}
        status, raw = http("POST", t.url, t.body_file.read_bytes(), headers)
        if t.name != "ceiling" and status not in (401, 403):
            fail(t.server, f"answered {status} to a request without an API key")
        headers |= {"Authorization": t.auth} if t.auth else {}
        headers |= {"X-API-Key": t.xkey} if t.xkey else {}
        status, raw = http("POST", t.url, t.body_file.read_bytes(), headers)
        try:
            values = answered_values(t.name, json.loads(raw))
        except (ValueError, KeyError, IndexError, TypeError):
            values = []
        if status != 200 or len(values) != 64:
            fail(t.server, f"gave a wrong answer to the benchmark request (HTTP {status})")


def answers_200(url: str) -> Callable[[], bool]:
    return lambda: http("GET", url)[0] == 200


def oip_body(work: Path) -> Path:
    """Bastion's request, an Open Inference Protocol v2 tensor of 64 FP32 values."""
    tensor = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": VECTOR}
    return write_body(work / "oip.json", {"inputs": [tensor]})


def measure_startup(fleet: Fleet, work: Path, runs: int) -> list[dict[str, Any]]:
    """`bastion serve --no-demo-models` to /readyz 200, on a fresh home, then again on it."""
    results = []
    for run in range(runs):
        home = work / f"startup-{run}"
        for start in ("fresh home", "restart"):
            port = free_port()
            serve = ["serve", "--home", str(home), "--port", str(port), "--no-demo-models"]
            server = fleet.start(f"bastion-startup-{run}", bastion(*serve), bastion_env())
            url = f"http://127.0.0.1:{port}/readyz"
            ready_s = wait_until(server, answers_200(url), 60)
            time.sleep(1)
            pids = server.tree()
            results.append(
                {
                    "start": start,
                    "run": run,
                    "ready_s": round(ready_s, 3),
                    "gateway_rss_mb": round(rss_mb(pids[0]), 1),
                    "processes": len(pids),
                }
            )
            fleet.stop(server)
    return results


# ---------------------------------------------------------------- load


def run_wrk(target: Target, conns: int, dur: float) -> dict[str, Any]:
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


def measure(target: Target, conns: int, dur: float, warmup: float) -> dict[str, Any]:
    if warmup > 0:
        run_wrk(target, conns, warmup)
    pids = target.server.tree()
    cpu_before = cpu_seconds(pids)
    row = run_wrk(target, conns, dur)
    cpu = cpu_seconds(target.server.tree()) - cpu_before
    row.update(cpu_us_per_req=cpu / max(row["requests"], 1) * 1e6, server_processes=len(pids))
    return row


def idle_cpu_percent(targets: dict[str, Target], seconds: float = 3.0) -> dict[str, float]:
    before = {n: cpu_seconds(t.server.tree()) for n, t in targets.items()}
    time.sleep(seconds)
    return {
        n: round((cpu_seconds(t.server.tree()) - before[n]) / seconds * 100, 1)
        for n, t in targets.items()
    }


# ---------------------------------------------------------------- report


def medians(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    out = {}
    for key in sorted({(r["target"], r["conns"]) for r in rows}):
        group = [r for r in rows if (r["target"], r["conns"]) == key]
        out[key] = {
            field: statistics.median(r[field] for r in group)
            for field in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")
        }
        out[key]["errors"] = sum(r["non2xx"] + r["socket_errors"] for r in group)
    return out


def report(
    names: list[str], conns: list[int], med: dict[tuple[str, int], dict[str, float]]
) -> list[str]:
    lines = [
        "| target | c | req/s | p50 ms | p99 ms | CPU µs/req | vs ceiling req/s | p50 added ms "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conns:
        base = med.get(("ceiling", c))
        for name in names:
            m = med[(name, c)]
            share = f"{m['rps'] / base['rps']:.1%}" if base else "-"
            added = f"{m['p50_ms'] - base['p50_ms']:+.2f}" if base else "-"
            lines.append(
                f"| {name} | {c} | {m['rps']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} "
                f"| {m['cpu_us_per_req']:.0f} | {share} | {added} | {m['errors']:.0f} |"
            )
    return lines


def verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text}"


def checks(
    med: dict[tuple[str, int], dict[str, float]],
    memory: dict[str, Any] | None,
    startup: list[dict[str, Any]],
) -> list[str]:
    lines = []
    bastion16, ceiling16 = med.get(("bastion", 16)), med.get(("ceiling", 16))
    if bastion16 and ceiling16:
        share = bastion16["rps"] / ceiling16["rps"]
        lines.append(
            verdict(
                share >= MIN_SHARE_OF_CEILING_C16,
                f"Bastion throughput at c=16 >= {MIN_SHARE_OF_CEILING_C16:.0%} of the ceiling: "
                f"{share:.1%} ({bastion16['rps']:,.0f} vs {ceiling16['rps']:,.0f} req/s)",
            )
        )
    bastion1, ceiling1 = med.get(("bastion", 1)), med.get(("ceiling", 1))
    if bastion1 and ceiling1:
        added = bastion1["p50_ms"] - ceiling1["p50_ms"]
        lines.append(
            verdict(
                added <= MAX_P50_ADDED_MS_C1,
                f"Bastion p50 added over the ceiling at c=1 <= {MAX_P50_ADDED_MS_C1} ms: "
                f"{added:.2f} ms ({bastion1['p50_ms']:.2f} vs {ceiling1['p50_ms']:.2f} ms)",
            )
        )
    errors = sum(m["errors"] for m in med.values())
    lines.append(verdict(errors == 0, f"every measured request answered 2xx: {errors:.0f} errors"))
    if startup:
        rss = max(r["gateway_rss_mb"] for r in startup)
        if memory:
            rss = max(rss, memory["gateway_rss_mb"])
        lines.append(
            verdict(
                rss <= MAX_GATEWAY_RSS_MB,
                f"Bastion gateway idle RSS <= {MAX_GATEWAY_RSS_MB:.0f} MB: "
                f"{rss:.0f} MB (largest seen)",
            )
        )
        fresh = statistics.median(r["ready_s"] for r in startup if r["start"] == "fresh home")
        lines.append(
            verdict(
                fresh <= MAX_READY_S,
                f"Bastion time to ready, fresh home, no models <= {MAX_READY_S:.0f} s: "
                f"{fresh:.2f} s (median)",
            )
        )
    return lines


def figures(
    memory: dict[str, Any] | None,
    after_load: dict[str, Any] | None,
    startup: list[dict[str, Any]],
    idle_cpu: dict[str, float],
) -> list[str]:
    lines = []
    for start in ("fresh home", "restart"):
        runs = [r for r in startup if r["start"] == start]
        if runs:
            times = ", ".join(f"{r['ready_s']:.2f}" for r in runs)
            rss = ", ".join(f"{r['gateway_rss_mb']:.0f}" for r in runs)
            lines.append(
                f"Bastion start to /readyz 200 ({start}, no models): {times} s; "
                f"gateway idle RSS {rss} MB; processes {runs[0]['processes']}"
            )
    if memory:
        workers = ", ".join(f"{v:.0f}" for v in memory["worker_rss_mb"].values()) or "none"
        lines.append(
            f"Bastion idle RSS with echo loaded: gateway {memory['gateway_rss_mb']:.0f} MB, "
            f"worker {workers} MB, gateway + worker {memory['gateway_plus_workers_rss_mb']:.0f} MB"
        )
    if after_load:
        lines.append(
            f"Bastion RSS after the load: gateway {after_load['gateway_rss_mb']:.0f} MB, "
            f"gateway + worker {after_load['gateway_plus_workers_rss_mb']:.0f} MB"
        )
    if idle_cpu:
        lines.append(
            "idle CPU % of each server tree (3 s): "
            + ", ".join(f"{n} {v:.1f}" for n, v in idle_cpu.items())
        )
    return lines


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=2, help="repetitions (medians over them)")
    parser.add_argument("--dur", type=float, default=8, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up before each")
    parser.add_argument("--conns", default="1,16,64", help="concurrencies, comma-separated")
    parser.add_argument("--targets", default=",".join(TARGET_NAMES), help="subset to run")
    parser.add_argument("--startup-runs", type=int, default=2, help="Bastion start-up samples")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for JSON")
    args = parser.parse_args()
    args.conns = [int(c) for c in args.conns.split(",")]
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(TARGET_NAMES)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {TARGET_NAMES}")
    return args


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    if not os.access(WRK, os.X_OK):
        print(
            f"error: {WRK} is missing; install Debian's wrk: apt-get install wrk", file=sys.stderr
        )
        return 2
    signal.signal(signal.SIGTERM, raise_interrupt)  # stop the servers on SIGTERM as on Ctrl-C
    names = [n for n in TARGET_NAMES if n in args.targets]
    if "litserve" in names:
        litserve_python()  # create the venv before any server runs
    planned = args.reps * len(args.conns) * len(names) * (args.dur + args.warmup)
    print(
        f"load {planned:.0f} s: {args.reps} reps x c={args.conns} x {names}, "
        f"{args.warmup:g} s warm-up + {args.dur:g} s each; load average {os.getloadavg()[0]:.2f}; "
        f"BASTION_LOG_LEVEL=warning for Bastion",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    memory = after_load = None
    startup: list[dict[str, Any]] = []
    idle_cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp, Fleet(Path(tmp)) as fleet:
        work = Path(tmp)
        try:
            if "bastion" in names:
                startup = measure_startup(fleet, work, args.startup_runs)
            targets: dict[str, Target] = {}
            for name in names:
                if name == "bastion":
                    targets[name], memory = start_bastion(fleet, work)
                elif name == "litserve":
                    targets[name] = start_litserve(fleet, work)
            if "ceiling" in names:
                targets["ceiling"] = start_ceiling(fleet, work)
            check_answers(targets)
            idle_cpu = idle_cpu_percent(targets)
            for rep in range(args.reps):
                for i, c in enumerate(args.conns):
                    shift = (rep * len(args.conns) + i) % len(names)
                    for name in names[shift:] + names[:shift]:  # each target leads in turn
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
            if "bastion" in targets:
                pids = targets["bastion"].server.tree()
                after_load = {
                    "gateway_rss_mb": round(rss_mb(pids[0]), 1),
                    "gateway_plus_workers_rss_mb": round(sum(rss_mb(p) for p in pids), 1),
                }
        except BenchmarkError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
    med = medians(rows)
    lines = report(names, args.conns, med)
    lines += [
        "",
        *checks(med, memory, startup),
        "",
        *figures(memory, after_load, startup, idle_cpu),
    ]
    print("\n" + "\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gateway-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg(),
                },
                "rows": rows,
                "medians": [{"target": n, "conns": c, **m} for (n, c), m in med.items()],
                "report": lines,
                "bastion_memory_idle": memory,
                "bastion_memory_after_load": after_load,
                "bastion_startup": startup,
                "idle_cpu_percent": idle_cpu,
            },
            indent=1,
        )
    )
    print(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
