"""The serving benchmark's report: one table per section, then the targets, PASS or FAIL.

Every ratio is between two rows measured in the same run (a share of the ceiling, batching
on over off, OHTTP over plaintext, this tree over a baseline), so it holds on a noisy
machine; the absolute figures move with the machine's load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway_report import Medians, medians
from ohttp_report import MIN_OHTTP_SHARE_C16
from ohttp_report import report as ohttp_table

# The targets.
MIN_DIGITS_SHARE_C16 = 0.30
MIN_DIGITS_OVER_LITSERVE_C16 = 3.0
MIN_ECHO_SHARE_C16 = 0.40
MAX_ECHO_P50_ADDED_MS_C1 = 0.5
MIN_EMBEDDINGS_BATCH_GAIN = 3.0
MIN_CHAT_BATCH_GAIN = 3.0
MAX_GATEWAY_CPU_RATIO = 0.5
MAX_NOISY_P99_RATIO = 2.0

LABELS = {
    "ceiling": "ceiling (hello)",
    "digits": "bastion digits",
    "digits-nobatch": "bastion digits-nobatch",
    "litserve": "litserve digits",
    "echo": "bastion echo",
    "baseline echo": "baseline echo",
    "minilm-l6": "bastion minilm-l6",
    "minilm-l6-nobatch": "bastion minilm-l6-nobatch",
}


@dataclass(frozen=True)
class ChatPlan:
    """One way of streaming in section d: `streams` at once to `model`."""

    name: str
    model: str
    streams: int


@dataclass
class Results:
    """Everything one run measured."""

    sections: list[str]
    baseline_ref: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # the wrk matrix
    chat: list[dict[str, Any]] = field(default_factory=list)  # rounds of section d
    ohttp: dict[str, Any] | None = None
    noisy: dict[str, Any] | None = None
    machine: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        med = wrk_medians(self.rows)
        return {
            **asdict(self),
            "medians": [{"target": n, "conns": c, **m} for (n, c), m in med.items()],
            "chat_summary": chat_summary(self.chat),
        }


@dataclass
class Check:
    section: str
    text: str
    ok: bool | None  # None: not measured in this run
    value: str = ""

    def line(self) -> str:
        word = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        return f"{word}  ({self.section}) {self.text}: {self.value}"


# ---------------------------------------------------------------- helpers


def wrk_medians(rows: list[dict[str, Any]]) -> Medians:
    """gateway.py's medians, with the median mean batch size where /metrics gave one."""
    med = medians(rows)
    for (name, c), m in med.items():
        batches = [
            r["mean_batch"]
            for r in rows
            if (r["target"], r["conns"]) == (name, c) and "mean_batch" in r
        ]
        if batches:
            m["mean_batch"] = statistics.median(batches)
    return med


def percentile(values: list[float], q: float) -> float:
    """Nearest rank; NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ratio(med: Medians, top: tuple[str, int], bottom: tuple[str, int], key: str = "rps") -> float:
    if top in med and bottom in med and med[bottom][key] > 0:
        return med[top][key] / med[bottom][key]
    return float("nan")


def measured(value: float) -> bool:
    return value == value  # not NaN


# ---------------------------------------------------------------- tables


def ratios(label: str, med: Medians, top: str, bottom: str) -> str:
    """`label`: top's throughput over bottom's at each concurrency both were measured at."""
    shown = [
        f"c={c} {ratio(med, (top, c), (bottom, c)):.2f}x"
        for c in sorted(c for (n, c) in med if n == top and (bottom, c) in med)
    ]
    return f"{label}: {', '.join(shown) or '-'}"


def load_table(names: list[str], med: Medians, vs_ceiling: bool = True) -> list[str]:
    lines = [
        "| target | c | req/s | p50 ms | p99 ms | CPU µs/req | vs ceiling req/s "
        "| p50 added ms | mean batch | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted({c for (n, c) in med if n in names and n != "ceiling"}):
        base = med.get(("ceiling", c)) if vs_ceiling else None
        for name in names:
            m = med.get((name, c))
            if m is None:
                continue
            share = f"{m['rps'] / base['rps']:.1%}" if base else "-"
            added = f"{m['p50_ms'] - base['p50_ms']:+.2f}" if base else "-"
            batch = f"{m['mean_batch']:.1f}" if "mean_batch" in m else "-"
            lines.append(
                f"| {LABELS.get(name, name)} | {c} | {m['rps']:,.0f} | {m['p50_ms']:.2f} "
                f"| {m['p99_ms']:.2f} | {m['cpu_us_per_req']:.0f} | {share} | {added} "
                f"| {batch} | {m['errors']:.0f} |"
            )
    return lines


def chat_summary(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per plan: median tokens/s over the rounds; TTFT percentiles over every stream."""
    out = {}
    for plan in dict.fromkeys(r["plan"] for r in rounds):
        mine = [r for r in rounds if r["plan"] == plan]
        streams = [s for r in mine for s in r["streams"]]
        ttfts = [s["ttft_s"] * 1000 for s in streams]
        out[plan] = {
            "streams": len(mine[0]["streams"]),
            "rounds": len(mine),
            "tok_s": statistics.median(r["tok_s"] for r in mine),
            "wall_s": statistics.median(r["wall_s"] for r in mine),
            "tokens_per_stream": statistics.median(s["tokens"] for s in streams),
            "ttft_p50_ms": percentile(ttfts, 0.50),
            "ttft_p99_ms": percentile(ttfts, 0.99),
        }
    return out


def chat_table(summary: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| tiny-chat streams | at once | tokens per stream | tokens/s (all streams) "
        "| round s | TTFT p50 ms | TTFT p99 ms | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for plan, m in summary.items():
        lines.append(
            f"| {plan} | {m['streams']:.0f} | {m['tokens_per_stream']:.0f} | {m['tok_s']:,.0f} "
            f"| {m['wall_s']:.2f} | {m['ttft_p50_ms']:.1f} | {m['ttft_p99_ms']:.1f} "
            f"| {m['rounds']:.0f} |"
        )
    return lines


def gateway_cpu_table(med: Medians, baseline_ref: str | None) -> list[str]:
    lines = [
        "| tree | echo req/s c=16 | gateway CPU µs/req | workers CPU µs/req |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (("baseline echo", f"baseline ({baseline_ref})"), ("echo", "this tree")):
        m = med.get((name, 16))
        if m is not None:
            workers = m["cpu_us_per_req"] - m["main_cpu_us_per_req"]
            lines.append(
                f"| {label} | {m['rps']:,.0f} | {m['main_cpu_us_per_req']:.0f} | {workers:.0f} |"
            )
    return lines


def ohttp_lines(ohttp: dict[str, Any]) -> list[str]:
    """ohttp.py's table at c=16, from its medians (without its own verdicts)."""
    med = {(m["path"], m["conns"]): m for m in ohttp["medians"]}
    lines = [line for line in ohttp_table([16], med) if not line.startswith(("PASS", "FAIL"))]
    while lines and not lines[-1]:
        lines.pop()
    return lines


# ---------------------------------------------------------------- targets


def bound(
    section: str, text: str, value: float, limit: float, shown: str, most: bool = False
) -> Check:
    """A check that `value` is at least `limit` (at most, with `most`); SKIP if NaN."""
    if not measured(value):
        return Check(section, text, None, "not measured")
    return Check(section, text, value <= limit if most else value >= limit, shown.format(value))


def checks(r: Results, med: Medians, chat: dict[str, dict[str, float]]) -> list[Check]:
    out: list[Check] = []
    sections = set(r.sections)
    if "a" in sections:
        share = ratio(med, ("digits", 16), ("ceiling", 16))
        text = f"digits at c=16 >= {MIN_DIGITS_SHARE_C16:.0%} of the ceiling"
        out.append(bound("a", text, share, MIN_DIGITS_SHARE_C16, "{:.1%}"))
        peer = ratio(med, ("digits", 16), ("litserve", 16))
        text = f"digits at c=16 >= {MIN_DIGITS_OVER_LITSERVE_C16:.0f}x LitServe's"
        out.append(bound("a", text, peer, MIN_DIGITS_OVER_LITSERVE_C16, "{:.2f}x"))
    if "b" in sections:
        share = ratio(med, ("echo", 16), ("ceiling", 16))
        text = f"echo at c=16 >= {MIN_ECHO_SHARE_C16:.0%} of the ceiling"
        out.append(bound("b", text, share, MIN_ECHO_SHARE_C16, "{:.1%}"))
        echo1, ceiling1 = med.get(("echo", 1)), med.get(("ceiling", 1))
        added = echo1["p50_ms"] - ceiling1["p50_ms"] if echo1 and ceiling1 else float("nan")
        text = f"echo p50 added at c=1 <= {MAX_ECHO_P50_ADDED_MS_C1} ms"
        out.append(bound("b", text, added, MAX_ECHO_P50_ADDED_MS_C1, "{:.2f} ms", most=True))
    if "c" in sections:
        gain = ratio(med, ("minilm-l6", 16), ("minilm-l6-nobatch", 16))
        text = f"embeddings at c=16, batching on >= {MIN_EMBEDDINGS_BATCH_GAIN:.0f}x off"
        out.append(bound("c", text, gain, MIN_EMBEDDINGS_BATCH_GAIN, "{:.2f}x"))
    if "d" in sections:
        gain = chat_gain(chat)
        text = f"tiny-chat tokens/s, 8 streams >= {MIN_CHAT_BATCH_GAIN:.0f}x one alone"
        out.append(bound("d", text, gain, MIN_CHAT_BATCH_GAIN, "{:.2f}x"))
    if "e" in sections:
        share = ohttp_share(r.ohttp)
        text = f"OHTTP at c=16 >= {MIN_OHTTP_SHARE_C16:.0%} of plaintext"
        out.append(bound("e", text, share, MIN_OHTTP_SHARE_C16, "{:.1%}"))
    if "f" in sections:
        cpu = ratio(med, ("echo", 16), ("baseline echo", 16), "main_cpu_us_per_req")
        text = f"gateway CPU µs per echo request at c=16 <= {MAX_GATEWAY_CPU_RATIO}x the baseline's"
        check = bound("f", text, cpu, MAX_GATEWAY_CPU_RATIO, "{:.2f}x", most=True)
        if r.baseline_ref is None:
            check.value = "no baseline (--baseline-ref REF)"
        out.append(check)
    if "g" in sections:
        p99 = r.noisy["ratio"] if r.noisy else float("nan")
        text = f"B's p99 under A's flood <= {MAX_NOISY_P99_RATIO:.0f}x alone, no B errors"
        check = bound("g", text, p99, MAX_NOISY_P99_RATIO, "{:.2f}x", most=True)
        if r.noisy and r.noisy["own_verdict"] != "PASS":
            check.ok = False  # B had errors, which noisy_neighbour.py's verdict counts
        out.append(check)
    if r.rows:
        errors = sum(m["errors"] for m in med.values())
        out.append(
            Check("*", "every wrk request answered 2xx", errors == 0, f"{errors:.0f} errors")
        )
    return out


def chat_gain(chat: dict[str, dict[str, float]]) -> float:
    """Tokens/s of 8 streams at once over one stream alone (NaN if not measured)."""
    if {"alone", "together"} <= set(chat):
        return chat["together"]["tok_s"] / chat["alone"]["tok_s"]
    return float("nan")


def ohttp_share(ohttp: dict[str, Any] | None) -> float:
    rps = {m["path"]: m["rps"] for m in (ohttp or {}).get("medians", []) if m["conns"] == 16}
    if {"ohttp", "plaintext"} <= set(rps) and rps["plaintext"] > 0:
        return float(rps["ohttp"] / rps["plaintext"])
    return float("nan")


def report(r: Results, args: argparse.Namespace) -> list[str]:
    med = wrk_medians(r.rows)
    chat = chat_summary(r.chat)
    load = r.machine.get("load_average_at_start", (0,)), r.machine.get("load_average_at_end", (0,))
    lines = [
        f"{r.machine.get('cpus')} CPUs, 1-min load average {load[0][0]:.2f} at start, "
        f"{load[1][0]:.2f} at end; wrk -t1, keep-alive POSTs; medians of {args.reps} runs "
        f"of {args.dur} s after {args.warmup} s of warm-up each",
    ]
    sections = set(r.sections)

    def section(key: str, title: str, body: list[str]) -> None:
        if key in sections:
            lines.extend(["", f"## ({key}) {title}", "", *body])

    digits = ["ceiling", "digits", "digits-nobatch", "litserve"]
    section(
        "a",
        "digits, OIP, one image per request (consumer key, fair queue on)",
        [
            *load_table(digits, med),
            "",
            ratios("Bastion digits / LitServe req/s", med, "digits", "litserve"),
            ratios("Bastion digits, batching on / off req/s", med, "digits", "digits-nobatch"),
        ],
    )
    section("b", "echo, OIP [1, 64] FP32", load_table(["ceiling", "echo"], med))
    gain = ratio(med, ("minilm-l6", 16), ("minilm-l6-nobatch", 16))
    section(
        "c",
        "minilm-l6 embeddings, one sentence per request",
        [
            *load_table(["minilm-l6", "minilm-l6-nobatch"], med, vs_ceiling=False),
            "",
            f"batching on / off at c=16: {gain:.2f}x",
        ],
    )
    section(
        "d",
        "tiny-chat, streamed, temperature 0, 64 tokens (min_tokens)",
        [
            *chat_table(chat),
            "",
            f"tokens/s, 8 streams at once / one alone: {chat_gain(chat):.2f}x",
        ],
    )
    if r.ohttp is not None:
        section("e", "OHTTP against plaintext (ohttp.py, echo chat)", ohttp_lines(r.ohttp))
    cpu = ratio(med, ("echo", 16), ("baseline echo", 16), "main_cpu_us_per_req")
    section(
        "f",
        "gateway process CPU per echo request (c=16)",
        [
            *gateway_cpu_table(med, r.baseline_ref),
            "",
            f"this tree / baseline: {cpu:.2f}x"
            if measured(cpu)
            else "no baseline: pass --baseline-ref REF to compare",
        ],
    )
    if r.noisy is not None:
        section(
            "g",
            "noisy neighbour (noisy_neighbour.py)",
            [
                *r.noisy["table"],
                "",
                f"B's p99 under A's flood / alone: {r.noisy['ratio']:.2f}x",
                *r.noisy["context"],
            ],
        )
    lines += ["", f"## Targets ({time.strftime('%Y-%m-%d %H:%M')})", ""]
    lines += [c.line() for c in checks(r, med, chat)]
    return lines
