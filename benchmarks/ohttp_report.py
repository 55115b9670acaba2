"""The OHTTP benchmark's figures: in-process encapsulation costs, medians, the table, the check.

Every ratio is OHTTP to plaintext at the same concurrency in the same run, so it holds on a
noisy machine; the micro-benchmarks time the cryptographic steps alone, without HTTP.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bastion.crypto import hpke, ohttp
from bastion.wire import bhttp

Medians = dict[tuple[str, int], dict[str, float]]

# The target.
MIN_OHTTP_SHARE_C16 = 0.70

SUITES = {
    "AES-128-GCM": hpke.AEAD_AES_128_GCM,
    "ChaCha20-Poly1305": hpke.AEAD_CHACHA20_POLY1305,
}
CLIENT_STEPS = ("bhttp_encode", "encapsulate", "open", "bhttp_decode")
SERVER_STEPS = ("decapsulate", "bhttp_decode_request", "bhttp_encode_response", "seal")
# One server-sent event of a streamed chat completion: what each chunk carries.
SSE_EVENT = (
    b'data: {"id":"chatcmpl-5f0c9a8e2b7d4e1f","object":"chat.completion.chunk",'
    b'"created":1795770000,"model":"echo","choices":[{"index":0,"delta":{"content":" word"},'
    b'"finish_reason":null}]}\n\n'
)


# ---------------------------------------------------------------- micro-benchmarks

# One iteration of a micro-benchmark: it adds the nanoseconds of each of its steps.
Step = Callable[[dict[str, int]], None]


def _timed(spent: dict[str, int], step: str, start: int) -> int:
    now = time.perf_counter_ns()
    spent[step] = spent.get(step, 0) + now - start
    return now


def _median_of_batches(
    benchmarks: dict[str, tuple[Step, int]], batches: int
) -> dict[str, dict[str, float]]:
    """µs per iteration of each step, the median over the batches. The benchmarks take
    turns batch by batch, so that a noisy neighbour slows them alike."""
    per_batch: dict[str, list[dict[str, float]]] = {name: [] for name in benchmarks}
    for _ in range(batches):
        for name, (one, iterations) in benchmarks.items():
            spent: dict[str, int] = {}
            for _ in range(iterations):
                one(spent)
            per_batch[name].append({k: v / iterations / 1000 for k, v in spent.items()})
    return {
        name: {k: statistics.median(b[k] for b in runs) for k in runs[0]}
        for name, runs in per_batch.items()
    }


def _suite_and_keys(
    aead_id: int,
) -> tuple[hpke.Suite, ohttp.KeyConfig, dict[int, ohttp.GatewayKey]]:
    key = ohttp.GatewayKey.generate(1)
    config = key.config()
    return hpke.Suite(config.kem_id, hpke.KDF_HKDF_SHA256, aead_id), config, {1: key}


def request_steps(aead_id: int, request: bhttp.Request, answer: bhttp.Response) -> Step:
    """One exchange per iteration: client and server steps, in the order they happen."""
    suite, config, keys = _suite_and_keys(aead_id)

    def one(spent: dict[str, int]) -> None:
        t = time.perf_counter_ns()
        message = bhttp.encode_request(request)
        t = _timed(spent, "bhttp_encode", t)
        data, client = ohttp.encapsulate_request(config, message, suite=suite)
        t = _timed(spent, "encapsulate", t)
        plaintext, server = ohttp.decapsulate_request(keys, data)
        t = _timed(spent, "decapsulate", t)
        bhttp.decode_request(plaintext)
        t = _timed(spent, "bhttp_decode_request", t)
        encoded = bhttp.encode_response(answer)
        t = _timed(spent, "bhttp_encode_response", t)
        sealed = server.seal(encoded)
        t = _timed(spent, "seal", t)
        opened = client.open(sealed)
        t = _timed(spent, "open", t)
        bhttp.decode_response(opened)
        _timed(spent, "bhttp_decode", t)

    return one


def chunk_steps(aead_id: int, request: bhttp.Request) -> Step:
    """Per streamed chunk: the worker seals one event, the client opens and decodes it."""
    suite, config, keys = _suite_and_keys(aead_id)
    message = bhttp.encode_request(request, indeterminate=True)
    data, client = ohttp.encapsulate_chunked_request(config, [message], suite=suite)
    _, server = ohttp.decapsulate_chunked_request(keys, data)
    encoder, decoder, opener = bhttp.ResponseEncoder(), bhttp.ResponseDecoder(), client.opener()
    head = encoder.head(200, (("content-type", "text/event-stream"),))
    for plaintext in opener.feed(server.start() + server.seal_chunk(head)):
        decoder.feed(plaintext)

    def one(spent: dict[str, int]) -> None:
        t = time.perf_counter_ns()
        sealed = server.seal_chunk(encoder.body(SSE_EVENT))
        t = _timed(spent, "seal_chunk", t)
        for plaintext in opener.feed(sealed):
            decoder.feed(plaintext)
        _timed(spent, "open_chunk", t)

    return one


def primitive_steps() -> Step:
    """What the HPKE setups cost, against the X25519 operations they cannot avoid."""
    suite, config, keys = _suite_and_keys(hpke.AEAD_AES_128_GCM)
    enc, _ = hpke.setup_sender(suite, config.public_key, b"info")
    peer = X25519PrivateKey.generate().public_key()

    def one(spent: dict[str, int]) -> None:
        t = time.perf_counter_ns()
        hpke.setup_sender(suite, config.public_key, b"info")
        t = _timed(spent, "hpke_setup_sender", t)
        hpke.setup_recipient(suite, keys[1].private_key, enc, b"info")
        t = _timed(spent, "hpke_setup_recipient", t)
        secret = X25519PrivateKey.generate()
        t = _timed(spent, "x25519_generate", t)
        secret.exchange(peer)
        _timed(spent, "x25519_exchange", t)

    return one


def encapsulation_costs(
    request: bhttp.Request, answer: bhttp.Response, iterations: int, batches: int = 7
) -> dict[str, Any]:
    """µs per request (and per streamed chunk) of each OHTTP step, for both AEADs."""
    benchmarks: dict[str, tuple[Step, int]] = {"primitives": (primitive_steps(), iterations)}
    for name, aead_id in SUITES.items():
        benchmarks[f"{name}/request"] = (request_steps(aead_id, request, answer), iterations)
        # A chunk costs a few µs: more of them per batch for the same timer resolution.
        benchmarks[f"{name}/chunk"] = (chunk_steps(aead_id, request), 5 * iterations)
    costs = _median_of_batches(benchmarks, batches)
    suites = {}
    for name in SUITES:
        per_request = costs[f"{name}/request"]
        per_request["client_total"] = sum(per_request[s] for s in CLIENT_STEPS)
        per_request["server_total"] = sum(per_request[s] for s in SERVER_STEPS)
        suites[name] = {"request": per_request, "chunk": costs[f"{name}/chunk"]}
    return {
        "request_bytes": len(request.content),
        "answer_bytes": len(answer.content),
        "chunk_bytes": len(SSE_EVENT),
        "iterations": iterations,
        "batches": batches,
        "suites": suites,
        "primitives": costs["primitives"],
    }


def micro_table(micro: dict[str, Any]) -> list[str]:
    lines = [
        f"In-process µs per request ({micro['request_bytes']} B request content, "
        f"{micro['answer_bytes']} B answer content; median of {micro['batches']} batches "
        f"of {micro['iterations']}):",
        "",
        "| AEAD | client: encode + encapsulate + open + decode = total "
        "| server: decapsulate + decode + encode + seal = total "
        f"| per streamed chunk ({micro['chunk_bytes']} B): seal / open |",
        "|---|---|---|---|",
    ]
    for name, costs in micro["suites"].items():
        r, c = costs["request"], costs["chunk"]
        client = " + ".join(f"{r[s]:.1f}" for s in CLIENT_STEPS)
        server = " + ".join(f"{r[s]:.1f}" for s in SERVER_STEPS)
        lines.append(
            f"| {name} | {client} = **{r['client_total']:.0f}** "
            f"| {server} = **{r['server_total']:.0f}** "
            f"| {c['seal_chunk']:.1f} / {c['open_chunk']:.1f} |"
        )
    p = micro["primitives"]
    lines += [
        "",
        f"HPKE setup (pyhpke): sender {p['hpke_setup_sender']:.0f} µs, recipient "
        f"{p['hpke_setup_recipient']:.0f} µs; the X25519 work inside (pyca): key generation "
        f"{p['x25519_generate']:.0f} µs, one exchange {p['x25519_exchange']:.0f} µs",
    ]
    return lines


# ---------------------------------------------------------------- load figures


def medians(rows: list[dict[str, Any]]) -> Medians:
    out = {}
    for key in sorted({(r["path"], r["conns"]) for r in rows}):
        group = [r for r in rows if (r["path"], r["conns"]) == key]
        out[key] = {
            field: statistics.median(r[field] for r in group)
            for field in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "main_cpu_us_per_req")
        }
        out[key]["non2xx"] = sum(r["non2xx"] for r in group)
        out[key]["socket_errors"] = sum(r["socket_errors"] for r in group)
    return out


def verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text}"


def report(conns: list[int], med: Medians) -> list[str]:
    lines = [
        "| c | plaintext req/s | OHTTP req/s | OHTTP / plaintext | p50 ms plain / OHTTP "
        "| p99 ms plain / OHTTP | server CPU µs/req plain / OHTTP | non-2xx plain / OHTTP |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conns:
        p, o = med[("plaintext", c)], med[("ohttp", c)]
        lines.append(
            f"| {c} | {p['rps']:,.0f} | {o['rps']:,.0f} | {o['rps'] / p['rps']:.1%} "
            f"| {p['p50_ms']:.2f} / {o['p50_ms']:.2f} | {p['p99_ms']:.2f} / {o['p99_ms']:.2f} "
            f"| {p['cpu_us_per_req']:.0f} / {o['cpu_us_per_req']:.0f} "
            f"| {p['non2xx']:.0f} / {o['non2xx']:.0f} |"
        )
    split = []
    for c in conns:
        for path in ("plaintext", "ohttp"):
            m = med[(path, c)]
            worker = m["cpu_us_per_req"] - m["main_cpu_us_per_req"]
            split.append(f"c={c} {path} {m['main_cpu_us_per_req']:.0f} + {worker:.0f}")
    lines += ["", "Server CPU µs/req, gateway + worker: " + ", ".join(split), ""]
    p16, o16 = med.get(("plaintext", 16)), med.get(("ohttp", 16))
    if p16 and o16:
        share = o16["rps"] / p16["rps"]
        lines.append(
            verdict(
                share >= MIN_OHTTP_SHARE_C16,
                f"OHTTP at c=16 >= {MIN_OHTTP_SHARE_C16:.0%} of plaintext throughput: "
                f"{share:.1%} ({o16['rps']:,.0f} vs {p16['rps']:,.0f} req/s)",
            )
        )
    errors = sum(m["non2xx"] + m["socket_errors"] for m in med.values())
    lines.append(verdict(errors == 0, f"every measured request answered 2xx: {errors:.0f} errors"))
    return lines
