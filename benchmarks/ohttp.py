"""End-to-end encryption cost: the same chat request to Bastion in plaintext and via OHTTP,
with the classical and the post-quantum hybrid KEM.

One run starts `bastion serve` with the echo model on 127.0.0.1, offering both KEMs
(BASTION_OHTTP_KEMS=mlkem768-x25519,x25519), and drives it with wrk (-t1, keep-alive POSTs)
at each concurrency, the three paths taking turns going first:

    plaintext  POST /v1/chat/completions, JSON, `Authorization: Bearer <tenant key>`
    ohttp      POST /v1/ohttp: the same request as Binary HTTP, encapsulated with HPKE to
               the server's published X25519 key (RFC 9458, HKDF-SHA256, AES-128-GCM);
               the worker opens and seals it
    ohttp-pq   the same, to the server's MLKEM768-X25519 (X-Wing) key

The server refuses a repeated encapsulation, so before each OHTTP measurement the script
writes a file of fresh encapsulations to that path's key (Date = now), enough for the
warm-up and the run at the expected rate with a margin, and ohttp.lua sends each once. It
then times the encapsulation steps in-process for both KEMs (client: encapsulate and open;
server: decapsulate and seal), measures the encapsulated request and the key
configuration, and prints the tables: OHTTP to plaintext and hybrid to classical, each
measured in the same run, and the target checks (hybrid at c=16 >= 90 % of classical).

Usage: .venv/bin/python benchmarks/ohttp.py [--reps 2] [--dur 8] [--warmup 2] [--conns 1,16,64]
       [--micro-iterations 1000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import email.utils
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import httpx

from bastion.client import OHTTPTransport
from bastion.crypto import hpke, ohttp
from bastion.wire import bhttp
from gateway_servers import (
    HERE,
    WRK,
    BenchmarkError,
    bastion,
    fail,
    http,
    package_versions,
    raise_interrupt,
    run_command,
    start_echo_bastion,
    wrk_missing,
)
from ohttp_report import (
    OHTTP_KEMS,
    PATHS,
    PLAINTEXT,
    encapsulation_costs,
    kem_label,
    medians,
    micro_table,
    report,
)
from proctree import Fleet, Server, cpu_seconds

MODEL = "echo"
# About 200 characters of words: the echo model answers with the first max_tokens of them.
PROMPT = (
    "Please summarise the following note in one sentence: the quarterly review found that "
    "the new cache halved the median latency of the search service while memory use stayed "
    "flat across all regions."
)
# Bodies written per expected request: the rate can rise between measurements.
BODY_MARGIN = 1.5
BODIES_PER_JOB = 500
# Both KEMs the paths use, in the server's default order (the hybrid preferred). Named
# rather than left to the default, which could one day drop a KEM measured here.
SERVER_KEMS = "mlkem768-x25519,x25519"
# Bastion's default; the inner Date of every body must stay within it until it is sent.
DATE_WINDOW_S = 60.0


@dataclass
class Bastion:
    """The running server and what the paths need to call it."""

    server: Server
    base: str
    auth: str
    fingerprints: list[str]  # as `bastion ohttp keys` lists them
    # Per OHTTP path, the published key configuration of its KEM (one of the fingerprints).
    configs: dict[str, ohttp.KeyConfig]


# ---------------------------------------------------------------- the request


def chat_body() -> bytes:
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
    }
    return json.dumps(request).encode()


def inner_request(authority: str, body: bytes) -> bhttp.Request:
    """The plaintext request as the OHTTP client encodes it, dated now."""
    headers = (
        ("content-type", "application/json"),
        ("date", email.utils.formatdate(usegmt=True)),
    )
    return bhttp.Request("POST", "http", authority, "/v1/chat/completions", headers, body)


def encapsulated_bodies(job: tuple[bytes, str, bytes, int]) -> bytes:
    """`count` fresh encapsulations, each a 4-byte big-endian length then the body."""
    config_bytes, authority, body, count = job
    config = ohttp.KeyConfig.decode(config_bytes)
    suite = config.select_suite([hpke.AEAD_AES_128_GCM])
    out = bytearray()
    for _ in range(count):
        message = bhttp.encode_request(inner_request(authority, body))
        data, _ = ohttp.encapsulate_request(config, message, suite=suite)
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


# ---------------------------------------------------------------- the server


def start_server(fleet: Fleet, work: Path, date_window_s: float) -> Bastion:
    """`bastion serve` with the echo model, a consumer key for chat on it, and an OHTTP key
    of each KEM the paths use."""
    echo = start_echo_bastion(
        fleet,
        work,
        action="chat",
        env_extra={
            "BASTION_OHTTP_DATE_WINDOW_S": str(date_window_s),
            "BASTION_OHTTP_KEMS": SERVER_KEMS,
        },
    )
    server, base, key = echo.server, echo.base, echo.key
    listing = bastion("ohttp", "keys", "--home", str(echo.home), "--json")
    keys = json.loads(run_command(listing, echo.env))
    fingerprints = [k["fingerprint"] for k in keys]
    status, raw = http("GET", f"{base}/.well-known/ohttp-gateway")
    published = ohttp.decode_key_configs(raw) if status == 200 else []
    configs: dict[str, ohttp.KeyConfig] = {}
    for path, kem_id in OHTTP_KEMS.items():
        name = hpke.kem_name(kem_id)
        listed = {k["fingerprint"] for k in keys if k["kem_id"] == kem_id}
        if not listed:
            fail(server, f"has no {name} OHTTP key in `bastion ohttp keys` (for the {path} path)")
        of_kem = [c for c in published if c.kem_id == kem_id]
        pinned = [c for c in of_kem if c.fingerprint() in listed]
        if not pinned:
            fail(
                server,
                f"publishes {len(of_kem)} {name} key configurations, none of them one that "
                f"`bastion ohttp keys` lists (HTTP {status}; for the {path} path)",
            )
        configs[path] = pinned[0]
    return Bastion(server, base, f"Bearer {key}", fingerprints, configs)


def sealed_headers(b: Bastion) -> dict[str, str]:
    return {
        "Authorization": b.auth,
        "Bastion-Model": MODEL,
        "Content-Type": ohttp.REQUEST_MEDIA_TYPE,
    }


def check_answers(b: Bastion) -> tuple[bhttp.Response, dict[str, str]]:
    """Every path gives the same answer, and the server refuses what the load relies on it
    refusing. Returns the plaintext answer as Binary HTTP sees it (for the micro-benchmarks)
    and, per KEM, the suite OHTTPTransport said it used."""
    url, body = f"{b.base}/v1/chat/completions", chat_body()
    status, _ = http("POST", url, body, {"Content-Type": "application/json"})
    if status not in (401, 403):
        fail(b.server, f"answered {status} to a request without an API key")
    json_headers = {"Authorization": b.auth, "Content-Type": "application/json"}
    plain = httpx.post(url, content=body, headers=json_headers, timeout=5)
    if plain.status_code != 200:
        fail(b.server, f"answered the plaintext request with HTTP {plain.status_code}")
    expected = plain.json()

    for path, config in b.configs.items():
        message = bhttp.encode_request(inner_request(b.base.removeprefix("http://"), body))
        suite = config.select_suite([hpke.AEAD_AES_128_GCM])
        data, context = ohttp.encapsulate_request(config, message, suite=suite)
        status, raw = http("POST", f"{b.base}/v1/ohttp", data, sealed_headers(b))
        if status != 200:
            fail(b.server, f"answered the {path} encapsulated request with HTTP {status}")
        inner = bhttp.decode_response(context.open(raw))
        if inner.status != 200 or not same_answer(json.loads(inner.content), expected):
            fail(b.server, f"gave another answer through {path} (inner HTTP {inner.status})")
        # The load counts a repeated body as an error only if the server refuses it.
        status, _ = http("POST", f"{b.base}/v1/ohttp", data, sealed_headers(b))
        if status < 400:
            fail(b.server, f"answered a replayed {path} encapsulated request with HTTP {status}")

    # The client library users use, pinned to the keys `bastion ohttp keys` printed, once
    # per KEM; it must say which one protected the request.
    described: dict[str, str] = {}
    for kem_id in OHTTP_KEMS.values():
        name = hpke.kem_name(kem_id)
        transport = OHTTPTransport(fingerprints=b.fingerprints, kem=name)
        with httpx.Client(transport=transport) as client:
            answer = client.post(url, content=body, headers=json_headers, timeout=10)
        if answer.status_code != 200 or not same_answer(answer.json(), expected):
            fail(
                b.server,
                f"gave another answer to OHTTPTransport(kem={name!r}) (HTTP {answer.status_code})",
            )
        suite_used = transport.suite(url)
        if suite_used is None or suite_used.split(" ", 1)[0] != name:
            fail(b.server, f"OHTTPTransport(kem={name!r}) reports the suite {suite_used!r}")
        described[name] = suite_used
    kept = ("content-type", "content-length", "date")
    response = bhttp.Response(
        200,
        tuple((k, v) for k, v in plain.headers.multi_items() if k.lower() in kept),
        plain.content,
    )
    return response, described


def same_answer(got: Any, expected: Any) -> bool:
    """The same completion: text, finish reason, usage (ids and timestamps differ)."""
    try:
        texts = [a["choices"][0]["message"]["content"] for a in (got, expected)]
        rest = [(a["model"], a["choices"][0]["finish_reason"], a["usage"]) for a in (got, expected)]
    except (KeyError, IndexError, TypeError):
        return False
    return bool(texts[0]) and texts[0] == texts[1] and rest[0] == rest[1]


# ---------------------------------------------------------------- load


def run_wrk(script: Path, url: str, env: dict[str, str], conns: int, dur: int) -> dict[str, Any]:
    command = [WRK, "-t1", f"-c{conns}", f"-d{dur}s", "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(
        command, env=dict(os.environ, **env), capture_output=True, text=True, timeout=dur + 60
    )
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
        **{k: raw[k] for k in ("wraps", "bodies_used") if k in raw},
    }


class Runner:
    """Measures one path at one concurrency; writes the OHTTP bodies each run needs, each
    OHTTP path's to its own key configuration."""

    def __init__(self, b: Bastion, work: Path, pool: Pool, args: argparse.Namespace) -> None:
        self.b = b
        self.work = work
        self.pool = pool
        self.dur = args.dur
        self.warmup = args.warmup
        self.rates: dict[tuple[str, int], list[float]] = {}
        self.plain_file = work / "chat.json"
        self.plain_file.write_bytes(chat_body())

    def measure(self, path: str, conns: int) -> dict[str, Any]:
        rate = self.expected_rate(path, conns) if path in OHTTP_KEMS else 0.0
        row = self._measure(path, conns, rate)
        if row.get("wraps"):
            # Ran out of bodies (the rate rose): the repeats were refused. Once more, with room
            # (refusals are quick, so the failed run's rate is an upper bound).
            print(f"  {path} c={conns}: bodies ran out ({row['wraps']} wraps); again", flush=True)
            first = row
            row = self._measure(path, conns, 2 * max(rate, first["rps"]))
            row["discarded_run_with_wraps"] = first
        self.rates.setdefault((path, conns), []).append(row["rps"])
        return row

    def _measure(self, path: str, conns: int, rate: float) -> dict[str, Any]:
        generated: dict[str, Any] = {}
        warm_bodies = bodies = None
        if path in OHTTP_KEMS:
            if self.warmup > 0:
                warm_bodies, _, _ = self.bodies(path, "warmup", rate, conns, self.warmup)
            started = time.monotonic()
            # Written last, so that their Date is the freshest.
            bodies, count, size = self.bodies(path, "measure", rate, conns, self.dur)
            generated = {
                "bodies": count,
                "bodies_s": round(time.monotonic() - started, 2),
                "body_bytes": size,
            }
        if self.warmup > 0:
            self.wrk(path, conns, self.warmup, warm_bodies)
        pids = self.b.server.tree()
        main_before, all_before = cpu_seconds(pids[:1]), cpu_seconds(pids)
        row = self.wrk(path, conns, self.dur, bodies)
        after = self.b.server.tree()
        per_request = 1e6 / max(row["requests"], 1)
        row.update(
            generated,
            cpu_us_per_req=(cpu_seconds(after) - all_before) * per_request,
            main_cpu_us_per_req=(cpu_seconds(after[:1]) - main_before) * per_request,
            server_processes=len(pids),
        )
        return row

    def wrk(self, path: str, conns: int, dur: int, bodies: Path | None) -> dict[str, Any]:
        if path == PLAINTEXT:
            env = {"BODYFILE": str(self.plain_file), "AUTH": self.b.auth, "XKEY": ""}
            return run_wrk(HERE / "post.lua", f"{self.b.base}/v1/chat/completions", env, conns, dur)
        env = {"BODIES": str(bodies), "AUTH": self.b.auth, "MODEL": MODEL}
        return run_wrk(HERE / "ohttp.lua", f"{self.b.base}/v1/ohttp", env, conns, dur)

    def expected_rate(self, path: str, conns: int) -> float:
        """This path's rate at this concurrency so far, else the other OHTTP path's, else
        plaintext's, else any; or a probe."""
        others = [p for p in OHTTP_KEMS if p != path]
        for key in [(p, conns) for p in (path, *others, PLAINTEXT)]:
            if key in self.rates:
                return max(self.rates[key])
        if self.rates:
            return max(max(r) for r in self.rates.values())
        return float(self.wrk(PLAINTEXT, conns, 2, None)["rps"])

    def bodies(
        self, path: str, name: str, rate: float, conns: int, seconds: int
    ) -> tuple[Path, int, int]:
        """A file of fresh encapsulations to `path`'s key for `seconds` at `rate`, with a
        margin; returns it, the number of bodies and the size of one."""
        count = int(rate * seconds * BODY_MARGIN) + 2 * conns + 200
        jobs = -(-count // BODIES_PER_JOB)
        config = self.b.configs[path].encode()
        job = (config, self.b.base.removeprefix("http://"), chat_body())
        parts = self.pool.map(encapsulated_bodies, [(*job, BODIES_PER_JOB)] * jobs)
        file = self.work / f"{path}-{name}.bin"
        file.write_bytes(b"".join(parts))
        # Every body has the same size: the same request and suite (the Date's length is fixed).
        size = int.from_bytes(parts[0][:4], "big")
        return file, jobs * BODIES_PER_JOB, size


def run_load(runner: Runner, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every path at every concurrency, each repetition; they take turns going first."""
    rows = []
    for rep in range(args.reps):
        for i, c in enumerate(args.conns):
            shift = (rep * len(args.conns) + i) % len(PATHS)
            for path in PATHS[shift:] + PATHS[:shift]:
                row = runner.measure(path, c)
                row.update(path=path, conns=c, rep=rep, load_average=os.getloadavg()[0])
                rows.append(row)
                print(
                    f"rep {rep} c={c:<3} {path:9s} {row['rps']:7,.0f} req/s "
                    f"p50 {row['p50_ms']:6.2f} ms p99 {row['p99_ms']:7.2f} ms "
                    f"CPU {row['cpu_us_per_req']:5.0f} µs/req non-2xx {row['non2xx']} "
                    f"socket errors {row['socket_errors']} load {row['load_average']:.2f}"
                    + (
                        f" bodies {row['bodies']} in {row['bodies_s']} s" if "bodies" in row else ""
                    ),
                    flush=True,
                )
    return rows


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=2, help="repetitions (medians over them)")
    parser.add_argument("--dur", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each")
    parser.add_argument("--conns", default="1,16,64", help="concurrencies, comma-separated")
    parser.add_argument("--micro-iterations", type=int, default=1000, help="per timing batch")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for JSON")
    args = parser.parse_args()
    args.conns = [int(c) for c in args.conns.split(",")]
    return args


def versions() -> dict[str, str]:
    return package_versions(("bastion", "cryptography", "pyhpke", "uvicorn", "starlette"))


def main() -> int:
    args = parse_args()
    if wrk_missing():
        return 2
    # Bodies are written before the warm-up; their Date must still be accepted at the end.
    window = max(DATE_WINDOW_S, 2.0 * (args.warmup + args.dur) + 30.0)
    if window > DATE_WINDOW_S:
        print(f"note: --warmup + --dur is long; the server's Date window is {window:.0f} s")
    load_at_start = os.getloadavg()
    planned = args.reps * len(args.conns) * len(PATHS) * (args.dur + args.warmup)
    print(
        f"{planned} s of load: {args.reps} reps x c={args.conns} x {list(PATHS)}, {args.warmup} s "
        f"warm-up + {args.dur} s each, plus writing the OHTTP bodies; "
        f"1-min load average {load_at_start[0]:.2f}",
        flush=True,
    )
    # The pool forks before any signal handler is set and before any server starts.
    context = multiprocessing.get_context("fork")
    # Its workers leave Ctrl-C to the benchmark, which stops them.
    ignore_sigint = (signal.SIGINT, signal.SIG_IGN)
    with context.Pool(os.cpu_count() or 1, signal.signal, ignore_sigint) as pool:
        signal.signal(signal.SIGTERM, raise_interrupt)
        signal.signal(signal.SIGINT, raise_interrupt)
        with (
            tempfile.TemporaryDirectory(prefix="bastion-bench-ohttp-") as tmp,
            Fleet(Path(tmp)) as fleet,
        ):
            try:
                b = start_server(fleet, Path(tmp), window)
                answer, described = check_answers(b)
                print(
                    "all paths answer the same; a replayed encapsulation is refused; "
                    "OHTTPTransport: " + "; ".join(described.values()),
                    flush=True,
                )
                request = inner_request(b.base.removeprefix("http://"), chat_body())
                micro = encapsulation_costs(request, answer, args.micro_iterations)
                rows = run_load(Runner(b, Path(tmp), pool, args), args)
            except BenchmarkError as exc:
                print(f"\nerror: {exc}", file=sys.stderr)
                return 1
    load_at_end = os.getloadavg()
    med = medians(rows)
    lines = [
        f"{os.cpu_count()} CPUs, 1-min load average {load_at_start[0]:.2f} at start, "
        f"{load_at_end[0]:.2f} at end; wrk -t1, keep-alive POSTs; "
        f"medians of {args.reps} runs of {args.dur} s",
        "",
        *report(args.conns, med),
        "",
        *micro_table(micro),
    ]
    print("\n" + "\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"ohttp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": load_at_end,
        },
        "versions": versions(),
        "rows": rows,
        "medians": [{"path": p, "conns": c, **m} for (p, c), m in med.items()],
        "micro": micro,
        "keys": {
            path: {
                "kem": kem_label(config.kem_id),
                "suite": str(config.select_suite([hpke.AEAD_AES_128_GCM])),
                "fingerprint": config.fingerprint(),
                "key_config_bytes": len(config.encode()),
            }
            for path, config in b.configs.items()
        },
        "transport_suites": described,
        "report": lines,
    }
    out.write_text(json.dumps(results, indent=1))
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
