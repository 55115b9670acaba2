#!/usr/bin/env python3
"""Writes the seed corpora of tests/fuzz/corpus/ (committed): well-formed inputs of each
parser, and the inputs of earlier findings. Run again after changing a format:

    .venv/bin/python tests/fuzz/make_seeds.py
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from targets import _GATEWAY_KEY, _PQ_GATEWAY_KEYS

from bastion.crypto import ohttp
from bastion.wire import bhttp, protocol
from bastion.wire.framing import encode_frame

CORPUS = Path(__file__).resolve().parent / "corpus"


def seeds() -> dict[str, list[bytes]]:
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    oip = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    words = {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}
    json_bodies = [
        json.dumps(chat).encode(),
        json.dumps({"model": "echo", "prompt": ["a", "b"], "n": 2, "stop": ["x"]}).encode(),
        json.dumps({"model": "m", "input": ["a", "b"], "encoding_format": "base64"}).encode(),
        json.dumps(oip).encode(),
        json.dumps({"tenant": "acme", "expires_at": "2030-01-01T00:00:00Z"}).encode(),
        json.dumps({"requests_per_minute": 5, "weight": 2.5, "tokens_per_day": None}).encode(),
        # Earlier findings: invalid UTF-8 in a string, nesting 50,000 deep, tiny numbers.
        b'{"model":"echo","messages":[{"role":"user","content":"\xff\xfe"}]}',
        b'{"model":"echo","messages":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"model":"echo","prompt":"x","temperature":1e-300,"top_p":1e-300}',
        b'{"name":"\\ud800"}',
    ]
    binary = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                     "parameters": {"binary_data_size": 16}}]}
    ).encode()  # fmt: skip
    headers = (("content-type", "application/json"),)
    body = json.dumps(chat).encode()
    request = bhttp.Request("POST", "https", "bastion", "/v1/chat/completions", headers, body)
    response = bhttp.Response(200, (("content-type", "text/plain"),), b"hello", ())
    config = _GATEWAY_KEY.config()
    sealed, _ = ohttp.encapsulate_request(config, bhttp.encode_request(request))
    whole = bhttp.encode_request(request, indeterminate=True)
    chunked, _ = ohttp.encapsulate_chunked_request(config, [whole[:30], whole[30:]])
    pq_configs = [key.config() for key in _PQ_GATEWAY_KEYS.values()]
    pq_sealed = [ohttp.encapsulate_request(c, bhttp.encode_request(request))[0] for c in pq_configs]
    pq_chunked, _ = ohttp.encapsulate_chunked_request(pq_configs[0], [whole[:30], whole[30:]])
    messages = [
        protocol.LoadModel(model="m", runtime="echo", path="/m"),
        protocol.Generate(id=1, prompt="hello", max_tokens=4),
        protocol.Embed(id=2, texts=["a", "b"]),
        protocol.Infer(id=3, inputs=[protocol.TensorData(name="x", datatype="FP32", shape=[1],
                                                         raw=struct.pack("<f", 1.0))]),
        protocol.GenerateResult(id=1, choices=[protocol.Choice(index=0, text="x",
                                finish_reason="stop")], prompt_tokens=1, completion_tokens=1),
        protocol.Heartbeat(in_flight=2),
        protocol.SealedRequest(id=4, data=b"\x01" * 40, allowance=100),
    ]  # fmt: skip
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return {
        "json_bodies": json_bodies,
        "oip_tensors": [
            json.dumps(oip).encode(),
            json.dumps(words).encode(),
            b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":'
            + b"[" * 40
            + b"]" * 40
            + b"}]}",
        ],
        "oip_binary": [struct.pack(">H", len(binary)) + binary + struct.pack("<4f", 1, 2, 3, 4)],
        "bhttp": [
            bhttp.encode_request(request),
            bhttp.encode_response(response),
            bhttp.encode_request(request, indeterminate=True, padding=4),
            bhttp.encode_response(response, indeterminate=True),
        ],
        "ohttp": [
            ohttp.encode_key_configs([config]),
            sealed,
            chunked,
            sealed[:20],
            ohttp.encode_key_configs([*pq_configs, config]),
            *pq_sealed,
            pq_chunked,
            pq_sealed[0][:1000],
        ],
        "ipc_frames": [bytes(encode_frame(m)) for m in messages]
        + [
            msgspec.msgpack.encode(messages[1]),
            # Found by atheris: a tag that is not UTF-8 (UnicodeDecodeError escaped).
            b"\x1b\x00\x00\x00\x82\xa4type\xa9Hear\xa4type\xa9Heartbeat\xa9",
        ],
        "safetensors": [
            struct.pack("<Q", len(header)) + header + bytes(8),
            struct.pack("<Q", 2**63) + b"{}",
        ],
        "periods": [
            b"24h",
            b"7d",
            b"90m",
            b"2026-11-01",
            b"2026-11-01T10:00:00+01:00",
            b"99999999999d",
            b"1e309h",
            b"0001-01-01T00:00:00+01:00",
            b"nanh",
            b"inf",
        ],
    }


def main() -> None:
    for target, inputs in seeds().items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for data in inputs:
            (folder / hashlib.sha256(data).hexdigest()[:16]).write_bytes(data)
        print(f"{target}: {len(inputs)} seeds")


if __name__ == "__main__":
    main()
