"""The ONNX runtime on small graphs built here with the onnx helper API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bastion.runtimes.base import CancelToken, RuntimeInputError, UnsupportedOperation
from bastion.runtimes.onnx import OnnxRuntime, load
from bastion.wire.protocol import Embed, Generate, Infer, InferResult, TensorData, TensorSpec


def _save(model: onnx.ModelProto, directory: Path, name: str = "model.onnx") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / name))
    return directory


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def affine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = x * 2 (FP32 [batch, 3]); count = number of rows as INT64; flag = x > 0 (BOOL)."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [
        helper.make_node("Constant", [], ["two_c"], value=two),
        helper.make_node("Constant", [], ["zero_c"], value=zero),
        helper.make_node("Mul", ["x", "two_c"], ["y"]),
        helper.make_node("Greater", ["x", "zero_c"], ["flag"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Cast", ["shape"], ["count"], to=TensorProto.INT64),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, ["batch", 3]),
            helper.make_tensor_value_info("count", TensorProto.INT64, [2]),
        ],
    )
    return _save(model, tmp_path_factory.mktemp("affine"))


@pytest.fixture(scope="module")
def runtime(affine_dir: Path) -> OnnxRuntime:
    return load(affine_dir, {"threads": 1})


def _x(values: np.ndarray) -> TensorData:
    return TensorData(
        name="x", datatype="FP32", shape=list(values.shape), raw=values.astype("<f4").tobytes()
    )


def test_metadata(runtime: OnnxRuntime) -> None:
    metadata = runtime.metadata()
    assert metadata.runtime == "onnx"
    assert metadata.capabilities == ["infer"]
    assert metadata.platform == "onnxruntime_onnx"
    assert metadata.inputs == [TensorSpec(name="x", datatype="FP32", shape=[-1, 3])]
    assert metadata.outputs == [
        TensorSpec(name="y", datatype="FP32", shape=[-1, 3]),
        TensorSpec(name="flag", datatype="BOOL", shape=[-1, 3]),
        TensorSpec(name="count", datatype="INT64", shape=[2]),
    ]


def test_infer_all_outputs(runtime: OnnxRuntime) -> None:
    values = np.array([[1.5, -2.0, 0.0], [3.0, 4.0, -5.0]], dtype=np.float32)
    result = runtime.infer(Infer(id=3, inputs=[_x(values)]))
    assert result.id == 3
    by_name = {t.name: t for t in result.outputs}
    assert list(by_name) == ["y", "flag", "count"]
    y = by_name["y"]
    assert (y.datatype, y.shape) == ("FP32", [2, 3])
    np.testing.assert_array_equal(np.frombuffer(y.raw, "<f4").reshape(2, 3), values * 2)
    flag = by_name["flag"]
    assert (flag.datatype, flag.shape) == ("BOOL", [2, 3])
    assert list(flag.raw) == [1, 0, 0, 1, 1, 0]
    assert np.frombuffer(by_name["count"].raw, "<i8").tolist() == [2, 3]


def test_infer_only_requested_outputs(runtime: OnnxRuntime) -> None:
    values = np.ones((1, 3), dtype=np.float32)
    result = runtime.infer(Infer(id=1, inputs=[_x(values)], outputs=["count"]))
    assert [t.name for t in result.outputs] == ["count"]


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (TensorData(name="z", datatype="FP32", shape=[1, 3], raw=bytes(12)), "no input"),
        (TensorData(name="x", datatype="FP64", shape=[1, 3], raw=bytes(24)), "datatype"),
        (TensorData(name="x", datatype="FP32", shape=[1, 4], raw=bytes(16)), "shape"),
        (TensorData(name="x", datatype="FP32", shape=[3], raw=bytes(12)), "shape"),
        (TensorData(name="x", datatype="FP32", shape=[-1, 3], raw=bytes(12)), "shape"),
        (TensorData(name="x", datatype="FP32", shape=[2, 3], raw=bytes(12)), "bytes"),
        (TensorData(name="x", datatype="FP32", shape=[1, 3], items=[b"a"] * 3), "bytes"),
    ],
)
def test_bad_inputs_are_input_errors(runtime: OnnxRuntime, tensor: TensorData, match: str) -> None:
    with pytest.raises(RuntimeInputError, match=match):
        runtime.infer(Infer(id=1, inputs=[tensor]))


def test_missing_duplicate_and_unknown_output(runtime: OnnxRuntime) -> None:
    x = _x(np.zeros((1, 3)))
    with pytest.raises(RuntimeInputError, match="Missing"):
        runtime.infer(Infer(id=1, inputs=[]))
    with pytest.raises(RuntimeInputError, match="more than once"):
        runtime.infer(Infer(id=1, inputs=[x, x]))
    with pytest.raises(RuntimeInputError, match="no output"):
        runtime.infer(Infer(id=1, inputs=[x], outputs=["nope"]))


def test_text_operations_are_unsupported(runtime: OnnxRuntime) -> None:
    with pytest.raises(UnsupportedOperation):
        runtime.generate(Generate(id=1, prompt="x"), CancelToken(), lambda i, t: None)
    with pytest.raises(UnsupportedOperation):
        runtime.embed(Embed(id=1, texts=["x"]))


def test_string_and_integer_tensors(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Identity", ["words"], ["same_words"]),
        helper.make_node("Neg", ["numbers"], ["negated"]),
    ]
    model = _model(
        nodes,
        [
            helper.make_tensor_value_info("words", TensorProto.STRING, [None]),
            helper.make_tensor_value_info("numbers", TensorProto.INT32, [2]),
        ],
        [
            helper.make_tensor_value_info("same_words", TensorProto.STRING, [None]),
            helper.make_tensor_value_info("negated", TensorProto.INT32, [2]),
        ],
    )
    runtime = load(_save(model, tmp_path, "custom.onnx"), {"file": "custom.onnx"})
    assert runtime.metadata().inputs[0] == TensorSpec(name="words", datatype="BYTES", shape=[-1])
    words = TensorData(name="words", datatype="BYTES", shape=[2], items=["día".encode(), b"b"])
    numbers = TensorData(
        name="numbers", datatype="INT32", shape=[2], raw=np.array([7, -9], "<i4").tobytes()
    )
    result = runtime.infer(Infer(id=1, inputs=[words, numbers]))
    same, negated = result.outputs
    assert same.items == ["día".encode(), b"b"]
    assert np.frombuffer(negated.raw, "<i4").tolist() == [-7, 9]
    bad = TensorData(name="words", datatype="BYTES", shape=[1], items=[b"\xff\xfe"])
    with pytest.raises(RuntimeInputError, match="UTF-8"):
        runtime.infer(Infer(id=1, inputs=[bad, numbers]))


def test_model_file_must_stay_in_the_directory(affine_dir: Path) -> None:
    with pytest.raises(ValueError, match="inside"):
        load(affine_dir, {"file": "../elsewhere.onnx"})


# ---------------------------------------------------------------- dynamic batching


def _digits_input(rows: np.ndarray) -> TensorData:
    return TensorData(
        name="input", datatype="FP32", shape=list(rows.shape), raw=rows.astype("<f4").tobytes()
    )


def test_a_batch_runs_in_one_call_and_each_request_gets_its_own_rows() -> None:
    from bastion.models.demo import digits_onnx, digits_split

    digits = OnnxRuntime(digits_onnx(), threads=1)
    images = digits_split()[1][:6].astype(np.float32)
    requests = [
        Infer(id=1, inputs=[_digits_input(images[0:1])]),
        Infer(id=2, inputs=[_digits_input(images[1:4])]),  # three rows
        Infer(id=3, inputs=[_digits_input(images[4:5, :63])]),  # wrong shape: fails alone
        Infer(id=4, inputs=[_digits_input(images[5:6])], outputs=["label"]),  # other outputs
        Infer(id=5, inputs=[_digits_input(images[4:5])]),
    ]
    alone = [digits.infer(r) if r.id != 3 else None for r in requests]
    calls = _session_calls(digits)
    results = digits.infer_batch(requests)
    # Requests 1, 2 and 5 (same outputs) share one call of 5 rows; request 4 runs apart.
    assert sorted(calls) == [1, 5]
    assert isinstance(results[2], RuntimeInputError)
    for request, result, expected in zip(requests, results, alone, strict=True):
        if expected is None:
            continue
        assert isinstance(result, InferResult)
        assert result.id == request.id
        assert [(t.name, t.shape) for t in result.outputs] == [
            (t.name, t.shape) for t in expected.outputs
        ]
        for got, want in zip(result.outputs, expected.outputs, strict=True):
            dtype = "<i8" if got.datatype == "INT64" else "<f4"
            # Labels exactly; scores to float32 rounding (a batch's kernels sum in
            # another order than one row's).
            np.testing.assert_allclose(
                np.frombuffer(got.raw, dtype=dtype), np.frombuffer(want.raw, dtype=dtype), rtol=1e-5
            )


def test_a_model_without_a_batch_dimension_runs_requests_apart(runtime: OnnxRuntime) -> None:
    values = [np.full((rows, 3), rows, dtype=np.float32) for rows in (1, 2)]
    results = runtime.infer_batch([Infer(id=i, inputs=[_x(v)]) for i, v in enumerate(values)])
    for value, result in zip(values, results, strict=True):
        assert isinstance(result, InferResult)
        # `count` (the input's shape) is each request's own: nothing was concatenated.
        count = next(t for t in result.outputs if t.name == "count")
        assert np.frombuffer(count.raw, dtype="<i8").tolist() == [value.shape[0], 3]


def test_a_first_dimension_named_differently_is_not_a_batch_dimension(tmp_path: Path) -> None:
    # The output's first dimension is free but is not the input's: concatenating requests
    # could hand one request rows computed from another's input.
    model = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["detections", 3])],
    )
    runtime = load(_save(model, tmp_path / "named"), {"threads": 1})
    assert not runtime._batchable
    calls = _session_calls(runtime)
    values = [np.ones((1, 3), dtype=np.float32), np.zeros((2, 3), dtype=np.float32)]
    results = runtime.infer_batch([Infer(id=i, inputs=[_x(v)]) for i, v in enumerate(values)])
    assert sorted(calls) == [1, 2]
    assert all(isinstance(r, InferResult) for r in results)


def _session_calls(runtime: OnnxRuntime) -> list[int]:
    """The rows of each call the runtime makes to its ONNX session from now on."""
    calls: list[int] = []
    session_run = runtime._session.run

    def counting_run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        calls.append(next(iter(feeds.values())).shape[0])
        return session_run(names, feeds)

    runtime._session.run = counting_run  # type: ignore[method-assign]
    return calls
