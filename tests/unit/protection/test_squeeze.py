"""Feature squeezing on digits: FGSM and PGD examples are caught, real digits pass."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bastion.models.demo import digits_split
from bastion.protection.shield import ModelShield
from bastion.protection.squeeze import AdversarialInput, Squeezer
from bastion.wire.protocol import Infer, InferResult, ModelMetadata, TensorData, TensorSpec

Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def victim() -> Any:
    x_train, _, y_train, _ = digits_split()
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(
        x_train, y_train
    )


def _gradient(victim: Any, x: Array, y: Array) -> Array:
    """d(cross-entropy)/dx of the scaled logistic regression (white-box attacker)."""
    weights = victim[1].coef_ / victim[0].scale_
    return (victim.predict_proba(x) - np.eye(10)[y]) @ weights


def _pgd(victim: Any, x: Array, y: Array, eps: float, steps: int) -> Array:
    adversarial = x.copy()
    for _ in range(steps):
        step = eps if steps == 1 else eps / 8
        adversarial = adversarial + step * np.sign(_gradient(victim, adversarial, y))
        adversarial = np.clip(np.clip(adversarial, x - eps, x + eps), 0, 16)
    return adversarial.astype(np.float32)


SQUEEZER = Squeezer(low=0, high=16, bits=1, threshold=1.0)


@pytest.mark.parametrize(("steps", "eps"), [(1, 2.0), (20, 2.0), (1, 4.0)])
def test_adversarial_digits_are_flagged_and_real_ones_rarely(
    victim: Any, steps: int, eps: float
) -> None:
    _, x_test, _, y_test = digits_split()
    adversarial = _pgd(victim, x_test, y_test, eps, steps)
    fooled = (victim.predict(adversarial) != y_test) & (victim.predict(x_test) == y_test)
    assert fooled.mean() > 0.8  # the attack works without the detector
    flagged = SQUEEZER.suspects(
        adversarial, victim.predict_proba(adversarial), victim.predict_proba
    )
    assert flagged[fooled].mean() >= 0.7
    false_positives = SQUEEZER.suspects(x_test, victim.predict_proba(x_test), victim.predict_proba)
    assert false_positives.mean() <= 0.08


def test_squeezers() -> None:
    x = np.array([[0.0, 7.9, 8.1, 16.0]], dtype=np.float32)
    (bits,) = Squeezer(low=0, high=16, bits=1).squeezed(x)
    assert bits.tolist() == [[0.0, 0.0, 16.0, 16.0]] and bits.dtype == np.float32
    image = np.array([[1, 9, 1, 1]], dtype=np.float32)  # 2 x 2
    (_, smoothed) = Squeezer(low=0, high=16, bits=2, image=(2, 2)).squeezed(image)
    assert smoothed.shape == image.shape and smoothed.max() < 9


@pytest.mark.parametrize(
    "options",
    [
        {"protect.squeeze": "maybe"},
        {"protect.squeeze": "on", "protect.squeeze_range": "16,0"},
        {"protect.squeeze": "on", "protect.squeeze_bits": "x"},
        {"protect.squeeze": "on", "protect.squeeze_threshold": "0"},
        {"protect.squeeze": "on", "protect.squeeze_image": "1,8"},
        {"protect.squeeze": "on", "protect.squeeze_bits": "0"},
    ],
)
def test_bad_options_are_refused(options: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="squeeze"):
        Squeezer.from_options(options)


def test_off_by_default() -> None:
    assert Squeezer.from_options({}) is None


def _tensor(name: str, values: Array) -> TensorData:
    return TensorData(
        name=name, datatype="FP32", shape=list(values.shape), raw=values.astype("<f4").tobytes()
    )


def test_the_shield_refuses_an_adversarial_request(victim: Any) -> None:
    metadata = ModelMetadata(
        runtime="onnx",
        capabilities=["infer"],
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])],
    )
    options = {"protect.squeeze": "on", "protect.squeeze_range": "0,16"}
    shield = ModelShield(options, metadata, None)

    def run(request: Infer) -> InferResult:
        x = np.frombuffer(request.inputs[0].raw, dtype="<f4").reshape(request.inputs[0].shape)
        return InferResult(id=0, outputs=[_tensor("probabilities", victim.predict_proba(x))])

    _, x_test, _, y_test = digits_split()
    clean = Infer(id=1, inputs=[_tensor("input", x_test[:1])])
    shown, _ = shield.infer(clean, run(clean), run)
    assert shown.outputs[0].name == "probabilities"
    adversarial = _pgd(victim, x_test[:40], y_test[:40], 2.0, 20)
    refused = 0
    for row in adversarial:
        request = Infer(id=1, inputs=[_tensor("input", row[None])])
        try:
            shield.infer(request, run(request), run)
        except AdversarialInput as exc:
            assert "squeezed" in str(exc)
            refused += 1
    assert refused >= 28
