#!/usr/bin/env python3
"""Streaming AEAD throughput: decrypt(+SHA-256) of a model file, beside its ceilings and Tink.

Everything runs on one core, in memory, on the same random plaintext (256 MiB by default):

    alloc+copy         bytearray(plaintext): a fresh buffer's page faults plus one copy
    copy (reused)      a copy into a buffer already faulted in
    sha256             hashlib.sha256 over the plaintext (the manifest check alone)
    aes-gcm raw        AESGCM.decrypt_into over 1 MiB segments (the cipher alone)
    ours decrypt       decrypt_to_bytearray
    ours decrypt+sha   decrypt_to_bytearray(digest=sha256()), what the model loader does
    ours into reused   decrypt_into(digest=sha256()) into a buffer already faulted in
    ours encrypt       encrypt_file
    tink decrypt       Tink's StreamingAead (AES256_GCM_HKDF_1MB, same key), read() to the end

Each row is the best of --reps runs (best, not mean: the machine is shared and noise only
ever slows a run down). MB/s is 10^6 plaintext bytes per second; the target is decrypt+sha
>= 1000 MB/s per core.

Usage: .venv/bin/python benchmarks/streaming_aead.py [--mib 256] [--reps 3] [--no-tink]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.crypto.streaming_aead import (
    SEGMENT_SIZE,
    TAG_SIZE,
    decrypt_into,
    decrypt_to_bytearray,
    encrypt_file,
)

KEY = os.urandom(32)
AD = b"bench/model.safetensors"


def best_seconds(run: Callable[[], object], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def raw_gcm(ciphertexts: list[bytes], out: bytearray) -> None:
    aead = AESGCM(KEY)
    view = memoryview(out)
    nonce = bytes(12)
    position = 0
    for sealed in ciphertexts:
        length = len(sealed) - TAG_SIZE
        aead.decrypt_into(nonce, sealed, None, view[position : position + length])
        position += length


def tink_decrypt(ciphertext: bytes, size: int) -> Callable[[], object]:
    from tink import cleartext_keyset_handle, streaming_aead  # type: ignore[import-untyped]
    from tink.proto import (  # type: ignore[import-untyped]
        aes_gcm_hkdf_streaming_pb2,
        common_pb2,
        tink_pb2,
    )

    streaming_aead.register()
    key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(version=0, key_value=KEY)
    key.params.ciphertext_segment_size = SEGMENT_SIZE
    key.params.derived_key_size = 32
    key.params.hkdf_hash_type = common_pb2.SHA256
    keyset = tink_pb2.Keyset(primary_key_id=1)
    entry = keyset.key.add()
    entry.key_data.type_url = "type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey"
    entry.key_data.value = key.SerializeToString()
    entry.key_data.key_material_type = tink_pb2.KeyData.SYMMETRIC
    entry.status = tink_pb2.ENABLED
    entry.key_id = 1
    entry.output_prefix_type = tink_pb2.RAW
    primitive = cleartext_keyset_handle.from_keyset(keyset).primitive(streaming_aead.StreamingAead)

    def run() -> None:
        with primitive.new_decrypting_stream(io.BytesIO(ciphertext), AD) as reader:
            if len(reader.read()) != size:
                raise SystemExit("tink decrypted the wrong size")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-tink", action="store_true")
    args = parser.parse_args()
    size = args.mib << 20
    plaintext = os.urandom(size)
    sink = io.BytesIO()
    encrypt_file(KEY, AD, io.BytesIO(plaintext), sink)
    ciphertext = sink.getvalue()
    sink = io.BytesIO()
    expected = hashlib.sha256(plaintext).digest()
    opened = decrypt_to_bytearray(KEY, AD, io.BytesIO(ciphertext))
    if opened != plaintext:
        raise SystemExit("round trip failed")
    del opened
    gcm = AESGCM(KEY)
    step = SEGMENT_SIZE - TAG_SIZE
    segments = [gcm.encrypt(bytes(12), plaintext[i : i + step], None) for i in range(0, size, step)]
    raw_out = bytearray(size)

    def ours_with_digest() -> None:
        digest = hashlib.sha256()
        decrypt_to_bytearray(KEY, AD, io.BytesIO(ciphertext), digest=digest)
        if digest.digest() != expected:
            raise SystemExit("digest mismatch")

    def copy_reused() -> None:
        memoryview(raw_out)[:] = plaintext

    def ours_into_reused() -> None:
        digest = hashlib.sha256()
        decrypt_into(KEY, AD, io.BytesIO(ciphertext), raw_out, digest=digest)
        if digest.digest() != expected:
            raise SystemExit("digest mismatch")

    def ours_encrypt() -> None:
        out = io.BytesIO()
        encrypt_file(KEY, AD, io.BytesIO(plaintext), out)

    rows: list[tuple[str, Callable[[], object]]] = [
        ("alloc+copy", lambda: bytearray(plaintext)),
        ("copy (reused)", copy_reused),
        ("sha256", lambda: hashlib.sha256(plaintext).digest()),
        ("aes-gcm raw", lambda: raw_gcm(segments, raw_out)),
        ("ours decrypt", lambda: decrypt_to_bytearray(KEY, AD, io.BytesIO(ciphertext))),
        ("ours decrypt+sha", ours_with_digest),
        ("ours into reused", ours_into_reused),
        ("ours encrypt", ours_encrypt),
    ]
    if not args.no_tink:
        rows.append(("tink decrypt", tink_decrypt(ciphertext, size)))

    results = {name: size / best_seconds(run, args.reps) / 1e6 for name, run in rows}
    ceiling = results["aes-gcm raw"]
    print(f"streaming AEAD, {args.mib} MiB in memory, best of {args.reps}, one core")
    print(f"{'path':<18} {'MB/s':>8} {'vs aes-gcm raw':>15}")
    for name, rate in results.items():
        print(f"{name:<18} {rate:>8.0f} {rate / ceiling:>14.2f}x")
    bound = 1 / (1 / results["aes-gcm raw"] + 1 / results["sha256"])
    reused = results["ours into reused"]
    print(
        f"one-core bound for decrypt+sha256, 1/(1/aes-gcm + 1/sha256): {bound:.0f} MB/s; "
        f"ours into reused reaches {reused / bound:.0%} of it"
    )
    target = results["ours decrypt+sha"]
    verdict = "meets" if target >= 1000 else "misses"
    print(f"decrypt+sha256 {target:.0f} MB/s {verdict} the 1000 MB/s per-core target")


if __name__ == "__main__":
    main()
