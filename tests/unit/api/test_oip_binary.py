from __future__ import annotations

import struct

import numpy as np
import pytest

from bastion.api import oip_binary
from bastion.api.schemas import OipInputTensor
from bastion.errors import InvalidRequest
from bastion.wire.protocol import TensorData, TensorSpec


def _input(name: str, datatype: str, shape: list[int], size: int) -> OipInputTensor:
    return OipInputTensor(
        name=name, shape=shape, datatype=datatype, parameters={"binary_data_size": size}
    )  # type: ignore[arg-type]


def test_numeric_and_bytes_inputs_are_split_in_order() -> None:
    floats = np.arange(4, dtype="<f4").tobytes()
    strings = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b""))
    inputs = [_input("x", "FP32", [1, 4], len(floats)), _input("t", "BYTES", [2], len(strings))]
    raw = oip_binary.take_binary_inputs(inputs, floats + strings)
    x = oip_binary.binary_tensor_data(
        inputs[0], TensorSpec(name="x", datatype="FP32", shape=[-1, 4]), raw["x"]
    )
    t = oip_binary.binary_tensor_data(
        inputs[1], TensorSpec(name="t", datatype="BYTES", shape=[-1]), raw["t"]
    )
    assert x.raw == floats
    assert t.items == [b"ab", b""]


def test_sizes_must_add_up() -> None:
    inputs = [_input("x", "FP32", [1], 4)]
    with pytest.raises(InvalidRequest):
        oip_binary.take_binary_inputs(inputs, b"\0" * 3)
    with pytest.raises(InvalidRequest):
        oip_binary.take_binary_inputs(inputs, b"\0" * 5)


def test_wrong_byte_counts_and_truncated_strings_are_refused() -> None:
    spec = TensorSpec(name="x", datatype="FP32", shape=[-1])
    with pytest.raises(InvalidRequest, match="bytes"):
        oip_binary.binary_tensor_data(_input("x", "FP32", [2], 4), spec, b"\0" * 4)
    text = TensorSpec(name="t", datatype="BYTES", shape=[-1])
    with pytest.raises(InvalidRequest, match="truncated"):
        oip_binary.binary_tensor_data(
            _input("t", "BYTES", [1], 6), text, struct.pack("<I", 9) + b"ab"
        )


def test_header_split_and_output_encoding() -> None:
    header, rest = oip_binary.split_body(b'{"a":1}xyz', "7")
    assert header == b'{"a":1}' and rest == b"xyz"
    with pytest.raises(InvalidRequest):
        oip_binary.split_body(b"{}", "99")
    out = TensorData(name="o", datatype="BYTES", shape=[1], items=[b"hi"])
    assert oip_binary.output_bytes(out) == struct.pack("<I", 2) + b"hi"
