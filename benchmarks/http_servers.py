#!/usr/bin/env python3
"""Which HTTP server for Bastion: uvicorn + httptools + uvloop against granian, one run.

Both serve, in turn and in alternating rounds on the same machine:

    ceiling   the hello endpoint (ceiling_app.py): the HTTP server's own cost
    bastion   Bastion's whole app (auth, quotas, fair queue, IPC to an `echo` worker),
              POST /v2/models/echo/infer with a tenant's key; uvicorn runs it as
              `bastion serve` does (with Bastion's connection protocol), granian runs the
              same app built the same way (granian_bastion.py), without that protocol

granian is installed on first use into benchmarks/.granian-site (pip --target; never a
dependency of Bastion) and run with one worker, one runtime thread and uvloop.

Usage: .venv/bin/python benchmarks/http_servers.py [--reps 3] [--dur 6] [--conns 1,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway import measure
from gateway_servers import (
    HERE,
    BenchmarkError,
    Target,
    free_port,
    http,
    oip_body,
    start_ceiling,
    start_echo_bastion,
    wait_until,
    wrk_missing,
)
from proctree import Fleet

GRANIAN_VERSION = "2.8.9"
GRANIAN_SITE = HERE / ".granian-site"


def granian_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that runs granian from its own site directory."""
    if not (GRANIAN_SITE / "granian").is_dir():
        print(f"installing granian=={GRANIAN_VERSION} into {GRANIAN_SITE} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(GRANIAN_SITE),
             f"granian=={GRANIAN_VERSION}"],
            check=True,
        )  # fmt: skip
    path = os.pathsep.join([str(GRANIAN_SITE), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def granian_command(target: str, port: int, *, factory: bool = False) -> list[str]:
    command = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1", "--runtime-threads", "1"]
    command += ["--loop", "uvloop", "--no-ws", "--log-level", "warning"]
    return [*command, *(["--factory"] if factory else []), target]


def start_granian_ceiling(fleet: Fleet, work: Path) -> Target:
    port = free_port()
    server = fleet.start("ceiling-granian", granian_command("ceiling_app:app", port), granian_env())
    url = f"http://127.0.0.1:{port}/predict"
    wait_until(server, lambda: http("POST", url, b"{}")[0] == 200, 60)
    return Target("ceiling-granian", url, oip_body(work), server)


def start_granian_bastion(
    fleet: Fleet, work: Path, home: Path, key: str, env: dict[str, str]
) -> Target:
    port = free_port()
    server = fleet.start(
        "bastion-granian",
        granian_command("granian_bastion:app", port, factory=True),
        granian_env({**env, "BASTION_HOME": str(home)}),
    )
    url = f"http://127.0.0.1:{port}/v2/models/echo/infer"
    body = oip_body(work).read_bytes()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    wait_until(server, lambda: http("POST", url, body, headers)[0] == 200, 120)
    return Target("bastion-granian", url, oip_body(work), server, auth=f"Bearer {key}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dur", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--conns", default="1,16,64")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if wrk_missing():
        return 2
    conns = [int(c) for c in args.conns.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bastion-http-") as tmp, Fleet(Path(tmp)) as fleet:
        work = Path(tmp)
        # One home, served in turn by `bastion serve` (uvicorn) and by granian.
        echo = start_echo_bastion(fleet, work, action="infer")
        fleet.stop(echo.server)
        for rep in range(args.reps):
            order = ["uvicorn", "granian"] if rep % 2 == 0 else ["granian", "uvicorn"]
            for server_name in order:
                if server_name == "uvicorn":
                    ceiling = start_ceiling(fleet, work)
                    bastion = start_echo_bastion_again(fleet, work, echo)
                else:
                    ceiling = start_granian_ceiling(fleet, work)
                    bastion = start_granian_bastion(fleet, work, echo.home, echo.key, echo.env)
                for kind, target in (("ceiling", ceiling), ("bastion", bastion)):
                    for c in conns:
                        row = measure(target, c, args.dur, args.warmup)
                        rows.append({"server": server_name, "app": kind, "c": c, "rep": rep, **row})
                        print(f"  rep {rep + 1} {server_name:8} {kind:8} c={c:<3} "
                              f"{row['rps']:9,.0f} req/s", flush=True)  # fmt: skip
                fleet.stop(ceiling.server)
                fleet.stop(bastion.server)
                time.sleep(1)
    print(report(rows, conns))
    out = HERE / "results" / f"http-servers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"raw results: {out}")
    return 0


def start_echo_bastion_again(fleet: Fleet, work: Path, echo: Any) -> Target:
    """`bastion serve` on the home made by start_echo_bastion."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "bastion"), "serve", "--home", str(echo.home)]
    server = fleet.start(
        "bastion-uvicorn", [*command, "--port", str(port), "--no-demo-models"], echo.env
    )
    url = f"http://127.0.0.1:{port}/v2/models/echo/infer"
    body = oip_body(work).read_bytes()
    headers = {"Authorization": f"Bearer {echo.key}", "Content-Type": "application/json"}
    wait_until(server, lambda: http("POST", url, body, headers)[0] == 200, 120)
    return Target("bastion-uvicorn", url, oip_body(work), server, auth=f"Bearer {echo.key}")


def report(rows: list[dict[str, Any]], conns: list[int]) -> str:
    def med(server: str, app: str, c: int, key: str) -> float:
        values = [r[key] for r in rows if (r["server"], r["app"], r["c"]) == (server, app, c)]
        return statistics.median(values) if values else float("nan")

    lines = [
        "| app | c | uvicorn req/s | granian req/s | granian / uvicorn | uvicorn p99 ms "
        "| granian p99 ms | uvicorn CPU µs/req | granian CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for app in ("ceiling", "bastion"):
        for c in conns:
            u, g = med("uvicorn", app, c, "rps"), med("granian", app, c, "rps")
            lines.append(
                f"| {app} | {c} | {u:,.0f} | {g:,.0f} | {g / u:.2f}x "
                f"| {med('uvicorn', app, c, 'p99_ms'):.2f} "
                f"| {med('granian', app, c, 'p99_ms'):.2f} "
                f"| {med('uvicorn', app, c, 'cpu_us_per_req'):.0f} "
                f"| {med('granian', app, c, 'cpu_us_per_req'):.0f} |"
            )
    errors = sum(r["non2xx"] + r["socket_errors"] for r in rows)
    lines.append(f"\nerrors (non-2xx + socket) over all runs: {errors}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
