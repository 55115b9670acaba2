"""Building the demo models: digits is accurate, minilm is copied safely, builds are idempotent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from bastion.models import demo
from bastion.runtimes.onnx import load as load_onnx
from bastion.wire.protocol import Infer, TensorData, TensorSpec

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def digits(models_dir: Path) -> demo.DemoModel:
    return demo.build_digits(models_dir)


def test_digits_is_accurate_on_held_out_data(digits: demo.DemoModel) -> None:
    # Its rows are independent: it batches (bastion.wire.batching).
    assert (digits.name, digits.runtime, digits.options) == (
        "digits",
        "onnx",
        {"threads": 1, "batch.max_size": 32},
    )
    session = onnxruntime.InferenceSession(
        str(digits.path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    _, x_test, _, y_test = demo.digits_split()
    assert x_test.max() == 16  # raw pixel values, no scaling outside the graph
    labels, probabilities = session.run(["label", "probabilities"], {"input": x_test})
    assert float(np.mean(labels == y_test)) >= 0.95
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_digits_serves_through_the_onnx_runtime(digits: demo.DemoModel) -> None:
    runtime = load_onnx(digits.path, digits.options)
    metadata = runtime.metadata()
    assert metadata.inputs == [TensorSpec(name="input", datatype="FP32", shape=[-1, 64])]
    assert metadata.outputs == [
        TensorSpec(name="label", datatype="INT64", shape=[-1]),
        TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10]),
    ]
    _, x_test, _, y_test = demo.digits_split()
    tensor = TensorData(name="input", datatype="FP32", shape=[5, 64], raw=x_test[:5].tobytes())
    (label,) = runtime.infer(Infer(id=1, inputs=[tensor], outputs=["label"])).outputs
    predicted = np.frombuffer(label.raw, "<i8")
    assert int(np.sum(predicted == y_test[:5])) >= 4


def test_builds_are_idempotent_and_deterministic(
    digits: demo.DemoModel, models_dir: Path, tmp_path: Path
) -> None:
    model_file = digits.path / "model.onnx"
    before = model_file.stat().st_mtime_ns
    again = demo.build_digits(models_dir)
    assert again == digits
    assert model_file.stat().st_mtime_ns == before  # not rebuilt
    fresh = demo.build_digits(tmp_path)
    assert (fresh.path / "model.onnx").read_bytes() == model_file.read_bytes()


def test_an_unfinished_build_is_redone(tmp_path: Path) -> None:
    model = demo.build_minilm(tmp_path)
    (model.path / demo.MARKER_FILE).unlink()
    (model.path / "config.json").write_text("half-written")
    demo.build_minilm(tmp_path)
    assert (model.path / demo.MARKER_FILE).is_file()
    assert (model.path / "config.json").read_text().startswith("{")
    # No staging folders are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm-l6"]


def test_minilm_has_its_safe_files_and_no_pickles(models_dir: Path) -> None:
    model = demo.build_minilm(models_dir)
    assert (model.name, model.runtime) == ("minilm-l6", "sentence-embedding")
    files = {p.relative_to(model.path).as_posix() for p in model.path.rglob("*") if p.is_file()}
    assert files == {*demo.MINILM_FILES, demo.MARKER_FILE}
    assert not {Path(f).suffix for f in files} & PICKLE_SUFFIXES


def test_tiny_chat_is_copied_or_reported_missing(tmp_path: Path) -> None:
    try:
        assets = demo.tiny_chat_assets()
    except FileNotFoundError as exc:
        assert "tiny-chat" in str(exc)
        with pytest.raises(FileNotFoundError):
            demo.build_demo_models(tmp_path)
        return
    models = demo.build_demo_models(tmp_path)
    assert [m.name for m in models] == ["digits", "minilm-l6", "tiny-chat"]
    chat = models[2]
    assert chat.runtime == "text-generation"
    assert (chat.path / "config.json").read_bytes() == assets.joinpath("config.json").read_bytes()
    assert not {p.suffix for p in chat.path.rglob("*")} & PICKLE_SUFFIXES
