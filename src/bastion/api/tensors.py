"""Open Inference Protocol JSON tensors <-> typed tensors, checked against model metadata."""

from __future__ import annotations

import array
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from bastion.api.schemas import OipInputTensor
from bastion.errors import InvalidRequest, PayloadTooLarge
from bastion.wire.protocol import SizeLimits, TensorData, TensorSpec

NUMPY_TYPES: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
_INT_RANGES = {
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}
_ITEMSIZE = {name: np.dtype(code).itemsize for name, code in NUMPY_TYPES.items()}
# Float datatypes Python's own arrays pack in the tensor's (little-endian) layout, in one
# C loop: no warnings to silence, no intermediate float64 array.
_PACKED = {"FP32": "f", "FP64": "d"} if sys.byteorder == "little" else {}
_NUMBERS = frozenset({int, float})
MAX_ELEMENTS = 16 * 1024 * 1024
# Characters per element of a tensor rendered as JSON (a float32 as Python prints its
# double: "0.12345678918063641"), for estimating an answer's size before building it.
_JSON_CHARS = {"BOOL": 6, "UINT8": 4, "INT8": 5, "UINT16": 6, "INT16": 7, "FP16": 12}


def check_input_size(inputs: Sequence[OipInputTensor], limits: SizeLimits) -> None:
    """413 if the declared shapes ask for a bigger batch or more elements than allowed,
    before any of the data is converted."""
    total = 0
    for tensor in inputs:
        batch = tensor.shape[0] if tensor.shape else 1
        if batch > limits.max_batch:
            raise PayloadTooLarge(
                f"Input '{tensor.name}' has a batch of {batch}; this model takes at most "
                f"{limits.max_batch} at once.",
                code="input_too_large",
            )
        total += math.prod(tensor.shape)
        if total > limits.max_input_elements:
            raise PayloadTooLarge(
                f"The inputs hold more than {limits.max_input_elements} elements, the "
                "model's limit.",
                code="input_too_large",
            )


def json_size(tensor: TensorData) -> int:
    """About how many bytes `tensor` takes as OIP JSON."""
    if tensor.datatype == "BYTES":
        return sum(len(item) + 4 for item in tensor.items) + 64
    count = len(tensor.raw) // _ITEMSIZE[tensor.datatype]
    return count * _JSON_CHARS.get(tensor.datatype, 21) + 64


def check_answer_size(size: int, limits: SizeLimits) -> None:
    """413 before an answer of about `size` bytes is built, if it would pass the limit."""
    if size > limits.max_answer_bytes:
        raise PayloadTooLarge(
            f"The answer would take about {size} bytes, more than the limit of "
            f"{limits.max_answer_bytes}; send fewer inputs at once (or ask for binary outputs).",
            code="answer_too_large",
        )


def _flatten(data: list[Any], out: list[Any], depth: int = 0) -> None:
    if depth > 32:
        raise InvalidRequest("Tensor data is nested too deeply.")
    for item in data:
        if isinstance(item, list):
            _flatten(item, out, depth + 1)
        else:
            out.append(item)


def _numeric_array(
    name: str, datatype: str, values: list[Any], kinds: set[type] | None = None
) -> np.ndarray[Any, Any]:
    """Check the JSON values' types and ranges, and convert them to the tensor's dtype.

    Type checks run over the set of value types (C speed; `kinds`, when the caller has
    it); ranges are checked on the converted array, so a float that overflows FP16/FP32 is
    refused rather than sent as inf.
    """
    if kinds is None:
        kinds = set(map(type, values))
    if datatype == "BOOL":
        if not kinds <= {bool}:
            raise InvalidRequest(f"Input '{name}': BOOL data must be true or false.")
        return np.asarray(values, dtype="?")
    if datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        if not kinds <= {int} or (values and not low <= min(values) <= max(values) <= high):
            raise InvalidRequest(
                f"Input '{name}': {datatype} data must be integers in [{low}, {high}]."
            )
        return np.asarray(values, dtype=NUMPY_TYPES[datatype])
    if not kinds <= _NUMBERS:
        raise InvalidRequest(f"Input '{name}': {datatype} data must be finite numbers.")
    try:
        wide = np.asarray(values, dtype="<f8")
    except OverflowError:
        raise InvalidRequest(f"Input '{name}': {datatype} data must be finite numbers.") from None
    with np.errstate(over="ignore"):
        converted = wide.astype(NUMPY_TYPES[datatype])
    if not np.isfinite(converted).all():
        raise InvalidRequest(
            f"Input '{name}': {datatype} data must be finite numbers within its range."
        )
    return converted


def _packed_floats(name: str, datatype: str, values: list[Any], code: str) -> bytes:
    """FP32 or FP64 values (ints and floats: the caller checked) as the tensor's bytes,
    converted as :func:`_numeric_array` converts them (through a double, rounded once
    to the tensor's precision), with the same refusals."""
    try:
        packed = array.array(code, values)
    except OverflowError:
        raise InvalidRequest(f"Input '{name}': {datatype} data must be finite numbers.") from None
    if code == "f":
        # A sum in double precision of at most MAX_ELEMENTS float32 values cannot
        # overflow: it is finite exactly when every value is.
        finite = math.isfinite(sum(packed))
    else:
        finite = bool(np.isfinite(np.frombuffer(packed, dtype="<f8")).all())
    if not finite:
        raise InvalidRequest(
            f"Input '{name}': {datatype} data must be finite numbers within its range."
        )
    return packed.tobytes()


def check_shape(name: str, shape: list[int], spec: TensorSpec) -> None:
    """Refuse a shape whose rank or fixed dimensions differ from the model's metadata."""
    if len(shape) != len(spec.shape) or any(
        want != -1 and want != got for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise InvalidRequest(
            f"Input '{name}' has shape {shape}; the model expects {spec.shape} (-1: any size)."
        )


def check_against_spec(tensor: OipInputTensor, spec: TensorSpec) -> int:
    """Refuse a datatype or shape the model does not take; return the element count."""
    if tensor.datatype != spec.datatype:
        raise InvalidRequest(
            f"Input '{tensor.name}' has datatype {tensor.datatype}; "
            f"the model expects {spec.datatype}."
        )
    check_shape(tensor.name, tensor.shape, spec)
    return math.prod(tensor.shape)


def to_tensor_data(tensor: OipInputTensor, spec: TensorSpec) -> TensorData:
    """Validate one JSON input tensor against `spec` and pack it for the worker."""
    count = check_against_spec(tensor, spec)
    if count > MAX_ELEMENTS:
        raise InvalidRequest(f"Input '{tensor.name}' has too many elements.")
    if tensor.data is None:
        raise InvalidRequest(f"Input '{tensor.name}' has no data.")
    values: list[Any] = tensor.data
    kinds = set(map(type, values))
    if list in kinds:
        values = []
        _flatten(tensor.data, values)
        kinds = set(map(type, values))
    if len(values) != count:
        raise InvalidRequest(
            f"Input '{tensor.name}' has {len(values)} values but shape {tensor.shape} "
            f"needs {count}."
        )
    if tensor.datatype == "BYTES":
        if not kinds <= {str}:
            raise InvalidRequest(f"Input '{tensor.name}': BYTES data must be strings.")
        return TensorData(
            name=tensor.name,
            datatype="BYTES",
            shape=list(tensor.shape),
            items=[v.encode() for v in values],
        )
    code = _PACKED.get(tensor.datatype)
    if code is not None and kinds <= _NUMBERS:
        raw = _packed_floats(tensor.name, tensor.datatype, values, code)
    else:
        raw = _numeric_array(tensor.name, tensor.datatype, values, kinds).tobytes()
    return TensorData(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape), raw=raw)


def to_json_tensor(tensor: TensorData) -> dict[str, Any]:
    """Unpack a worker's output tensor into OIP JSON (flat, row-major data)."""
    data: list[Any]
    if tensor.datatype == "BYTES":
        data = [item.decode("utf-8", errors="replace") for item in tensor.items]
    else:
        data = np.frombuffer(tensor.raw, dtype=NUMPY_TYPES[tensor.datatype]).tolist()
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape, "data": data}
