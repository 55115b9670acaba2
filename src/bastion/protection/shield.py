"""Everything the worker does to protect a classifier's answers, in one place.

After the runtime answers an Open Inference Protocol request, :class:`ModelShield`

1. reads the scores the model computed and its predicted classes;
2. accounts the request in the extraction monitor of its caller's key
   (:mod:`.monitor`), which may return a report for the gateway;
3. applies the output policy (:mod:`.output`) to what the caller sees.

It holds for plaintext and end-to-end encrypted requests alike: both are answered here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import numpy as np

from bastion.protection.monitor import (
    ExtractionMonitor,
    Reference,
    RiskReport,
    monitor_policy_of,
)
from bastion.protection.output import FLOAT_TYPES, OutputGuard
from bastion.protection.squeeze import AdversarialInput, Squeezer
from bastion.wire.protocol import Infer, InferResult, ModelMetadata, TensorData


def _array(tensor: TensorData) -> np.ndarray[Any, Any] | None:
    dtype = FLOAT_TYPES.get(tensor.datatype)
    if dtype is None or tensor.items or not tensor.shape:
        return None
    count = int(np.prod(tensor.shape))
    if count * dtype.itemsize != len(tensor.raw):
        return None
    return np.frombuffer(tensor.raw, dtype=dtype).reshape(tensor.shape)


class ModelShield:
    """One model's protection in its worker; see the module docstring."""

    def __init__(
        self, options: Mapping[str, Any], metadata: ModelMetadata, reference: Reference | None
    ) -> None:
        self.guard = OutputGuard(options, metadata)
        policy = monitor_policy_of(options)
        # Only classifiers are watched: their answers are what an extraction copies.
        watched = bool(self.guard.scores) and policy.enabled
        self.monitor = ExtractionMonitor(policy, reference) if watched else None
        self.reference = reference
        squeezer = Squeezer.from_options(options)
        self.squeezer = squeezer if self.guard.scores else None

    def declare(self, metadata: ModelMetadata) -> ModelMetadata:
        """`metadata` with the protection its answers get (for clients to see)."""
        declared = self.guard.declare(metadata)
        if self.monitor is None or declared.output_policy is None:
            return declared
        policy = {
            **declared.output_policy,
            "monitor": self.monitor.policy.describe(),
            "reference": self.reference is not None,
            "squeeze": self.squeezer is not None,
        }
        return msgspec.structs.replace(declared, output_policy=policy)

    def reset(self, key: str) -> None:
        if self.monitor is not None:
            self.monitor.reset(key)

    def infer(
        self,
        request: Infer,
        result: InferResult,
        rerun: Callable[[Infer], InferResult] | None = None,
    ) -> tuple[InferResult, RiskReport | None]:
        """The answer the caller sees, and the monitor's report if it has one. With
        feature squeezing on, `rerun` asks the model again (on squeezed inputs); an input
        whose prediction moves too much raises AdversarialInput."""
        if self.squeezer is not None and rerun is not None:
            self._squeeze(request, result, rerun)
        report = None
        if self.monitor is not None and request.caller is not None and request.inputs:
            report = self._observe(request, result)
        return self.guard.apply(result), report

    def _scores(self, result: InferResult) -> np.ndarray[Any, Any] | None:
        return next((_array(t) for t in result.outputs if t.name in self.guard.scores), None)

    def _squeeze(
        self, request: Infer, result: InferResult, rerun: Callable[[Infer], InferResult]
    ) -> None:
        assert self.squeezer is not None
        first = request.inputs[0] if request.inputs else None
        inputs = _array(first) if first is not None else None
        scores = self._scores(result)
        if first is None or inputs is None or scores is None or scores.ndim != 2:
            return

        def predict(squeezed: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            tensor = msgspec.structs.replace(first, raw=squeezed.tobytes())
            inputs_again = [tensor, *request.inputs[1:]]
            again = self._scores(rerun(msgspec.structs.replace(request, inputs=inputs_again)))
            if again is None or again.shape != scores.shape:
                raise AdversarialInput("the model's answer to a squeezed input has no scores")
            return again

        if self.squeezer.suspects(inputs, scores, predict).any():
            raise AdversarialInput(
                "The input looks adversarial: the model's prediction changes when it is "
                "squeezed (feature squeezing)."
            )

    def _observe(self, request: Infer, result: InferResult) -> RiskReport | None:
        assert self.monitor is not None and request.caller is not None
        inputs = _array(request.inputs[0])
        scores = next((_array(t) for t in result.outputs if t.name in self.guard.scores), None)
        if inputs is None or scores is None or scores.ndim != 2:
            return None
        if inputs.shape[0] != scores.shape[0]:
            return None
        predicted = np.argmax(scores, axis=1)
        caller = request.caller
        return self.monitor.observe(caller.key, caller.tenant, inputs, predicted)
