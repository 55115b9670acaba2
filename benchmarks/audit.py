#!/usr/bin/env python3
"""Issue 14's costs: the audit log (appending, signing checkpoints, verifying, the gateway
with auditing on and off) and JWT bearer authentication per request.

In-process, on a fresh SQLite database in a temporary folder (the server's own setup:
WAL, synchronous=NORMAL):

    append, one event a transaction          what a CLI command pays (plus its checkpoint)
    append, batches of 100 / 1000            what the server's writer thread pays per event
    checkpoint                                sign (Ed25519) and store one checkpoint
    verify                                    `bastion audit verify` on --records records

Then two `bastion serve` with the echo model, auditing on and off (BASTION_AUDIT_ENABLED),
taking turns under wrk at --conns connections for each request kind:

    inference    POST /v1/chat/completions (no event: the hot path)
    bad key      GET /v1/models with a wrong secret (auth.failed events, rate-limited)
    admin read   GET /admin/v1/keys (one admin.read record per request)

And `Authenticator.authenticate` in-process (best of 7 x 20,000 calls): an API key, a JWT
already verified (cached, the per-request cost once a token is known) and a JWT verified
from scratch (signature, claims, tenant read), against the test suite's OIDC provider.

Targets (issue 14): inference throughput with auditing on >= 95 % of off; verify of
1,000,000 records <= 30 s.

Usage: .venv/bin/python benchmarks/audit.py [--records 1000000] [--dur 6] [--conns 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bastion.audit.checkpoint import Checkpoint
from bastion.audit.events import Event
from bastion.audit.log import AuditLog
from bastion.audit.note import Signer, sign
from bastion.audit.verify import verify_log
from bastion.crypto.keyring import KeyRing, LocalKek
from bastion.store.db import Database
from gateway_servers import HERE, WRK, start_echo_bastion, write_body, wrk_missing
from proctree import Fleet

RESULTS = HERE / "results"


def event(i: int) -> Event:
    return Event(
        kind="auth.failed",
        outcome="failure",
        actor=f"{i % 997:016x}",
        tenant="acme",
        detail={"reason": "bad_secret", "address": "203.0.113.7"},
        at=1_800_000_000 + i / 1000,
    )


def fresh_log(folder: Path, name: str) -> AuditLog:
    db = Database(f"sqlite:///{folder / name}")
    db.migrate()
    return AuditLog(
        db, KeyRing(LocalKek(os.urandom(32))), checkpoint_every=256, checkpoint_interval_s=1e9
    )


def per_event_us(log: AuditLog, batch: int, total: int) -> float:
    start = time.perf_counter()
    for i in range(0, total, batch):
        log.append([event(j) for j in range(i, i + batch)])
    return (time.perf_counter() - start) / total * 1e6


def micro(folder: Path, records: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    results["append_1_us"] = per_event_us(fresh_log(folder, "one.db"), 1, 2000)
    results["append_100_us"] = per_event_us(fresh_log(folder, "hundred.db"), 100, 20_000)
    results["append_1000_us"] = per_event_us(fresh_log(folder, "thousand.db"), 1000, 50_000)

    log = fresh_log(folder, "checkpoints.db")
    log.append([event(0)])
    timings = []
    for i in range(1, 501):
        log.append([event(i)])
        start = time.perf_counter()
        log.checkpoint(force=True)
        timings.append(time.perf_counter() - start)
    results["checkpoint_us"] = statistics.median(timings) * 1e6
    signer = Signer("bench/audit", os.urandom(32))
    text = Checkpoint("bench/audit", 123456, os.urandom(32)).encode()
    start = time.perf_counter()
    for _ in range(2000):
        sign(text, signer)
    results["sign_us"] = (time.perf_counter() - start) / 2000 * 1e6

    big = fresh_log(folder, "big.db")
    start = time.perf_counter()
    for i in range(0, records, 10_000):
        big.append([event(j) for j in range(i, min(records, i + 10_000))])
    results["fill_s"] = time.perf_counter() - start
    verifier = big.own_verifier()
    assert verifier is not None
    start = time.perf_counter()
    report = verify_log(big.database, verifier)
    results["verify_s"] = time.perf_counter() - start
    results["verify_ok"] = report.ok
    results["records"] = report.size
    return results


def jwt_costs(folder: Path) -> dict[str, float]:
    """Per-request authentication cost of an API key and of JWTs (microseconds)."""
    import timeit

    sys.path.insert(0, str(HERE.parent / "tests"))
    from bastion.audit.events import MemoryEventSink
    from bastion.gateway.auth import Authenticator
    from bastion.identity.jwks import JwksCache
    from bastion.identity.jwt import ClaimsMapping, JwtVerifier, TokenPolicy, database_tenants
    from bastion.identity.keys import KeyHasher
    from bastion.identity.principal import OPERATOR
    from bastion.identity.service import IdentityService
    from oidc_provider import API_AUDIENCE, OidcProvider

    def best(fn: Callable[[], object], number: int = 20_000) -> float:
        return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6

    results: dict[str, float] = {}
    with OidcProvider() as provider:
        clock = provider.clock
        db = Database(f"sqlite:///{folder / 'sso.db'}")
        db.migrate()
        hasher = KeyHasher(os.urandom(32))
        service = IdentityService(db, hasher, MemoryEventSink(), clock=clock)
        service.create_tenant(OPERATOR, "acme")
        _, key = service.create_key(OPERATOR, tenant="acme", role="consumer")
        keys = JwksCache(provider.issuer, clock=clock)
        policy, mapping = TokenPolicy(provider.issuer, API_AUDIENCE), ClaimsMapping()
        verifier = JwtVerifier(policy, mapping, keys, database_tenants(db), clock=clock)
        auth = Authenticator(db, hasher, MemoryEventSink(), clock=clock, tokens=verifier)
        auth.refresh()
        bearer_key = f"Bearer {key}"
        auth.authenticate(bearer_key)
        results["API key"] = best(lambda: auth.authenticate(bearer_key, may_read=False))
        token = provider.mint()
        bearer_jwt = f"Bearer {token}"
        auth.authenticate(bearer_jwt)
        label = f"JWT {provider.signing.algorithm}, cached"
        results[label] = best(lambda: auth.authenticate(bearer_jwt, may_read=False))
        fresh = iter([provider.mint(provider.claims(sub=f"user{i}")) for i in range(3000)])
        label = f"JWT {provider.signing.algorithm}, verified (signature, claims, tenant read)"
        results[label] = best(lambda: verifier.verify(next(fresh)), number=400)
        keys.close()
        db.close()
    return results


def wrk(url: str, conns: int, dur: int, headers: dict[str, str], body: Path | None) -> float:
    command = [WRK, "-t1", f"-c{conns}", f"-d{dur}s", "--timeout", "10s"]
    env = dict(os.environ)
    if body is not None:
        env.update(BODYFILE=str(body), AUTH=headers["Authorization"], XKEY="")
        command += ["-s", str(HERE / "post.lua")]
        out = subprocess.run([*command, url], env=env, capture_output=True, text=True)
        found = re.search(r"^RESULT (.*)$", out.stdout, re.MULTILINE)
        if found is None:
            raise SystemExit(f"wrk printed no result: {out.stdout}{out.stderr}")
        raw = {k: int(v) for k, v in (p.split("=") for p in found.group(1).split())}
        return raw["requests"] / (raw["duration_us"] / 1e6)
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    out = subprocess.run([*command, url], env=env, capture_output=True, text=True)
    found = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if found is None:
        raise SystemExit(f"wrk printed no result: {out.stdout}{out.stderr}")
    return float(found.group(1))


def gateway(work: Path, conns: int, dur: int, reps: int) -> dict[str, dict[str, float]]:
    body = write_body(
        work / "chat.json",
        {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]},
    )
    rates: dict[str, dict[str, list[float]]] = {}
    (work / "logs").mkdir(exist_ok=True)
    with Fleet(work / "logs") as fleet:
        servers = {}
        for mode, enabled in (("on", "true"), ("off", "false")):
            folder = work / mode
            folder.mkdir()
            servers[mode] = start_echo_bastion(
                fleet,
                folder,
                action="chat",
                env_extra={"BASTION_AUDIT_ENABLED": enabled},
                name=f"audit-{mode}",
            )
        kinds: dict[str, Callable[[Any], tuple[str, dict[str, str], Path | None]]] = {
            "inference": lambda s: (
                f"{s.base}/v1/chat/completions",
                {"Authorization": f"Bearer {s.key}"},
                body,
            ),
            "bad key": lambda s: (
                f"{s.base}/v1/models",
                {"Authorization": f"Bearer {s.key[:-4]}xxxx"},
                None,
            ),
            "admin read": lambda s: (
                f"{s.base}/admin/v1/keys",
                {"Authorization": f"Bearer {s.admin_key}"},
                None,
            ),
        }
        for kind, target in kinds.items():
            rates[kind] = {"on": [], "off": []}
            for rep in range(reps):
                order = ("on", "off") if rep % 2 == 0 else ("off", "on")
                for mode in order:
                    url, headers, chat = target(servers[mode])
                    wrk(url, conns, 1, headers, chat)  # warm-up
                    rates[kind][mode].append(wrk(url, conns, dur, headers, chat))
    return {
        kind: {mode: statistics.median(values) for mode, values in by_mode.items()}
        for kind, by_mode in rates.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--dur", type=int, default=6)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--skip-gateway", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bastion-audit-bench-") as tmp:
        work = Path(tmp)
        results: dict[str, Any] = {"micro": micro(work, args.records)}
        results["jwt"] = jwt_costs(work)
        if not args.skip_gateway:
            if wrk_missing():
                raise SystemExit("wrk is missing: see benchmarks/README.md")
            results["gateway"] = gateway(work, args.conns, args.dur, args.reps)
    m = results["micro"]
    print(f"\nAudit log costs (SQLite, {os.cpu_count()} cores)\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| append, one event a transaction | {m['append_1_us']:.0f} µs/event |")
    print(f"| append, batches of 100 (server writer) | {m['append_100_us']:.1f} µs/event |")
    print(f"| append, batches of 1000 | {m['append_1000_us']:.1f} µs/event |")
    print(f"| checkpoint (sign + store) | {m['checkpoint_us']:.0f} µs |")
    print(f"| Ed25519 signed note alone | {m['sign_us']:.0f} µs |")
    print(f"| fill {m['records']:,} records | {m['fill_s']:.1f} s |")
    verdict = "PASS" if m["verify_s"] <= 30 and m["records"] >= 1_000_000 else "FAIL"
    print(
        f"| verify {m['records']:,} records | {m['verify_s']:.1f} s "
        f"(target ≤ 30 s for 1M: {verdict}; ok={m['verify_ok']}) |"
    )
    print("\nAuthentication per request (in-process, best of 7)\n")
    print("| credential | µs |")
    print("|---|---|")
    for label, cost in results["jwt"].items():
        print(f"| {label} | {cost:.1f} |")
    if "gateway" in results:
        print(f"\nGateway throughput, auditing on vs off (c={args.conns}, median of {args.reps})\n")
        print("| requests | on (req/s) | off (req/s) | on/off |")
        print("|---|---|---|---|")
        for kind, rates in results["gateway"].items():
            ratio = rates["on"] / rates["off"]
            note = (
                f" (target ≥ 95 %: {'PASS' if ratio >= 0.95 else 'FAIL'})"
                if kind == "inference"
                else ""
            )
            print(f"| {kind} | {rates['on']:,.0f} | {rates['off']:,.0f} | {ratio:.1%}{note} |")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"audit-{stamp}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
