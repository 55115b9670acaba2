#!/usr/bin/env python3
"""Serving performance: Bastion's models under load against the ceiling and LitServe, one run.

One run starts its servers on 127.0.0.1, checks their answers, measures each section and
prints one table per section, then the targets, each PASS or FAIL:

    a  digits (ONNX, dynamic batching) OIP single-image requests at c=1/16/64: Bastion with
       batching on and off, LitServe 0.2.19 with batching on, as shares of the ceiling
    b  the echo model (OIP [1, 64] FP32) at c=1 and 16: the gateway's own cost
    c  minilm-l6 embeddings at c=16, dynamic batching on against off
    d  tiny-chat: 8 streams of 64 tokens at once against one alone (continuous batching),
       and with batching off
    e  OHTTP against plaintext at c=16 (ohttp.py, run as a child)
    f  the gateway process's CPU per echo request at c=16, and a baseline commit's
       (--baseline-ref) in the same run
    g  noisy neighbour: B's p99 under A's flood over B's p99 alone (noisy_neighbour.py)

The wrk loads of sections a, b, c and f run as one matrix: at each concurrency the rows
take turns going first from one repetition to the next, so a noisy machine hurts them
alike; tables show medians over the repetitions.

Usage: .venv/bin/python benchmarks/serving.py [--only a,b,...] [--reps 2] [--dur 8]
       [--warmup 2] [--baseline-ref REF]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bastion.models.demo import (
    MARKER_FILE,
    DemoModel,
    build_digits,
    build_minilm,
    build_tiny_chat,
    digits_split,
)
from gateway import measure, run_wrk
from gateway_servers import (
    HERE,
    LITSERVE_VERSION,
    BenchmarkError,
    ModelSpec,
    RunningBastion,
    Target,
    baseline_checkout,
    fail,
    http,
    litserve_python,
    package_versions,
    raise_interrupt,
    start_bastion,
    start_bastion_home,
    start_ceiling,
    start_litserve,
    wrk_missing,
)
from proctree import Fleet, Server
from serving_report import ChatPlan, Results, chat_summary, report

SECTIONS = {
    "a": "digits OIP: Bastion (batching on, off) and LitServe against the ceiling",
    "b": "echo OIP: the gateway's cost against the ceiling",
    "c": "minilm-l6 embeddings: dynamic batching on against off",
    "d": "tiny-chat streams: continuous batching",
    "e": "OHTTP against plaintext (ohttp.py)",
    "f": "gateway CPU per echo request, against --baseline-ref",
    "g": "noisy neighbour (noisy_neighbour.py)",
}
DIGITS_BODIES = 100  # different test images, sent in turn
ECHO_CONNS = [1, 16]
CHAT_STREAMS = 8
CHAT_TOKENS = 64
EMBED_SENTENCES = (
    "The quarterly review found that the new cache halved the median latency.",
    "A small dog slept in the sun on the porch all afternoon.",
    "Interest rates rose again, and the housing market cooled in most regions.",
    "She tuned the violin before the concert and played without a score.",
    "The rover sent back images of layered rock at the edge of the crater.",
    "Please reset my password; the reset link in the last email has expired.",
    "Fresh basil, tomatoes and olive oil make a simple summer pasta sauce.",
    "The committee postponed the vote until the budget figures are audited.",
    "Heavy rain flooded the underpass and traffic was diverted for hours.",
    "Our team shipped the release on Friday after two weeks of testing.",
    "The museum's new wing shows sculptures from the early bronze age.",
    "He missed the last train home and walked across the city at night.",
    "Solar panels on the school roof now cover most of its electricity use.",
    "The patient reported mild headaches and trouble sleeping since March.",
    "A sudden frost damaged the orchard just as the trees began to bloom.",
    "The striker scored twice in the second half to win the cup final.",
)
# Asked of tiny-chat at temperature 0 with `min_tokens` 64 (vLLM's extension): every stream
# runs to 64 tokens. Left to itself, tiny-chat ends most answers within 12 to 40 tokens,
# and how soon depends on the text watermark's key (a new one with every home: under some
# keys the end token is favoured after a full stop).
CHAT_PROMPTS = (
    "Write a long poem about the sea.",
    "Describe your day in detail.",
    "Write a long poem about the mountains.",
    "Describe your house in detail.",
    "Write a long poem about the forest.",
    "Describe your city in detail.",
    "Write a story.",
    "Tell me a long story about a dragon.",
)


@dataclass
class Load:
    """One row of the wrk matrix: a target, what it serves (ceiling, digits, echo or
    embeddings: how its answer is checked), the concurrencies to drive it at, and the
    Bastion model whose batch sizes /metrics counts (if any)."""

    name: str
    kind: str
    target: Target
    conns: list[int]
    model: str = ""
    metrics: tuple[str, str] | None = None  # (url, admin key)


@dataclass
class Servers:
    """What the sections drive; None where no selected section needs it."""

    ceiling: Target | None = None
    demo: RunningBastion | None = None
    echo: Target | None = None
    baseline: Target | None = None
    litserve: Target | None = None
    digits_body: Path = Path()
    digits_labels: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- request bodies


def oip_request(image: list[float]) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": image}]}


def digits_bodies(work: Path) -> tuple[Path, list[int]]:
    """One OIP request per line, each a different held-out image; and their labels."""
    _, x_test, _, y_test = digits_split()
    lines = [json.dumps(oip_request(x.tolist())) for x in x_test[:DIGITS_BODIES]]
    path = work / "digits.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, [int(y) for y in y_test[:DIGITS_BODIES]]


def embedding_bodies(work: Path, model: str) -> Path:
    path = work / f"embeddings-{model}.jsonl"
    lines = [json.dumps({"model": model, "input": s}) for s in EMBED_SENTENCES]
    path.write_text("\n".join(lines) + "\n")
    return path


def lines_of(path: Path) -> list[bytes]:
    return [line.encode() for line in path.read_text().splitlines() if line]


# ---------------------------------------------------------------- servers


def without_batching(model: DemoModel, name: str) -> ModelSpec:
    """A second registration of a demo model's files with batching off."""
    (model.path / MARKER_FILE).unlink(missing_ok=True)  # the build's bookkeeping
    options = {**model.options, "batch.max_size": 1}
    return ModelSpec(name, model.runtime, model.path, tuple(f"{k}={v}" for k, v in options.items()))


def readable_by_workers(folder: Path, top: Path) -> None:
    """Let every user read `folder` (and pass through the folders from `top` to it): the
    sandboxed workers run as uids of their own when the gateway runs as root."""
    for path in (folder, *folder.rglob("*")):
        path.chmod(path.stat().st_mode | (0o005 if path.is_dir() else 0o004))
    for parent in folder.parents:
        parent.chmod(parent.stat().st_mode | 0o001)
        if parent == top:
            break


def start_servers(
    fleet: Fleet, work: Path, sections: set[str], baseline_src: Path | None
) -> Servers:
    """Every server the selected sections need."""
    s = Servers()
    s.digits_body, s.digits_labels = digits_bodies(work)
    digits_file, plain = None, work / "plain-models"
    extra: list[ModelSpec] = []
    if "a" in sections:
        digits = build_digits(plain)
        digits_file = digits.path / "model.onnx"
        extra.append(without_batching(digits, "digits-nobatch"))
    if "c" in sections:
        extra.append(without_batching(build_minilm(plain), "minilm-l6-nobatch"))
    if "d" in sections:
        extra.append(without_batching(build_tiny_chat(plain), "tiny-chat-serial"))
    if extra:
        readable_by_workers(plain, work)
    if sections & {"a", "b"}:
        s.ceiling = start_ceiling(fleet, work)
    if sections & {"a", "c", "d"}:
        print("starting Bastion with the demo models ...", flush=True)
        (work / "demo").mkdir()
        s.demo = start_bastion_home(
            fleet,
            work / "demo",
            models=tuple(extra),
            actions=("infer", "embeddings", "chat"),
            demo_models=True,
            name="bastion-demo",
            ready_timeout_s=600,
        )
    if sections & {"b", "f"}:
        s.echo = start_bastion(fleet, work / "echo", name="bastion-echo")
    if "f" in sections and baseline_src is not None:
        s.baseline = start_bastion(fleet, work / "baseline", name="baseline", source=baseline_src)
    if "a" in sections and digits_file is not None:
        s.litserve = start_litserve(
            fleet,
            work,
            script="litserve_digits.py",
            script_args=(str(digits_file),),
            body=s.digits_body,
            extras=onnxruntime_extra(),
            name="litserve-digits",
        )
    return s


def onnxruntime_extra() -> dict[str, str]:
    """onnxruntime for the LitServe venv: the version Bastion's venv has."""
    return {"onnxruntime": f"onnxruntime=={package_versions(('onnxruntime',))['onnxruntime']}"}


# ---------------------------------------------------------------- answer checks


def dig(answer: Any, *path: str | int) -> Any:
    """answer[path[0]][path[1]]..., or None where the answer has no such field."""
    for step in path:
        try:
            answer = answer[step]
        except (KeyError, IndexError, TypeError):
            return None
    return answer


def post_json(url: str, body: bytes, auth: str = "", xkey: str = "") -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    headers |= {"Authorization": auth} if auth else {}
    headers |= {"X-API-Key": xkey} if xkey else {}
    status, raw = http("POST", url, body, headers)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def refuses_without_key(server: Server, url: str, body: bytes, expected: int = 401) -> None:
    status, _ = post_json(url, body)
    if status != expected:
        fail(server, f"answered {status} to a request without an API key (expected {expected})")


def check_digits(t: Target, labels: list[int], checked: int = 20) -> None:
    """Labels among 0-9 and mostly right (a watermark may change a few)."""
    right = 0
    for body, label in zip(lines_of(t.body_file)[:checked], labels, strict=False):
        status, answer = post_json(t.url, body, t.auth, t.xkey)
        got = dig(answer, "outputs", 0, "data", 0)
        if status != 200 or got not in range(10):
            fail(t.server, f"gave a wrong digits answer (HTTP {status}): {str(answer)[:200]}")
        right += got == label
    if right < 0.9 * checked:
        fail(t.server, f"classified only {right} of {checked} test images right")


def check_answers(s: Servers, loads: list[Load], sections: set[str]) -> None:
    """Each server answers the benchmark's requests correctly before any load, and
    Bastion refuses a request without a key (401)."""
    for load in loads:
        t, first = load.target, lines_of(load.target.body_file)[0]
        if load.kind == "ceiling":
            if post_json(t.url, first)[0] != 200:
                fail(t.server, "does not answer")
            continue
        refuses_without_key(t.server, t.url, first)
        if load.kind == "digits":
            check_digits(t, s.digits_labels)
        elif load.kind == "echo":
            status, answer = post_json(t.url, first, t.auth)
            sent = json.loads(first)["inputs"][0]["data"]
            if status != 200 or dig(answer, "outputs", 0, "data") != sent:
                fail(t.server, f"did not echo the request (HTTP {status})")
        elif load.kind == "embeddings":
            status, answer = post_json(t.url, first, t.auth)
            if status != 200 or len(dig(answer, "data", 0, "embedding") or ()) != 384:
                fail(t.server, f"gave no 384-dimension embedding (HTTP {status})")
    if "d" in sections and s.demo is not None:
        check_chat(s.demo)


def chat_request(model: str, prompt: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": CHAT_TOKENS,
        "min_tokens": CHAT_TOKENS,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def check_chat(demo: RunningBastion) -> None:
    """Both chat registrations answer every prompt with CHAT_TOKENS tokens of text."""
    url, auth = f"{demo.base}/v1/chat/completions", f"Bearer {demo.key}"
    hello = json.dumps(chat_request("tiny-chat", "Hello", False)).encode()
    refuses_without_key(demo.server, url, hello)
    for model in ("tiny-chat", "tiny-chat-serial"):
        for prompt in CHAT_PROMPTS:
            status, answer = post_json(
                url, json.dumps(chat_request(model, prompt, False)).encode(), auth
            )
            if status != 200:
                fail(demo.server, f"{model} answered a chat with HTTP {status}")
            text = dig(answer, "choices", 0, "message", "content") or ""
            tokens = dig(answer, "usage", "completion_tokens") or 0
            if not text.strip() or tokens != CHAT_TOKENS:
                fail(
                    demo.server, f"{model} answered a chat with {tokens} tokens, not {CHAT_TOKENS}"
                )


# ---------------------------------------------------------------- the wrk matrix (a, b, c, f)


def plan_loads(s: Servers, sections: set[str], conns: list[int], work: Path) -> list[Load]:
    """The rows of the wrk matrix for the selected sections."""
    loads: list[Load] = []
    digits = s.digits_body
    ceiling_conns = sorted(
        set(conns if "a" in sections else []) | set(ECHO_CONNS if "b" in sections else [])
    )
    if s.ceiling is not None and ceiling_conns:
        # It gets the same bytes as Bastion, though it does not read them.
        loads.append(Load("ceiling", "ceiling", with_body(s.ceiling, digits), ceiling_conns))
    if s.demo is not None:
        demo = s.demo
        metrics = (f"{demo.base}/metrics", demo.admin_key)
        for model in ("digits", "digits-nobatch") if "a" in sections else ():
            url = f"{demo.base}/v2/models/{model}/infer"
            target = Target(model, url, digits, demo.server, auth=f"Bearer {demo.key}")
            loads.append(Load(model, "digits", target, conns, model, metrics))
        for model in ("minilm-l6", "minilm-l6-nobatch") if "c" in sections else ():
            url = f"{demo.base}/v1/embeddings"
            body = embedding_bodies(work, model)
            target = Target(model, url, body, demo.server, auth=f"Bearer {demo.key}")
            loads.append(Load(model, "embeddings", target, [16], model, metrics))
    if s.litserve is not None:
        loads.append(Load("litserve", "digits", s.litserve, conns))
    if s.echo is not None:
        echo_conns = ECHO_CONNS if "b" in sections else [16]
        loads.append(Load("echo", "echo", with_body(s.echo, digits), echo_conns))
    if s.baseline is not None:
        loads.append(Load("baseline echo", "echo", with_body(s.baseline, digits), [16]))
    return loads


def with_body(target: Target, body: Path) -> Target:
    return Target(target.name, target.url, body, target.server, target.auth, target.xkey)


def batch_totals(load: Load) -> tuple[float, float] | None:
    """The sum and count of `bastion_batch_size` for the row's model, from /metrics."""
    if load.metrics is None:
        return None
    url, admin = load.metrics
    status, raw = http("GET", url, headers={"Authorization": f"Bearer {admin}"})
    if status != 200:
        return None
    totals = {"sum": 0.0, "count": 0.0}
    pattern = re.compile(r"^bastion_batch_size_(sum|count)\{([^}]*)\} (\S+)$", re.MULTILINE)
    for kind, labels, value in pattern.findall(raw.decode()):
        if f'model="{load.model}"' in labels:
            totals[kind] += float(value)
    return totals["sum"], totals["count"]


def measure_load(load: Load, conns: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement after its warm-up; with the mean batch size it ran at."""
    if args.warmup > 0:
        run_wrk(load.target, conns, args.warmup)
    before = batch_totals(load)
    row = measure(load.target, conns, args.dur, 0)
    after = batch_totals(load)
    if before is not None and after is not None and after[1] > before[1]:
        row["mean_batch"] = (after[0] - before[0]) / (after[1] - before[1])
    return row


def run_matrix(loads: list[Load], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row at each of its concurrencies, each repetition; the rows measured at a
    concurrency take turns going first."""
    conns = sorted({c for load in loads for c in load.conns})
    rows = []
    for rep in range(args.reps):
        for i, c in enumerate(conns):
            group = [load for load in loads if c in load.conns]
            shift = (rep * len(conns) + i) % len(group)
            for load in group[shift:] + group[:shift]:
                row = measure_load(load, c, args)
                row.update(target=load.name, conns=c, rep=rep)
                rows.append(row)
                batch = f" batch {row['mean_batch']:5.1f}" if "mean_batch" in row else ""
                print(
                    f"rep {rep} c={c:<3} {load.name:18s} {row['rps']:8,.0f} req/s "
                    f"p50 {row['p50_ms']:6.2f} ms p99 {row['p99_ms']:7.2f} ms "
                    f"CPU {row['cpu_us_per_req']:6.0f} µs/req (main process "
                    f"{row['main_cpu_us_per_req']:4.0f}){batch} errors "
                    f"{row['non2xx'] + row['socket_errors']}",
                    flush=True,
                )
    return rows


# ---------------------------------------------------------------- chat streams (d)


async def chat_stream(
    client: httpx.AsyncClient, auth: str, model: str, prompt: str
) -> dict[str, Any]:
    """One streamed chat completion: time to the first content, tokens, duration."""
    started = time.perf_counter()
    first: float | None = None
    chunks, usage = 0, None
    body = chat_request(model, prompt, stream=True)
    headers = {"Authorization": auth}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise BenchmarkError(f"{model}: a streamed chat got HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            usage = event.get("usage") or usage
            choices = event.get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                chunks += 1
                first = time.perf_counter() if first is None else first
    ended = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    ttft = (first if first is not None else ended) - started
    return {"ttft_s": ttft, "tokens": tokens, "chunks": chunks, "s": ended - started}


def prompt_of(i: int) -> str:
    return CHAT_PROMPTS[i % len(CHAT_PROMPTS)]


async def chat_rounds(
    demo: RunningBastion, plans: list[ChatPlan], rounds: int
) -> list[dict[str, Any]]:
    """A warm-up round of each plan, then `rounds` of each, the plans taking turns."""
    auth = f"Bearer {demo.key}"
    limits = httpx.Limits(max_connections=4 * CHAT_STREAMS)
    out = []
    async with httpx.AsyncClient(base_url=demo.base, timeout=120, limits=limits) as client:
        for number in range(-1, rounds):
            shift = max(number, 0) % len(plans)
            for plan in plans[shift:] + plans[:shift]:
                started = time.perf_counter()
                streams = await asyncio.gather(
                    *(
                        chat_stream(client, auth, plan.model, prompt_of(i))
                        for i in range(plan.streams)
                    )
                )
                wall = time.perf_counter() - started
                if number < 0:
                    continue  # the warm-up
                tokens = sum(st["tokens"] for st in streams)
                out.append(
                    {
                        "plan": plan.name,
                        "round": number,
                        "wall_s": wall,
                        "tokens": tokens,
                        "tok_s": tokens / wall,
                        "streams": streams,
                    }
                )
    return out


def run_chat(s: Servers, args: argparse.Namespace) -> list[dict[str, Any]]:
    assert s.demo is not None
    plans = [
        ChatPlan("alone", "tiny-chat", 1),
        ChatPlan("together", "tiny-chat", CHAT_STREAMS),
        ChatPlan("together, batching off", "tiny-chat-serial", CHAT_STREAMS),
    ]
    print(
        f"chat: {args.chat_rounds} rounds of {[p.name for p in plans]}, "
        f"{CHAT_TOKENS} tokens per stream (min_tokens), temperature 0",
        flush=True,
    )
    rounds = asyncio.run(chat_rounds(s.demo, plans, args.chat_rounds))
    for name, m in chat_summary(rounds).items():
        print(f"  {name:24s} {m['tok_s']:7,.0f} tokens/s, TTFT p50 {m['ttft_p50_ms']:6.1f} ms "
              f"p99 {m['ttft_p99_ms']:6.1f} ms", flush=True)  # fmt: skip
    return rounds


# ---------------------------------------------------------------- child benchmarks (e, g)


def run_child(fleet: Fleet, script: str, options: list[str], timeout_s: float) -> str:
    """Run another benchmark of this folder to its end, its output shown as it comes; its
    servers are stopped with it should this run stop first. Returns its output."""
    command = [sys.executable, str(HERE / script), *options]
    print(f"running {' '.join([script, *options])} ...", flush=True)
    child = fleet.start(script, command, os.environ)
    deadline, shown = time.monotonic() + timeout_s, 0
    while True:
        child.tree()  # remember its servers, to stop any it leaves behind
        done = child.process.poll() is not None
        text = child.log.read_text(errors="replace")
        complete = text if done else text[: text.rfind("\n") + 1]
        for line in complete[shown:].splitlines():
            print(f"  | {line}", flush=True)
        shown = len(complete)
        if done:
            break
        if time.monotonic() > deadline:
            fail(child, f"did not finish within {timeout_s:.0f} s")
        time.sleep(0.5)
    fleet.stop(child)
    if child.process.returncode != 0:
        fail(child, f"exited with code {child.process.returncode}")
    return text


def run_ohttp(fleet: Fleet, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / "ohttp-results"
    options = ["--conns", "16", "--reps", str(args.reps), "--dur", str(args.dur)]
    options += ["--warmup", str(args.warmup), "--micro-iterations", str(args.ohttp_micro)]
    planned = 3 * args.reps * (args.dur + args.warmup)  # plaintext, classical, hybrid
    run_child(fleet, "ohttp.py", [*options, "--out", str(out)], 300 + 3 * planned)
    found = sorted(out.glob("ohttp-*.json"))
    if not found:
        raise BenchmarkError(f"ohttp.py wrote no results into {out}")
    result: dict[str, Any] = json.loads(found[-1].read_text())
    return {"medians": result["medians"], "report": result["report"], "args": result["args"]}


def run_noisy(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    options = ["--dur", str(args.noisy_dur)]
    text = run_child(fleet, "noisy_neighbour.py", options, 300 + 6 * args.noisy_dur)
    found = re.search(r"B's p99 under A's flood / baseline p99 = ([\d.]+).*: (PASS|FAIL)", text)
    if found is None:
        raise BenchmarkError(f"noisy_neighbour.py printed no ratio:\n{text[-2000:]}")
    return {
        "table": [line for line in text.splitlines() if line.startswith("|")],
        "ratio": float(found.group(1)),
        "own_verdict": found.group(2),
        "context": [line for line in text.splitlines() if "unquota'd" in line],
    }


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="sections to run, comma-separated (default: all): "
        + "; ".join(f"{k} = {v}" for k, v in SECTIONS.items()),
    )
    parser.add_argument("--reps", type=int, default=2, help="repetitions (medians over them)")
    parser.add_argument("--dur", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each")
    parser.add_argument("--conns", default="1,16,64", help="section a's concurrencies")
    parser.add_argument("--chat-rounds", type=int, default=10, help="section d's rounds")
    parser.add_argument("--noisy-dur", type=int, default=8, help="section g's seconds per phase")
    parser.add_argument("--ohttp-micro", type=int, default=200, help="ohttp.py's micro-iterations")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for JSON")
    parser.add_argument("--baseline-ref", help="section f: also measure this git commit's gateway")
    args = parser.parse_args()
    args.sections = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = args.sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.conns = sorted({int(c) for c in args.conns.split(",")} | {16})
    return args


def planned_seconds(args: argparse.Namespace) -> int:
    """A rough length of the run, servers' start-up included."""
    per = args.reps * (args.dur + args.warmup)
    rows = {"a": 4 * len(args.conns), "b": 2, "c": 2, "f": 1 if args.baseline_ref else 0}
    total = per * sum(n for x, n in rows.items() if x in args.sections)
    total += 60 if args.sections & {"a", "c", "d"} else 0  # the demo models load
    total += 3 * args.chat_rounds + 10 if "d" in args.sections else 0
    total += 2 * per + 40 if "e" in args.sections else 0
    total += 2 * (args.noisy_dur + 10) + args.noisy_dur + 15 if "g" in args.sections else 0
    return int(total)


def versions() -> dict[str, str]:
    return package_versions(
        ("bastion", "uvicorn", "starlette", "uvloop", "httptools", "onnxruntime", "torch"),
        litserve=LITSERVE_VERSION,
    )


def main() -> int:
    args = parse_args()
    if wrk_missing():
        return 2
    # Stop the servers on SIGTERM as on Ctrl-C, also when started with SIGINT ignored.
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, raise_interrupt)
    sections = args.sections
    if "a" in sections:
        litserve_python(onnxruntime_extra())  # create the venv (first use) before any server
    load_at_start = os.getloadavg()
    print(
        f"sections {','.join(sorted(sections))}; about {planned_seconds(args) / 60:.0f} min: "
        f"{args.reps} reps of {args.warmup} s warm-up + {args.dur} s per wrk row; "
        f"1-min load average {load_at_start[0]:.2f}",
        flush=True,
    )
    results = Results(sections=sorted(sections), baseline_ref=args.baseline_ref)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bastion-serving-")))
        baseline_src = None
        if args.baseline_ref and "f" in sections:
            baseline_src = stack.enter_context(baseline_checkout(args.baseline_ref, tmp))
        fleet = stack.enter_context(Fleet(tmp))
        try:
            servers = start_servers(fleet, tmp, sections, baseline_src)
            loads = plan_loads(servers, sections, args.conns, tmp)
            check_answers(servers, loads, sections)
            if loads or "d" in sections:
                print("the servers answer correctly; Bastion refuses a request without a key")
            if loads:
                results.rows = run_matrix(loads, args)
            if "d" in sections:
                results.chat = run_chat(servers, args)
            fleet.stop_all()  # the children start servers of their own
            if "e" in sections:
                results.ohttp = run_ohttp(fleet, tmp, args)
            if "g" in sections:
                results.noisy = run_noisy(fleet, args)
        except BenchmarkError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
    load_at_end = os.getloadavg()
    results.machine = {
        "cpus": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": load_at_end,
    }
    lines = report(results, args)
    print("\n" + "\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serving-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw = {
        "args": {
            k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
        },
        "versions": versions(),
        **results.as_json(),
        "report": lines,
    }
    path.write_text(json.dumps(raw, indent=1))
    print(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
