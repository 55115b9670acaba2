from __future__ import annotations

import numpy as np
import pytest

from bastion.api.schemas import OipInputTensor
from bastion.api.tensors import to_json_tensor, to_tensor_data
from bastion.errors import InvalidRequest
from bastion.wire.protocol import TensorSpec

SPEC = TensorSpec(name="input", datatype="FP32", shape=[-1, 4])


def tensor(**kw: object) -> OipInputTensor:
    base: dict[str, object] = {"name": "input", "shape": [2, 4], "datatype": "FP32"}
    base.update(kw)
    base.setdefault("data", list(range(8)))
    return OipInputTensor(**base)  # type: ignore[arg-type]


def test_flat_and_nested_data_pack_to_the_same_bytes() -> None:
    flat = to_tensor_data(tensor(), SPEC)
    nested = to_tensor_data(tensor(data=[[0, 1, 2, 3], [4, 5, 6, 7]]), SPEC)
    assert flat.raw == nested.raw == np.arange(8, dtype="<f4").tobytes()
    assert to_json_tensor(flat)["data"] == [float(i) for i in range(8)]


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"shape": [2, 5]}, "shape"),
        ({"shape": [8]}, "shape"),
        ({"datatype": "INT64"}, "datatype"),
        ({"data": [1, 2, 3]}, "values"),
        ({"data": ["1"] * 8}, "finite numbers"),
        ({"data": [True] * 8}, "finite numbers"),
        ({"data": [float("nan")] * 8}, "finite numbers"),
        ({"data": [1e300] * 8}, "within its range"),
        ({"data": [10**400] * 8}, "finite numbers"),
    ],
)
def test_bad_tensors_are_refused(kw: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        to_tensor_data(tensor(**kw), SPEC)
    assert fragment in err.value.message


def test_integer_ranges_and_bytes() -> None:
    spec = TensorSpec(name="x", datatype="UINT8", shape=[2])
    ok = to_tensor_data(OipInputTensor(name="x", shape=[2], datatype="UINT8", data=[0, 255]), spec)
    assert ok.raw == bytes([0, 255])
    with pytest.raises(InvalidRequest):
        to_tensor_data(OipInputTensor(name="x", shape=[2], datatype="UINT8", data=[0, 256]), spec)
    text = TensorSpec(name="t", datatype="BYTES", shape=[-1])
    packed = to_tensor_data(
        OipInputTensor(name="t", shape=[2], datatype="BYTES", data=["héllo", "x"]), text
    )
    assert packed.items == ["héllo".encode(), b"x"]
    assert to_json_tensor(packed)["data"] == ["héllo", "x"]
