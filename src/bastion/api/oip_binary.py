"""The binary tensor extension of the Open Inference Protocol (Triton's HTTP/REST form).

A request or answer is a JSON header of `Inference-Header-Content-Length` bytes followed by
raw tensor bytes, in the order of the tensors whose `parameters.binary_data_size` is set.
Numeric tensors are little-endian, row-major; each BYTES element is a 4-byte little-endian
length followed by its bytes. `tritonclient` uses this form by default.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from bastion.api.schemas import OipInputTensor
from bastion.api.tensors import NUMPY_TYPES, check_against_spec
from bastion.errors import InvalidRequest
from bastion.wire.protocol import TensorData, TensorSpec

HEADER = "inference-header-content-length"
_LENGTH = struct.Struct("<I")


def split_body(body: bytes, header_length: str) -> tuple[bytes, bytes]:
    """Separate the JSON header from the binary part."""
    try:
        size = int(header_length)
    except ValueError:
        raise InvalidRequest(f"Invalid {HEADER} header.") from None
    if not 0 < size <= len(body):
        raise InvalidRequest(f"{HEADER} does not match the body.")
    return body[:size], body[size:]


def binary_size(tensor: OipInputTensor) -> int | None:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidRequest(f"Input '{tensor.name}': invalid binary_data_size.")
    return size


def _split_bytes_elements(name: str, raw: bytes, count: int) -> list[bytes]:
    items: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise InvalidRequest(f"Input '{name}': BYTES data is truncated.")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequest(f"Input '{name}': BYTES data is truncated.")
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidRequest(f"Input '{name}': BYTES data is longer than its shape.")
    return items


def binary_tensor_data(tensor: OipInputTensor, spec: TensorSpec, raw: bytes) -> TensorData:
    """Validate one binary input tensor against `spec` and pack it for the worker."""
    count = check_against_spec(tensor, spec)
    if tensor.datatype == "BYTES":
        items = _split_bytes_elements(tensor.name, raw, count)
        return TensorData(name=tensor.name, datatype="BYTES", shape=list(tensor.shape), items=items)
    itemsize = np.dtype(NUMPY_TYPES[tensor.datatype]).itemsize
    if len(raw) != count * itemsize:
        raise InvalidRequest(
            f"Input '{tensor.name}' has {len(raw)} bytes but shape {tensor.shape} "
            f"needs {count * itemsize}."
        )
    return TensorData(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape), raw=raw)


def take_binary_inputs(inputs: list[OipInputTensor], binary: bytes) -> dict[str, bytes]:
    """The raw bytes of each binary input, by name; the sizes must add up exactly."""
    found: dict[str, bytes] = {}
    offset = 0
    for tensor in inputs:
        size = binary_size(tensor)
        if size is None:
            continue
        if offset + size > len(binary):
            raise InvalidRequest("The binary data is shorter than binary_data_size says.")
        found[tensor.name] = binary[offset : offset + size]
        offset += size
    if offset != len(binary):
        raise InvalidRequest("The binary data is longer than binary_data_size says.")
    return found


def output_bytes(tensor: TensorData) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(item)) + item for item in tensor.items)
    return tensor.raw


def binary_output_header(tensor: TensorData, size: int) -> dict[str, Any]:
    return {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": tensor.shape,
        "parameters": {"binary_data_size": size},
    }
