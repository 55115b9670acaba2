"""The parsers that face input, each as a fuzz target: bytes in, and only the parser's own
refusal may come out. Any other exception (or a hang) is a finding.

Used by ``run_atheris.py`` (coverage-guided, libFuzzer through atheris) and by the test
suite, which runs every seed of ``corpus/<target>/`` and a bounded atheris pass.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from bastion.api import oip_binary, schemas
from bastion.api.admin import parse_expiry
from bastion.api.body import decode_value
from bastion.api.tensors import check_input_size, to_tensor_data
from bastion.config import Settings
from bastion.crypto import hpke, ohttp
from bastion.errors import BastionError
from bastion.models.scan import ScanLimits, UnsafeModel
from bastion.models.scan.safetensors import check_safetensors
from bastion.quotas.usage import parse_since
from bastion.wire import bhttp
from bastion.wire.framing import FrameDecoder, FrameTooLarge
from bastion.wire.protocol import TensorSpec, decode_from_worker, decode_to_worker

Target = Callable[[bytes], None]

_BODIES: list[type[Any]] = [
    schemas.ChatCompletionRequest,
    schemas.CompletionRequest,
    schemas.EmbeddingRequest,
    schemas.OipInferRequest,
    schemas.KeyCreate,
    schemas.TenantCreate,
    schemas.QuotaUpdate,
]


def json_bodies(data: bytes) -> None:
    """Every JSON request body, as the routes decode it: 400s only."""
    for schema in _BODIES:
        try:
            decode_value(data, schema)
        except BastionError as exc:
            assert exc.status == 400, exc.status


_SPECS = {
    "FP32": TensorSpec(name="x", datatype="FP32", shape=[-1, 4]),
    "INT64": TensorSpec(name="x", datatype="INT64", shape=[-1]),
    "BYTES": TensorSpec(name="x", datatype="BYTES", shape=[-1]),
    "BOOL": TensorSpec(name="x", datatype="BOOL", shape=[2, -1]),
    "FP16": TensorSpec(name="x", datatype="FP16", shape=[-1]),
    "UINT8": TensorSpec(name="x", datatype="UINT8", shape=[-1, -1]),
}
_LIMITS = Settings().size_limits


def oip_tensors(data: bytes) -> None:
    """OIP JSON tensors against each kind of input spec: 4xx only."""
    try:
        request = decode_value(data, schemas.OipInferRequest)
        check_input_size(request.inputs, _LIMITS)
    except BastionError as exc:
        assert 400 <= exc.status < 500, exc.status
        return
    for tensor in request.inputs:
        spec = _SPECS.get(tensor.datatype)
        if spec is None:
            continue
        try:
            to_tensor_data(tensor, spec)
        except BastionError as exc:
            assert 400 <= exc.status < 500, exc.status


def oip_binary_body(data: bytes) -> None:
    """The OIP binary extension: a JSON header of a given length, then raw tensors."""
    if len(data) < 2:
        return
    header_length = str(int.from_bytes(data[:2], "big") % (len(data) + 8))
    body = data[2:]
    try:
        header, binary = oip_binary.split_body(body, header_length)
        request = decode_value(header, schemas.OipInferRequest)
        check_input_size(request.inputs, _LIMITS)
        raw = oip_binary.take_binary_inputs(request.inputs, binary)
        for tensor in request.inputs:
            spec = _SPECS.get(tensor.datatype)
            if spec is not None and tensor.name in raw:
                oip_binary.binary_tensor_data(tensor, spec, raw[tensor.name])
    except BastionError as exc:
        assert 400 <= exc.status < 500, exc.status


def binary_http(data: bytes) -> None:
    """Binary HTTP requests and responses, whole and streamed in pieces."""
    for decode in (bhttp.decode_request, bhttp.decode_response):
        with contextlib.suppress(bhttp.BhttpError):
            decode(data, max_bytes=1 << 20)
    decoder = bhttp.ResponseDecoder()
    try:
        for start in range(0, len(data), 7):
            decoder.feed(data[start : start + 7])
        decoder.finish()
    except bhttp.BhttpError:
        pass


_GATEWAY_KEY = ohttp.GatewayKey(
    key_id=1,
    private_key=hpke.PrivateKey.derive(hpke.KEM_X25519_SHA256, b"\x07" * 32),
    suites=((hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),),
)
# The post-quantum KEMs' decapsulation paths: the hybrid (key id 2) and ML-KEM-768 (3).
_PQ_GATEWAY_KEYS = {
    key_id: ohttp.GatewayKey(
        key_id=key_id,
        private_key=hpke.PrivateKey.derive(kem_id, b"\x07" * 32),
        suites=((hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),),
    )
    for key_id, kem_id in ((2, hpke.KEM_MLKEM768_X25519), (3, hpke.KEM_MLKEM768))
}


def oblivious_http(data: bytes) -> None:
    """OHTTP: key configurations, request headers, whole and chunked requests."""
    keys = {1: _GATEWAY_KEY, **_PQ_GATEWAY_KEYS}
    for parse in (
        ohttp.decode_key_configs,
        ohttp.parse_request_header,
        lambda d: ohttp.decapsulate_request(keys, d),
        lambda d: ohttp.decapsulate_chunked_request(keys, d),
    ):
        with contextlib.suppress(ohttp.OhttpError):
            parse(data)


def ipc_frames(data: bytes) -> None:
    """The framed msgspec messages of the worker channel, in both directions."""
    decoder = FrameDecoder(max_frame_bytes=1 << 16)
    try:
        bodies = [body for start in range(0, len(data), 5) for body in
                  decoder.feed(data[start : start + 5])]  # fmt: skip
    except FrameTooLarge:
        return
    for body in [*bodies, data]:
        for decode in (decode_from_worker, decode_to_worker):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                decode(body)


def safetensors_header(data: bytes) -> None:
    """The import scanner's safetensors check, on a file of these bytes."""
    with contextlib.suppress(UnsafeModel):
        check_safetensors("model.safetensors", io.BytesIO(data), len(data), _SCAN_LIMITS)


_SCAN_LIMITS = ScanLimits(max_safetensors_header_bytes=1 << 16, max_json_depth=32)
_NOW = datetime(2026, 12, 6, tzinfo=UTC)


def periods(data: bytes) -> None:
    """The `since`/`until` and `expires_at` parsers, on any text."""
    text = data.decode("utf-8", "replace")
    for parse in (lambda t: parse_since(t, _NOW), parse_expiry):
        try:
            parse(text)
        except BastionError as exc:
            assert exc.status == 400, exc.status


TARGETS: dict[str, Target] = {
    "json_bodies": json_bodies,
    "oip_tensors": oip_tensors,
    "oip_binary": oip_binary_body,
    "bhttp": binary_http,
    "ohttp": oblivious_http,
    "ipc_frames": ipc_frames,
    "safetensors": safetensors_header,
    "periods": periods,
}
