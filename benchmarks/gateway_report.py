"""The gateway benchmark's report: medians, the table with ratios, the target checks.

Every ratio is to the ceiling measured in the same run, so it holds on a noisy machine.
"""

from __future__ import annotations

import statistics
from typing import Any

Medians = dict[tuple[str, int], dict[str, float]]

# The targets.
MIN_SHARE_OF_CEILING_C16 = 0.20
MAX_P50_ADDED_MS_C1 = 1.0
MAX_GATEWAY_RSS_MB = 150.0
MAX_READY_S = 3.0


def medians(rows: list[dict[str, Any]]) -> Medians:
    out = {}
    for key in sorted({(r["target"], r["conns"]) for r in rows}):
        group = [r for r in rows if (r["target"], r["conns"]) == key]
        out[key] = {
            field: statistics.median(r[field] for r in group)
            for field in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "main_cpu_us_per_req")
        }
        out[key]["errors"] = sum(r["non2xx"] + r["socket_errors"] for r in group)
    return out


def report(names: list[str], conns: list[int], med: Medians) -> list[str]:
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
    med: Medians,
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
    med: Medians,
    memory: dict[str, Any] | None,
    after_load: dict[str, Any] | None,
    startup: list[dict[str, Any]],
    idle_cpu: dict[str, float],
) -> list[str]:
    lines = []
    peer = [
        f"c={c} {m['rps'] / med[('litserve', c)]['rps']:.1f}x"
        for (name, c), m in med.items()
        if name == "bastion" and ("litserve", c) in med
    ]
    if peer:
        lines.append("Bastion / LitServe req/s: " + ", ".join(peer))
    before = [
        f"c={c} {m['rps'] / med[('baseline', c)]['rps']:.2f}x"
        for (name, c), m in med.items()
        if name == "bastion" and ("baseline", c) in med
    ]
    if before:
        lines.append("Bastion / baseline (--baseline-ref) req/s: " + ", ".join(before))
    split = [
        f"c={c} gateway {m['main_cpu_us_per_req']:.0f} + workers "
        f"{m['cpu_us_per_req'] - m['main_cpu_us_per_req']:.0f}"
        for (name, c), m in med.items()
        if name == "bastion"
    ]
    if split:
        lines.append("Bastion CPU µs/req: " + ", ".join(split))
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
