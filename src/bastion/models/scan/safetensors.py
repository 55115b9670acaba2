"""safetensors files: the 8-byte length and the JSON header only, checked against the
reference implementation's rules."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, BinaryIO

from bastion.models.scan.report import ScanLimits, UnsafeModel, printable
from bastion.models.scan.structured import parse_json

# safetensors dtypes and their sizes in bits, as in the reference implementation.
_SAFETENSORS_DTYPE_BITS: Mapping[str, int] = MappingProxyType({
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
    "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
})  # fmt: skip


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_safetensors(rel: str, handle: BinaryIO, size: int, limits: ScanLimits) -> None:
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise UnsafeModel(rel, "safetensors file shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    cap = limits.max_safetensors_header_bytes
    if header_len > cap:
        raise UnsafeModel(rel, f"safetensors header of {header_len} bytes exceeds the cap of {cap}")
    if 8 + header_len > size:
        raise UnsafeModel(rel, "safetensors header length runs past the end of the file")
    raw = handle.read(header_len)
    if not raw.startswith(b"{"):
        raise UnsafeModel(rel, "safetensors header does not start with `{`")
    header = parse_json(rel, raw, "safetensors header")
    if not isinstance(header, dict):
        raise UnsafeModel(rel, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnsafeModel(rel, "safetensors __metadata__ must map strings to strings")
    extents: list[tuple[int, int, str]] = []
    for name, info in header.items():
        shown = printable(name)[:80]
        if not isinstance(info, dict):
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPE_BITS:
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` has an unknown dtype")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` has invalid data_offsets")
        elements = 1
        for dim in shape:
            elements *= dim
        bits = elements * _SAFETENSORS_DTYPE_BITS[dtype]
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise UnsafeModel(
                rel, f"safetensors tensor `{shown}`: shape and dtype do not match its size"
            )
        extents.append((offsets[0], offsets[1], shown))
    data_len = size - 8 - header_len
    position = 0
    for begin, end, shown in sorted(extents):
        if begin < position:
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` overlaps another tensor")
        if begin > position:
            raise UnsafeModel(rel, f"safetensors data has a gap before tensor `{shown}`")
        if end > data_len:
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` lies outside the file")
        position = end
    if position != data_len:
        raise UnsafeModel(
            rel, f"safetensors data section has {data_len - position} bytes no tensor covers"
        )
