"""The worker's shield: the DAWN watermark on a classifier's answers and its sealed records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import numpy as np
import pytest

from bastion.models.marks import MarksStore, SealedRecord
from bastion.protection.shield import ModelShield, watermark_rate_of
from bastion.protection.watermark import generate_marks_keypair, open_marks
from bastion.store.db import Database
from bastion.wire.protocol import (
    Caller,
    Infer,
    InferResult,
    ModelMetadata,
    TensorData,
    TensorSpec,
    WatermarkRecord,
)

METADATA = ModelMetadata(
    runtime="onnx",
    capabilities=["infer"],
    inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 8])],
    outputs=[
        TensorSpec(name="label", datatype="INT64", shape=[-1]),
        TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 5]),
    ],
)


def _answer(x: np.ndarray[Any, Any]) -> tuple[Infer, InferResult, np.ndarray[Any, Any]]:
    # A fixed linear model: the same row always gets the same scores.
    logits = x @ np.random.default_rng(42).normal(size=(8, 5))
    scores = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype("<f4")
    best = scores.argmax(axis=1)
    request = Infer(
        id=1,
        inputs=[TensorData(name="input", datatype="FP32", shape=list(x.shape), raw=x.tobytes())],
        caller=Caller(tenant="t", key="k"),
    )
    result = InferResult(
        id=1,
        outputs=[
            TensorData(
                name="label", datatype="INT64", shape=[len(x)], raw=best.astype("<i8").tobytes()
            ),
            TensorData(
                name="probabilities", datatype="FP32", shape=[len(x), 5], raw=scores.tobytes()
            ),
        ],
    )
    return request, result, best


def test_a_keyed_few_answers_change_and_are_recorded_sealed() -> None:
    private, public = generate_marks_keypair()
    options = {"protect.output": "full", "protect.monitor": "off"}
    shield = ModelShield(options, METADATA, None, watermark_key=b"k" * 32, marks_public_key=public)
    x = np.random.default_rng(0).normal(size=(4000, 8)).astype("<f4")
    changed, records = 0, []
    for start in range(0, len(x), 100):
        request, result, best = _answer(x[start : start + 100])
        shown, later = shield.infer(request, result)
        notices = later() if later is not None else []
        labels = np.frombuffer(shown.outputs[0].raw, dtype="<i8")
        scores = np.frombuffer(shown.outputs[1].raw, dtype="<f4").reshape(-1, 5)
        # The label output and the scores tell the same (watermarked) answer.
        assert (labels == scores.argmax(axis=1)).all()
        changed += int((labels != best).sum())
        records += [n for n in notices if isinstance(n, WatermarkRecord)]
    marks = [r for r in records if r.kind == "marks"]
    controls = [r for r in records if r.kind == "controls"]
    assert 0.002 <= changed / len(x) <= 0.01
    assert sum(r.count for r in marks) == changed
    assert controls and all(r.caller == Caller(tenant="t", key="k") for r in records)
    inputs, shown, true = open_marks(private, marks[0].blob)
    assert (shown != true).all() and inputs.shape[1] == 8
    assert not any(inputs[0].tobytes() in r.blob for r in records)
    # The same input always gets the same answer.
    request, result, _ = _answer(inputs[:1].astype("<f4"))
    again, _ = shield.infer(request, result)
    assert np.frombuffer(again.outputs[0].raw, dtype="<i8")[0] == shown[0]


def test_without_a_key_nothing_is_marked_and_the_rate_is_checked() -> None:
    shield = ModelShield({"protect.output": "full", "protect.monitor": "off"}, METADATA, None)
    request, result, _ = _answer(np.ones((50, 8), dtype="<f4"))
    shown, later = shield.infer(request, result)
    assert shown == result and later is None
    assert watermark_rate_of({}) == 0.005
    for bad in ("0", "0.5", "x"):
        with pytest.raises(ValueError, match="watermark_rate"):
            watermark_rate_of({"protect.watermark_rate": bad})


def test_marks_store_keeps_records_for_the_retention_only(db: Database) -> None:
    store = MarksStore(db, retention_days=30)
    old = datetime.now(UTC) - timedelta(days=31)
    store.add(
        [
            SealedRecord("m", "k", "t", "marks", 10, 2, b"sealed-1", created_at=old),
            SealedRecord("m", "k2", "t", "controls", 10, 3, b"sealed-2"),
            SealedRecord("other", None, None, "marks", 10, 1, b"sealed-3"),
        ]
    )
    assert [r.blob for r in store.read("m")] == [b"sealed-1", b"sealed-2"]
    assert [r.blob for r in store.read("m", "k2")] == [b"sealed-2"]
    assert store.expire() == 1
    assert [r.blob for r in store.read("m")] == [b"sealed-2"]


def test_the_monitor_accounts_requests_in_batches_grouped_by_key() -> None:
    shield = ModelShield({"protect.watermark": "off"}, METADATA, None)
    rng = np.random.default_rng(3)
    reports = []
    for i in range(120):
        request, result, _ = _answer(rng.normal(size=(1, 8)).astype("<f4"))
        key = "k1" if i % 2 else "k2"
        request = msgspec.structs.replace(request, caller=Caller(tenant="t", key=key))
        _, later = shield.infer(request, result)
        assert later is None  # nothing to seal: watermark off
        if shield.pending >= 16:
            reports += shield.drain()
    reports += shield.drain()
    assert shield.pending == 0
    assert {r.caller.key for r in reports} == {"k1", "k2"}
    assert shield.monitor is not None
    assert {r.caller: r.queries for r in shield.monitor.snapshot()} == {"k1": 60, "k2": 60}


def test_inputs_of_several_shapes_from_one_key_are_drained_safely() -> None:
    metadata = msgspec.structs.replace(
        METADATA, inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, -1])]
    )
    shield = ModelShield({"protect.watermark": "off"}, metadata, None)
    for width in (8, 8, 6, 8):
        x = np.ones((1, width), dtype="<f4")
        request, result, _ = _answer(np.ones((1, 8), dtype="<f4"))
        raw = TensorData(name="input", datatype="FP32", shape=[1, width], raw=x.tobytes())
        request = msgspec.structs.replace(request, inputs=[raw])
        shield.infer(request, result)
    assert shield.pending == 4
    shield.drain()
    assert shield.pending == 0
