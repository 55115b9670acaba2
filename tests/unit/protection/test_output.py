"""The output policy of classifiers: what an answer's scores reveal."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from bastion.protection.output import (
    DEFAULT_POLICY,
    OutputGuard,
    OutputPolicy,
    check_policy_options,
    policy_of,
    score_outputs,
)
from bastion.wire.protocol import InferResult, ModelMetadata, TensorData, TensorSpec

pytestmark = pytest.mark.unit

SCORES = np.array(
    [[0.05, 0.6, 0.3, 0.05], [0.25, 0.25, 0.2, 0.3], [0.001, 0.0049, 0.004, 0.9901]],
    dtype=np.float32,
)


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("full", OutputPolicy()),
        ("label_only", OutputPolicy(label_only=True)),
        ("top_k=3", OutputPolicy(top_k=3)),
        ("decimals=1", OutputPolicy(decimals=1)),
        (" top_k=2, decimals=2 ", OutputPolicy(top_k=2, decimals=2)),
    ],
)
def test_policies_parse_and_describe_themselves(text: str, policy: OutputPolicy) -> None:
    assert OutputPolicy.parse(text) == policy
    assert OutputPolicy.parse(policy.describe()) == policy


@pytest.mark.parametrize(
    "text",
    ["", "top_k", "top_k=0", "top_k=x", "decimals=-1", "decimals=9", "k=1", "top_k=1,top_k=2"],
)
def test_bad_policies_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"protect\.output|top_k|decimals"):
        OutputPolicy.parse(text)
    with pytest.raises(ValueError):
        check_policy_options({"protect.output": text})


def test_the_default_is_the_best_class_alone() -> None:
    assert policy_of({}) == OutputPolicy.parse(DEFAULT_POLICY) == OutputPolicy(label_only=True)
    shown = policy_of({}).apply_scores(SCORES)
    assert (np.count_nonzero(shown, axis=1) == 1).all()
    assert (shown.argmax(axis=1) == SCORES.argmax(axis=1)).all()
    np.testing.assert_allclose(shown.max(axis=1), [1.0, 1.0, 1.0])


def test_top_k_keeps_only_the_k_best_and_full_keeps_everything() -> None:
    shown = OutputPolicy(top_k=2).apply_scores(SCORES)
    assert (np.count_nonzero(shown, axis=1) == 2).all()
    np.testing.assert_allclose(shown[0], [0, 0.6, 0.3, 0], atol=1e-7)
    assert OutputPolicy().apply_scores(SCORES) is SCORES


def test_label_only_is_one_hot() -> None:
    shown = OutputPolicy(label_only=True).apply_scores(SCORES)
    np.testing.assert_array_equal(shown.sum(axis=1), [1, 1, 1])
    assert (shown.argmax(axis=1) == SCORES.argmax(axis=1)).all()


def test_rounding_never_demotes_the_most_likely_class() -> None:
    # 0.3 vs 0.25 survives one decimal as 0.3 vs 0.2 (fine); 0.0049 vs 0.004 at two
    # decimals both read 0.00 and the best must still stand out: no ties with the best.
    close = np.array([[0.26, 0.25, 0.49], [0.0049, 0.004, 0.0]], dtype=np.float32)
    for decimals in (0, 1, 2):
        shown = OutputPolicy(decimals=decimals).apply_scores(close)
        best = close.argmax(axis=1)
        rows = np.arange(len(close))
        others = shown.copy()
        others[rows, best] = -1
        assert (shown[rows, best] > others.max(axis=1)).all(), (decimals, shown)


def test_scores_are_found_by_name_and_shape_or_named_by_option() -> None:
    outputs = [
        TensorSpec(name="label", datatype="INT64", shape=[-1]),
        TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10]),
        TensorSpec(name="embedding", datatype="FP32", shape=[-1, 384]),
        TensorSpec(name="logit", datatype="FP32", shape=[-1, 1]),
    ]
    assert score_outputs({}, outputs) == {"probabilities"}
    assert score_outputs({"protect.scores": "embedding, logit"}, outputs) == {"embedding", "logit"}


def _metadata() -> ModelMetadata:
    return ModelMetadata(
        runtime="onnx",
        capabilities=["infer"],
        outputs=[
            TensorSpec(name="label", datatype="INT64", shape=[-1]),
            TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 4]),
        ],
    )


def _result() -> InferResult:
    labels = SCORES.argmax(axis=1).astype("<i8")
    return InferResult(
        id=7,
        outputs=[
            TensorData(name="label", datatype="INT64", shape=[3], raw=labels.tobytes()),
            TensorData(name="probabilities", datatype="FP32", shape=[3, 4], raw=SCORES.tobytes()),
        ],
        compute_s=0.5,
    )


def test_the_guard_changes_the_scores_of_an_answer_and_nothing_else() -> None:
    guard = OutputGuard({}, _metadata())
    result = guard.apply(_result())
    assert result.id == 7 and result.compute_s == 0.5
    label, probabilities = result.outputs
    assert label == _result().outputs[0]
    shown = np.frombuffer(probabilities.raw, dtype="<f4").reshape(3, 4)
    assert (np.count_nonzero(shown, axis=1) == 1).all()
    declared = guard.declare(_metadata())
    assert declared.output_policy == {"policy": "label_only", "scores": ["probabilities"]}
    # The declaration travels to the gateway with the rest of the metadata.
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(declared), type=ModelMetadata) == declared


def test_a_full_policy_leaves_answers_alone_and_says_so() -> None:
    guard = OutputGuard({"protect.output": "full"}, _metadata())
    assert guard.apply(_result()) == _result()
    assert guard.declare(_metadata()).output_policy == {
        "policy": "full",
        "scores": ["probabilities"],
    }


def test_models_without_scores_declare_nothing() -> None:
    text = ModelMetadata(runtime="echo", capabilities=["chat"])
    guard = OutputGuard({}, text)
    assert not guard.active and guard.declare(text).output_policy is None
