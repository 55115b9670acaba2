"""Output policy of a classifier: what its scores reveal to a caller.

Scores are a model's class probabilities (or logits) in an Open Inference Protocol
answer. Returned in full they let anyone with a key copy the model: equation-solving
(Tramèr et al., USENIX Security 2016) recovers a logistic regression from about d+1
answers. The policy cuts what each answer reveals, in the worker, for plaintext and
encrypted requests alike:

- ``full``: scores as the model gives them;
- ``top_k=K``: only the K most likely classes keep their score; the rest read 0;
- ``decimals=D``: scores rounded to D decimals;
- ``label_only``: one-hot scores (1 for the most likely class, 0 elsewhere).

``top_k`` and ``decimals`` combine. The most likely class never changes: it keeps the
largest score after rounding, so a caller's argmax (and the model's own label output)
are what they were. The default for every model without a policy of its own is
``label_only``: the best class, without its confidence. It leaves an equation-solving
attacker nothing to solve, and unlike ``top_k=1,decimals=2`` (the best class and its
confidence to two decimals, one option away) it also keeps membership inference near
chance: on an overfit model, the confidence is what gives a training record away
(measured in benchmarks/extraction.py).

A model's policy is its ``protect.output`` option (``"full"``, ``"label_only"``, or
``"top_k=3,decimals=2"``); the outputs it applies to are its ``protect.scores`` option
(comma-separated names), by default every floating-point output of shape [batch, classes]
(two or more classes) whose name says it holds scores (prob, score, logit).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from bastion.wire.protocol import InferResult, ModelMetadata, TensorData, TensorSpec

# Model options that set a model's protection; `bastion protect set` changes only these.
PROTECT_PREFIX = "protect."
POLICY_OPTION = "protect.output"
SCORES_OPTION = "protect.scores"
DEFAULT_POLICY = "label_only"
_SCORE_NAME = re.compile(r"prob|score|logit", re.IGNORECASE)
FLOAT_TYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
_MAX_DECIMALS = 8


@dataclass(frozen=True, slots=True)
class OutputPolicy:
    """What the scores of one model's answers reveal; see the module docstring."""

    top_k: int | None = None
    decimals: int | None = None
    label_only: bool = False

    @property
    def full(self) -> bool:
        return self.top_k is None and self.decimals is None and not self.label_only

    @classmethod
    def parse(cls, text: str) -> OutputPolicy:
        """``full``, ``label_only``, or ``top_k=K`` and/or ``decimals=D`` (comma-separated);
        ValueError with the reason otherwise."""
        text = text.strip().lower()
        if text == "full":
            return cls()
        if text == "label_only":
            return cls(label_only=True)
        values: dict[str, int] = {}
        for part in text.split(","):
            key, sep, raw = part.strip().partition("=")
            if not sep or key not in ("top_k", "decimals") or key in values:
                raise ValueError(
                    f"The {POLICY_OPTION} option is full, label_only, or top_k=K and/or "
                    "decimals=D, comma-separated."
                )
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"{key} in {POLICY_OPTION} must be a whole number.") from None
        if values.get("top_k", 1) < 1:
            raise ValueError(f"top_k in {POLICY_OPTION} must be at least 1.")
        if not 0 <= values.get("decimals", 0) <= _MAX_DECIMALS:
            raise ValueError(f"decimals in {POLICY_OPTION} must be 0 to {_MAX_DECIMALS}.")
        return cls(top_k=values.get("top_k"), decimals=values.get("decimals"))

    def describe(self) -> str:
        """The policy as its option text (what the model's metadata shows)."""
        if self.label_only:
            return "label_only"
        if self.full:
            return "full"
        parts = [f"top_k={self.top_k}"] if self.top_k is not None else []
        parts += [f"decimals={self.decimals}"] if self.decimals is not None else []
        return ",".join(parts)

    def apply_scores(self, scores: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """`scores` [batch, classes] as this policy lets a caller see them."""
        if self.full or scores.ndim != 2 or scores.shape[1] < 2:
            return scores
        best = np.argmax(scores, axis=1)
        rows = np.arange(scores.shape[0])
        if self.label_only:
            shown = np.zeros_like(scores)
            shown[rows, best] = 1
            return shown
        shown = scores.copy()
        if self.top_k is not None and self.top_k < scores.shape[1]:
            hidden = np.argsort(-scores, axis=1, kind="stable")[:, self.top_k :]
            np.put_along_axis(shown, hidden, 0, axis=1)
        if self.decimals is not None:
            shown = np.round(shown, self.decimals)
            # Rounding must not demote the most likely class: it keeps the largest score.
            top = shown[rows, best]
            others = shown.copy()
            others[rows, best] = -np.inf
            tied = others.max(axis=1) >= top
            if tied.any():
                step = 10.0**-self.decimals
                shown[rows[tied], best[tied]] = others.max(axis=1)[tied] + step
        return shown.astype(scores.dtype, copy=False)


def policy_of(options: Mapping[str, Any]) -> OutputPolicy:
    """A model's output policy: its option, or the default."""
    return OutputPolicy.parse(str(options.get(POLICY_OPTION, DEFAULT_POLICY)))


def check_policy_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError unless the model's protection options, if any, are valid."""
    if POLICY_OPTION in options:
        OutputPolicy.parse(str(options[POLICY_OPTION]))
    scores = options.get(SCORES_OPTION)
    if scores is not None and (not isinstance(scores, str) or not scores.strip()):
        raise ValueError(f"The {SCORES_OPTION} option is a comma-separated list of outputs.")


def score_outputs(options: Mapping[str, Any], outputs: list[TensorSpec]) -> frozenset[str]:
    """The outputs the policy applies to (see the module docstring)."""
    named = options.get(SCORES_OPTION)
    if isinstance(named, str):
        return frozenset(n.strip() for n in named.split(",") if n.strip())
    return frozenset(
        spec.name
        for spec in outputs
        if spec.datatype in FLOAT_TYPES
        and len(spec.shape) == 2
        and spec.shape[1] != 1
        and _SCORE_NAME.search(spec.name)
    )


class OutputGuard:
    """Applies one model's policy to its answers (in the worker, after the runtime)."""

    def __init__(self, options: Mapping[str, Any], metadata: ModelMetadata) -> None:
        self.policy = policy_of(options)
        infers = "infer" in metadata.capabilities
        self.scores = score_outputs(options, metadata.outputs) if infers else frozenset()

    @property
    def active(self) -> bool:
        return bool(self.scores) and not self.policy.full

    def declare(self, metadata: ModelMetadata) -> ModelMetadata:
        """`metadata` with the policy its answers follow (for clients to see)."""
        if not self.scores:
            return metadata
        declared = {"policy": self.policy.describe(), "scores": sorted(self.scores)}
        return msgspec.structs.replace(metadata, output_policy=declared)

    def apply(self, result: InferResult) -> InferResult:
        if not self.active:
            return result
        outputs = [self._tensor(t) if t.name in self.scores else t for t in result.outputs]
        return msgspec.structs.replace(result, outputs=outputs)

    def _tensor(self, tensor: TensorData) -> TensorData:
        dtype = FLOAT_TYPES.get(tensor.datatype)
        if dtype is None or tensor.items or len(tensor.shape) != 2:
            return tensor
        scores = np.frombuffer(tensor.raw, dtype=dtype).reshape(tensor.shape)
        shown = self.policy.apply_scores(scores)
        return TensorData(
            name=tensor.name,
            datatype=tensor.datatype,
            shape=tensor.shape,
            raw=np.ascontiguousarray(shown, dtype=dtype).tobytes(),
        )
