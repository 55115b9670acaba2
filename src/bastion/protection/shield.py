"""Everything the worker does to protect a classifier's answers, in one place.

After the runtime answers an Open Inference Protocol request, :class:`ModelShield`

1. reads the scores the model computed and its predicted classes;
2. with feature squeezing on, asks the model again on squeezed inputs and refuses an
   input whose prediction moves too much (:mod:`.squeeze`);
3. accounts the request in the extraction monitor of its caller's key
   (:mod:`.monitor`), which may return a report for the gateway;
4. changes the keyed few answers of the ownership watermark and seals a record of them
   (and of a keyed sample of plain answers) to the owner's key (:mod:`.watermark`);
5. applies the output policy (:mod:`.output`) to what the caller sees.

It holds for plaintext and end-to-end encrypted requests alike: both are answered here.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from bastion.protection.monitor import (
    ExtractionMonitor,
    MonitorPolicy,
    Reference,
    RiskReport,
    features_of,
    monitor_policy_of,
)
from bastion.protection.output import FLOAT_TYPES, OutputGuard
from bastion.protection.squeeze import AdversarialInput, Squeezer
from bastion.protection.watermark import MAX_RATE, ClassifierWatermark, seal_marks
from bastion.wire.protocol import (
    Caller,
    ExtractionRisk,
    Infer,
    InferResult,
    ModelMetadata,
    Notice,
    TensorData,
    WatermarkRecord,
)

# A request waiting for the monitor: key, tenant, policy, input rows, predicted classes.
Pending = tuple[str, str, "MonitorPolicy", np.ndarray[Any, Any], np.ndarray[Any, Any]]
# Distinct override sets a worker keeps a policy for (more: the cache starts over).
MAX_VARIANTS = 256


@dataclass(frozen=True, slots=True)
class _Variant:
    guard: OutputGuard
    monitor: MonitorPolicy
    watermark: bool


def watermark_on(options: Mapping[str, Any]) -> bool:
    """Whether the model's answers carry its ownership watermark (on by default)."""
    return str(options.get(WATERMARK_OPTION, "on")).strip().lower() == "on"


WATERMARK_OPTION = "protect.watermark"
_INT_TYPES: dict[str, np.dtype[Any]] = {"INT64": np.dtype("<i8"), "INT32": np.dtype("<i4")}
WATERMARK_RATE_OPTION = "protect.watermark_rate"
DEFAULT_WATERMARK_RATE = 0.005


def watermark_rate_of(options: Mapping[str, Any]) -> float:
    """The share of a classifier's answers its watermark changes; ValueError if invalid."""
    try:
        rate = float(options.get(WATERMARK_RATE_OPTION, DEFAULT_WATERMARK_RATE))
    except (TypeError, ValueError):
        raise ValueError(f"{WATERMARK_RATE_OPTION} is a share of answers (0.005).") from None
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"{WATERMARK_RATE_OPTION} must be above 0 and at most {MAX_RATE}.")
    return rate


def _subkey(key: bytes, purpose: bytes) -> bytes:
    return hmac.new(key, b"bastion classifier watermark v1 " + purpose, hashlib.sha256).digest()


def _is_label_output(tensor: TensorData, best: np.ndarray[Any, Any]) -> bool:
    """An integer output [batch] holding the model's predicted classes (its "label")."""
    dtype = _INT_TYPES.get(tensor.datatype)
    if dtype is None or tensor.items or tensor.shape != [len(best)]:
        return False
    values = np.frombuffer(tensor.raw, dtype=dtype)
    return bool(len(values) == len(best) and (values == best).all())


def _risk_message(report: RiskReport) -> ExtractionRisk:
    return ExtractionRisk(
        caller=Caller(tenant=report.tenant, key=report.caller),
        risk=report.risk,
        level=report.level,
        queries=report.queries,
        signals=report.signals,
    )


def _array(tensor: TensorData) -> np.ndarray[Any, Any] | None:
    dtype = FLOAT_TYPES.get(tensor.datatype)
    if dtype is None or tensor.items or not tensor.shape:
        return None
    if math.prod(tensor.shape) * dtype.itemsize != len(tensor.raw):
        return None
    return np.frombuffer(tensor.raw, dtype=dtype).reshape(tensor.shape)


class ModelShield:
    """One model's protection in its worker; see the module docstring."""

    def __init__(
        self,
        options: Mapping[str, Any],
        metadata: ModelMetadata,
        reference: Reference | None,
        *,
        watermark_key: bytes | None = None,
        marks_public_key: bytes | None = None,
    ) -> None:
        self._options = dict(options)
        self._metadata = metadata
        self._variants: dict[frozenset[tuple[str, str]], _Variant] = {}
        self._pending: list[Pending] = []
        self.guard = OutputGuard(options, metadata)
        policy = monitor_policy_of(options)
        # Only classifiers are watched: their answers are what an extraction copies.
        watched = bool(self.guard.scores) and policy.enabled
        self.monitor = ExtractionMonitor(policy, reference) if watched else None
        self.reference = reference
        squeezer = Squeezer.from_options(options)
        self.squeezer = squeezer if self.guard.scores else None
        # The ownership watermark (DAWN): a keyed few answers changed, and recorded sealed
        # to the owner's key with a keyed sample of plain answers (the controls).
        self.watermark: ClassifierWatermark | None = None
        self._marks_key = marks_public_key
        if self.guard.scores and watermark_key is not None and marks_public_key is not None:
            rate = watermark_rate_of(options)
            self.watermark = ClassifierWatermark(_subkey(watermark_key, b"marks"), rate)

    def declare(self, metadata: ModelMetadata) -> ModelMetadata:
        """`metadata` with the protection its answers get (for clients to see)."""
        declared = self.guard.declare(metadata)
        if declared.output_policy is None:
            return declared
        if self.monitor is None:
            return msgspec.structs.replace(
                declared, output_policy={**declared.output_policy, **self._marked()}
            )
        policy = {
            **declared.output_policy,
            "monitor": self.monitor.policy.describe(),
            "reference": self.reference is not None,
            "squeeze": self.squeezer is not None,
        }
        policy.update(self._marked())
        return msgspec.structs.replace(declared, output_policy=policy)

    def _marked(self) -> dict[str, Any]:
        if self.watermark is None:
            return {}
        return {"watermark": {"scheme": "dawn", "rate": self.watermark.rate}}

    def reset(self, key: str) -> None:
        if self.monitor is not None:
            self.monitor.reset(key)

    def infer(
        self,
        request: Infer,
        result: InferResult,
        rerun: Callable[[Infer], InferResult] | None = None,
    ) -> tuple[InferResult, Callable[[], list[Notice]] | None]:
        """The answer the caller sees, and the work that can wait until it has been sent
        (the monitor's accounting, the sealing of watermark records), which returns what
        to tell the gateway. With feature squeezing on, `rerun` asks the model again (on
        squeezed inputs); an input whose prediction moves too much raises
        AdversarialInput."""
        if self.squeezer is not None and rerun is not None:
            self._squeeze(request, result, rerun)
        caller = request.caller
        variant = self._variant(caller.protect if caller is not None else {})
        watching = self.monitor is not None and caller is not None
        marking = self.watermark is not None and variant.watermark
        if not (watching or marking) or not request.inputs:
            return variant.guard.apply(result), None
        inputs = _array(request.inputs[0])
        scores = self._scores(result)
        if inputs is None or scores is None or scores.ndim != 2 or len(inputs) != len(scores):
            return variant.guard.apply(result), None
        best = np.argmax(scores, axis=1)
        marked = controls = None
        if marking and self._markable(result, scores, best):
            assert self.watermark is not None
            marked, controls = self.watermark.select_with_controls(inputs)
            marked_labels = best
            if marked.any():
                marked_scores, marked = self.watermark.apply(inputs, scores)
                marked_labels = np.argmax(marked_scores, axis=1)
                # Exactly tied scores: the swap changed nothing, so nothing is marked.
                marked &= marked_labels != best
                if marked.any():
                    result = self._answer_marked(result, marked, marked_labels, best)

        if watching:
            assert caller is not None
            # Accounted in batches (drain): one vectorised pass over many requests' rows.
            self._pending.append((caller.key, caller.tenant, variant.monitor, inputs, best))
        if marked is None or controls is None or not (marked.any() or controls.any()):
            return variant.guard.apply(result), None
        chosen = (marked, controls)

        def later() -> list[Notice]:
            notices: list[Notice] = []
            self._record(request, inputs, best, chosen, marked_labels, scores, notices)
            return notices

        return variant.guard.apply(result), later

    @property
    def pending(self) -> int:
        """Requests waiting to be accounted by the extraction monitor."""
        return len(self._pending)

    def drain(self) -> list[Notice]:
        """Account the waiting requests in the monitor, grouped by key (and policy), and
        return its reports."""
        if self.monitor is None or not self._pending:
            self._pending.clear()
            return []
        pending, self._pending = self._pending, []
        groups: dict[tuple[str, MonitorPolicy], list[Pending]] = {}
        for item in pending:
            groups.setdefault((item[0], item[2]), []).append(item)
        notices: list[Notice] = []
        for (key, policy), items in groups.items():
            # Inputs of several shapes (a model with free dimensions) are watched as the
            # monitor's fixed-width rows, each width on its own.
            by_width: dict[int, list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]] = {}
            for item in items:
                rows = features_of(item[3])
                by_width.setdefault(rows.shape[1], []).append((rows, item[4]))
            for parts in by_width.values():
                rows = np.concatenate([p[0] for p in parts])
                labels = np.concatenate([p[1] for p in parts])
                report = self.monitor.observe(key, items[0][1], rows, labels, policy)
                if report is not None:
                    notices.append(_risk_message(report))
        return notices

    def _variant(self, overrides: Mapping[str, str]) -> _Variant:
        """The policy a caller's requests get: the model's, with the caller's tenant or key
        overrides on top (cached per set of overrides)."""
        key = frozenset(overrides.items())
        variant = self._variants.get(key)
        if variant is None:
            options = {**self._options, **overrides}
            try:
                variant = _Variant(
                    guard=OutputGuard(options, self._metadata) if overrides else self.guard,
                    monitor=monitor_policy_of(options),
                    watermark=watermark_on(options),
                )
            except ValueError:
                # Checked when set; should one slip through, the model's own policy holds.
                variant = _Variant(self.guard, monitor_policy_of(self._options), True)
            if len(self._variants) >= MAX_VARIANTS:
                self._variants.clear()
            self._variants[key] = variant
        return variant

    def _markable(
        self, result: InferResult, scores: np.ndarray[Any, Any], best: np.ndarray[Any, Any]
    ) -> bool:
        """Whether this answer can carry the watermark consistently: two or more classes,
        and every integer output of the batch's length is the predicted class index (a
        label output of other class ids would give the marked rows away)."""
        if scores.shape[1] < 2:
            return False
        return all(
            _is_label_output(tensor, best)
            for tensor in result.outputs
            if tensor.datatype in _INT_TYPES and tensor.shape == [len(best)]
        )

    def _answer_marked(
        self,
        result: InferResult,
        marked: np.ndarray[Any, Any],
        shown: np.ndarray[Any, Any],
        best: np.ndarray[Any, Any],
    ) -> InferResult:
        """The answer with its marked rows changed: in every score output, the scores of
        the best class and of the watermark class trade places; the label output says
        the watermark class."""
        rows = np.flatnonzero(marked)
        outputs = []
        for tensor in result.outputs:
            if tensor.name in self.guard.scores:
                values = _array(tensor)
                if values is not None and values.ndim == 2 and values.shape[0] == len(best):
                    swapped = values.copy()
                    swapped[rows, best[rows]] = values[rows, shown[rows]]
                    swapped[rows, shown[rows]] = values[rows, best[rows]]
                    raw = np.ascontiguousarray(swapped).tobytes()
                    tensor = msgspec.structs.replace(tensor, raw=raw)
            elif tensor.datatype in _INT_TYPES and tensor.shape == [len(best)]:
                raw = np.ascontiguousarray(shown, dtype=_INT_TYPES[tensor.datatype]).tobytes()
                tensor = msgspec.structs.replace(tensor, raw=raw)
            outputs.append(tensor)
        return msgspec.structs.replace(result, outputs=outputs)

    def _record(
        self,
        request: Infer,
        inputs: np.ndarray[Any, Any],
        best: np.ndarray[Any, Any],
        selected: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
        shown: np.ndarray[Any, Any],
        scores: np.ndarray[Any, Any],
        notices: list[Notice],
    ) -> None:
        """Seal the marked rows, and the keyed sample of plain ones (the controls), to the
        owner's key."""
        assert self._marks_key is not None
        marked, controls = selected
        for kind, rows, labels in (("marks", marked, shown), ("controls", controls, best)):
            if rows.any():
                blob = seal_marks(self._marks_key, inputs[rows], labels[rows], best[rows])
                notices.append(
                    WatermarkRecord(
                        caller=request.caller,
                        kind=kind,
                        classes=int(scores.shape[1]),
                        count=int(rows.sum()),
                        blob=blob,
                    )
                )

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
