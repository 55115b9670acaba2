"""The OHTTP benchmark's figures: in-process encapsulation costs, medians, the table, the checks.

Every ratio compares paths at the same concurrency in the same run (OHTTP to plaintext, the
post-quantum hybrid to classical X25519), so it holds on a noisy machine; the
micro-benchmarks time the cryptographic steps alone, without HTTP.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bastion.crypto import hpke, ohttp
from bastion.wire import bhttp

Medians = dict[tuple[str, int], dict[str, float]]

# The load paths: plaintext, and one OHTTP path per KEM, each encrypting to the server's
# published key configuration of that KEM (HKDF-SHA256, AES-128-GCM).
PLAINTEXT = "plaintext"
CLASSICAL = "ohttp"
HYBRID = "ohttp-pq"
OHTTP_KEMS = {CLASSICAL: hpke.KEM_X25519_SHA256, HYBRID: hpke.KEM_MLKEM768_X25519}
PATHS = (PLAINTEXT, CLASSICAL, HYBRID)

# The targets.
MIN_OHTTP_SHARE_C16 = 0.70  # classical OHTTP to plaintext
MIN_HYBRID_SHARE_C16 = 0.90  # hybrid OHTTP to classical OHTTP

# The micro-benchmarks' suites, by KEM name: the AEAD is the one the load uses.
SUITES = {
    hpke.kem_name(kem_id): hpke.Suite(kem_id, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM)
    for kem_id in OHTTP_KEMS.values()
}
CLASSICAL_SUITE, HYBRID_SUITE = (hpke.kem_name(kem_id) for kem_id in OHTTP_KEMS.values())
CLIENT_STEPS = ("bhttp_encode", "encapsulate", "open", "bhttp_decode")
SERVER_STEPS = ("decapsulate", "bhttp_decode_request", "bhttp_encode_response", "seal")
# The HPKE part of each side: what the KEM changes.
CLIENT_HPKE_STEPS = ("encapsulate", "open")
SERVER_HPKE_STEPS = ("decapsulate", "seal")
# One server-sent event of a streamed chat completion: what each chunk carries.
SSE_EVENT = (
    b'data: {"id":"chatcmpl-5f0c9a8e2b7d4e1f","object":"chat.completion.chunk",'
    b'"created":1795770000,"model":"echo","choices":[{"index":0,"delta":{"content":" word"},'
    b'"finish_reason":null}]}\n\n'
)


def kem_label(kem_id: int) -> str:
    """The KEM's name and kind, e.g. "mlkem768-x25519 (post-quantum hybrid)"."""
    if kem_id == hpke.KEM_MLKEM768_X25519:
        kind = "post-quantum hybrid"
    else:
        kind = "post-quantum" if hpke.is_post_quantum(kem_id) else "classical"
    return f"{hpke.kem_name(kem_id)} ({kind})"


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


def _config_and_keys(suite: hpke.Suite) -> tuple[ohttp.KeyConfig, dict[int, ohttp.GatewayKey]]:
    key = ohttp.GatewayKey.generate(1, kem_id=suite.kem_id)
    return key.config(), {1: key}


def request_steps(suite: hpke.Suite, request: bhttp.Request, answer: bhttp.Response) -> Step:
    """One exchange per iteration: client and server steps, in the order they happen."""
    config, keys = _config_and_keys(suite)

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


def chunk_steps(suite: hpke.Suite, request: bhttp.Request) -> Step:
    """Per streamed chunk: the worker seals one event, the client opens and decodes it."""
    config, keys = _config_and_keys(suite)
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
    """What the HPKE setups of each KEM cost, against the native operations inside them."""
    setups = []
    for name, suite in SUITES.items():
        config, keys = _config_and_keys(suite)
        enc, _ = hpke.setup_sender(suite, config.public_key, b"info")
        setups.append((name, suite, config.public_key, keys[1].private_key, enc))
    peer = X25519PrivateKey.generate().public_key()
    mlkem = MLKEM768PrivateKey.generate()
    mlkem_public = mlkem.public_key().public_bytes_raw()
    _, ciphertext = mlkem.public_key().encapsulate()

    def one(spent: dict[str, int]) -> None:
        t = time.perf_counter_ns()
        for name, suite, public_key, private_key, enc in setups:
            hpke.setup_sender(suite, public_key, b"info")
            t = _timed(spent, f"hpke_setup_sender/{name}", t)
            hpke.setup_recipient(suite, private_key, enc, b"info")
            t = _timed(spent, f"hpke_setup_recipient/{name}", t)
        secret = X25519PrivateKey.generate()
        t = _timed(spent, "x25519_generate", t)
        secret.exchange(peer)
        t = _timed(spent, "x25519_exchange", t)
        # As the sender does it: load the published key (with its check), then encapsulate.
        MLKEM768PublicKey.from_public_bytes(mlkem_public).encapsulate()
        t = _timed(spent, "mlkem768_encapsulate", t)
        mlkem.decapsulate(ciphertext)
        _timed(spent, "mlkem768_decapsulate", t)

    return one


def sizes(suite: hpke.Suite, request: bhttp.Request) -> dict[str, int]:
    """Bytes on the wire that the KEM changes: the encapsulated request and the key config."""
    config, _ = _config_and_keys(suite)
    data, _ = ohttp.encapsulate_request(config, bhttp.encode_request(request), suite=suite)
    return {
        "encapsulated_request_bytes": len(data),
        "enc_bytes": hpke.enc_size(suite.kem_id),
        "key_config_bytes": len(config.encode()),
        "public_key_bytes": len(config.public_key),
    }


def encapsulation_costs(
    request: bhttp.Request, answer: bhttp.Response, iterations: int, batches: int = 7
) -> dict[str, Any]:
    """µs per request (and per streamed chunk) of each OHTTP step, and the sizes, for the
    classical and the hybrid suite."""
    benchmarks: dict[str, tuple[Step, int]] = {"primitives": (primitive_steps(), iterations)}
    for name, suite in SUITES.items():
        benchmarks[f"{name}/request"] = (request_steps(suite, request, answer), iterations)
        # A chunk costs a few µs: more of them per batch for the same timer resolution.
        benchmarks[f"{name}/chunk"] = (chunk_steps(suite, request), 5 * iterations)
    costs = _median_of_batches(benchmarks, batches)
    suites = {}
    for name, suite in SUITES.items():
        per_request = costs[f"{name}/request"]
        per_request["client_total"] = sum(per_request[s] for s in CLIENT_STEPS)
        per_request["server_total"] = sum(per_request[s] for s in SERVER_STEPS)
        per_request["client_hpke"] = sum(per_request[s] for s in CLIENT_HPKE_STEPS)
        per_request["server_hpke"] = sum(per_request[s] for s in SERVER_HPKE_STEPS)
        suites[name] = {
            "suite": str(suite),
            "request": per_request,
            "chunk": costs[f"{name}/chunk"],
            "sizes": sizes(suite, request),
        }
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
        f"In-process µs per request, HKDF-SHA256 + AES-128-GCM ({micro['request_bytes']} B "
        f"request content, {micro['answer_bytes']} B answer content; median of "
        f"{micro['batches']} batches of {micro['iterations']}):",
        "",
        "| KEM | client: encode + encapsulate + open + decode = total "
        "| server: decapsulate + decode + encode + seal = total "
        "| HPKE alone: client (encapsulate + open) / server (decapsulate + seal) "
        "| encapsulated request B (enc) | key configuration B |",
        "|---|---|---|---|---|---|",
    ]
    suites = micro["suites"]
    for name, costs in suites.items():
        r, b = costs["request"], costs["sizes"]
        client = " + ".join(f"{r[s]:.1f}" for s in CLIENT_STEPS)
        server = " + ".join(f"{r[s]:.1f}" for s in SERVER_STEPS)
        lines.append(
            f"| {kem_label(hpke.KEM_NAMES[name])} | {client} = **{r['client_total']:.0f}** "
            f"| {server} = **{r['server_total']:.0f}** "
            f"| {r['client_hpke']:.0f} / {r['server_hpke']:.0f} "
            f"| {b['encapsulated_request_bytes']:,} ({b['enc_bytes']:,}) "
            f"| {b['key_config_bytes']:,} |"
        )
    c, h = suites[CLASSICAL_SUITE], suites[HYBRID_SUITE]
    cr, hr, cb, hb = c["request"], h["request"], c["sizes"], h["sizes"]

    def x(field: str, hybrid: dict[str, Any], classical: dict[str, Any]) -> str:
        return f"{hybrid[field] / classical[field]:.2f}x"

    lines.append(
        f"| hybrid / classical | total {x('client_total', hr, cr)} "
        f"| total {x('server_total', hr, cr)} "
        f"| {x('client_hpke', hr, cr)} / {x('server_hpke', hr, cr)} "
        f"| {x('encapsulated_request_bytes', hb, cb)} ({x('enc_bytes', hb, cb)}) "
        f"| {x('key_config_bytes', hb, cb)} |"
    )
    chunks = ", ".join(
        f"{name} {costs['chunk']['seal_chunk']:.1f} / {costs['chunk']['open_chunk']:.1f}"
        for name, costs in suites.items()
    )
    p = micro["primitives"]
    setups = "; ".join(
        f"{name} sender {p[f'hpke_setup_sender/{name}']:.0f} µs, "
        f"recipient {p[f'hpke_setup_recipient/{name}']:.0f} µs"
        for name in suites
    )
    lines += [
        "",
        f"Per streamed chunk ({micro['chunk_bytes']} B), the worker's seal / the client's open, "
        f"µs: {chunks}",
        f"HPKE setup: {setups}; the native work inside (pyca): X25519 key generation "
        f"{p['x25519_generate']:.0f} µs, one exchange {p['x25519_exchange']:.0f} µs; "
        f"ML-KEM-768 load + encapsulate {p['mlkem768_encapsulate']:.0f} µs, "
        f"decapsulate {p['mlkem768_decapsulate']:.0f} µs",
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


def share_at_c16(med: Medians, path: str, base: str, minimum: float, target: str) -> str:
    """The verdict on `path`'s throughput at c=16 as a share of `base`'s, from this run."""
    got, against = med.get((path, 16)), med.get((base, 16))
    if not (got and against):
        return f"----  {target}: not measured (c=16 is not among --conns)"
    share = got["rps"] / against["rps"]
    return verdict(
        share >= minimum,
        f"{target}: {share:.1%} ({got['rps']:,.0f} vs {against['rps']:,.0f} req/s)",
    )


def report(conns: list[int], med: Medians) -> list[str]:
    """One line per OHTTP path and concurrency, each against plaintext measured beside it."""
    lines = [
        "| c | OHTTP KEM | plaintext req/s | OHTTP req/s | OHTTP / plaintext "
        "| hybrid / classical | p50 ms plain / OHTTP | p99 ms plain / OHTTP "
        "| server CPU µs/req plain / OHTTP | non-2xx plain / OHTTP |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conns:
        p, classical = med[(PLAINTEXT, c)], med[(CLASSICAL, c)]
        for path, kem_id in OHTTP_KEMS.items():
            o = med[(path, c)]
            versus = f"{o['rps'] / classical['rps']:.1%}" if path != CLASSICAL else "—"
            lines.append(
                f"| {c} | {kem_label(kem_id)} | {p['rps']:,.0f} | {o['rps']:,.0f} "
                f"| {o['rps'] / p['rps']:.1%} | {versus} "
                f"| {p['p50_ms']:.2f} / {o['p50_ms']:.2f} "
                f"| {p['p99_ms']:.2f} / {o['p99_ms']:.2f} "
                f"| {p['cpu_us_per_req']:.0f} / {o['cpu_us_per_req']:.0f} "
                f"| {p['non2xx']:.0f} / {o['non2xx']:.0f} |"
            )
    split = []
    for c in conns:
        for path in PATHS:
            m = med[(path, c)]
            worker = m["cpu_us_per_req"] - m["main_cpu_us_per_req"]
            split.append(f"c={c} {path} {m['main_cpu_us_per_req']:.0f} + {worker:.0f}")
    lines += ["", "Server CPU µs/req, gateway + worker: " + ", ".join(split), ""]
    lines.append(
        share_at_c16(
            med,
            CLASSICAL,
            PLAINTEXT,
            MIN_OHTTP_SHARE_C16,
            f"OHTTP (x25519) at c=16 >= {MIN_OHTTP_SHARE_C16:.0%} of plaintext throughput",
        )
    )
    lines.append(
        share_at_c16(
            med,
            HYBRID,
            CLASSICAL,
            MIN_HYBRID_SHARE_C16,
            f"hybrid ≥ {MIN_HYBRID_SHARE_C16:.0%} of classical throughput at c=16",
        )
    )
    errors = sum(m["non2xx"] + m["socket_errors"] for m in med.values())
    lines.append(verdict(errors == 0, f"every measured request answered 2xx: {errors:.0f} errors"))
    return lines
