"""Feature squeezing: an optional detector of adversarial inputs to a classifier.

Xu, Evans and Qi (NDSS 2018): an adversarial example is a small, carefully chosen change
to an input; "squeezing" the input (fewer bits per value, a median filter over an image)
removes most of such a change while leaving a natural input's prediction alone. So the
model is asked again on the squeezed copies, and when its scores move by more than a
threshold (L1 distance between probability vectors), the input is refused as suspect.

Options of a model (all under ``protect.``):

- ``squeeze=on`` turns it on (default off: it runs the model once more per squeezer);
- ``squeeze_range=LO,HI``: the range of the input values (default 0,1);
- ``squeeze_bits=N``: bit depth the values are reduced to (default 1; 0 turns it off);
- ``squeeze_image=H,W``: the input is an H x W image (rows are reshaped, channels last
  if any): adds a 2 x 2 median filter;
- ``squeeze_threshold=T``: the L1 distance above which an input is refused (default 1.0,
  about 5 % of real digits; calibrate it on a model's own real inputs with
  benchmarks/extraction.py's ``evasion`` table).

What it measured on digits is in docs/model-protection.md; it does not stop an attacker
who knows the squeezers and optimises against them (Xu et al. say so too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SQUEEZE_OPTION = "protect.squeeze"
RANGE_OPTION = "protect.squeeze_range"
BITS_OPTION = "protect.squeeze_bits"
IMAGE_OPTION = "protect.squeeze_image"
THRESHOLD_OPTION = "protect.squeeze_threshold"
DEFAULT_BITS = 1
DEFAULT_THRESHOLD = 1.0

Array = np.ndarray[Any, Any]


class AdversarialInput(Exception):
    """The request's prediction moved too much when its input was squeezed."""


def _pair(options: Mapping[str, Any], name: str, kind: type, default: tuple[Any, Any]) -> Any:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        first, second = (kind(part) for part in str(raw).split(","))
    except ValueError:
        raise ValueError(f"{name} is two numbers, comma-separated.") from None
    return first, second


@dataclass(frozen=True, slots=True)
class Squeezer:
    """The squeezers of one model and the threshold its scores may move by."""

    low: float = 0.0
    high: float = 1.0
    bits: int = DEFAULT_BITS
    image: tuple[int, int] | None = None
    threshold: float = DEFAULT_THRESHOLD

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Squeezer | None:
        """The model's squeezer, None when off; ValueError if an option is not valid."""
        enabled = str(options.get(SQUEEZE_OPTION, "off")).strip().lower()
        if enabled not in ("on", "off"):
            raise ValueError(f"{SQUEEZE_OPTION} is on or off.")
        low, high = _pair(options, RANGE_OPTION, float, (0.0, 1.0))
        try:
            bits = int(options.get(BITS_OPTION, DEFAULT_BITS))
            threshold = float(options.get(THRESHOLD_OPTION, DEFAULT_THRESHOLD))
        except (TypeError, ValueError):
            raise ValueError(f"{BITS_OPTION} and {THRESHOLD_OPTION} are numbers.") from None
        image = _pair(options, IMAGE_OPTION, int, (0, 0)) if IMAGE_OPTION in options else None
        if not high > low or not 0 <= bits <= 16 or not 0 < threshold <= 2:
            raise ValueError(
                f"{RANGE_OPTION} needs LO < HI, {BITS_OPTION} 0-16, {THRESHOLD_OPTION} in (0, 2]."
            )
        if image is not None and (image[0] < 2 or image[1] < 2):
            raise ValueError(f"{IMAGE_OPTION} is H,W (each at least 2).")
        if bits == 0 and image is None:
            raise ValueError(f"{SQUEEZE_OPTION}=on needs {BITS_OPTION} > 0 or {IMAGE_OPTION}.")
        if enabled == "off":
            return None
        return cls(low=low, high=high, bits=bits, image=image, threshold=threshold)

    def squeezed(self, inputs: Array) -> list[Array]:
        """The squeezed copies of a batch of inputs ([batch, ...])."""
        copies = []
        if self.bits:
            levels = 2**self.bits - 1
            scaled = np.clip((inputs - self.low) / (self.high - self.low), 0, 1)
            copies.append(np.rint(scaled * levels) / levels * (self.high - self.low) + self.low)
        if self.image is not None:
            copies.append(self._median(inputs))
        return [c.astype(inputs.dtype, copy=False) for c in copies]

    def _median(self, inputs: Array) -> Array:
        assert self.image is not None
        height, width = self.image
        rows = inputs.reshape(inputs.shape[0], height, width, -1)
        # A 2 x 2 median over each pixel and its right, lower and lower-right neighbours
        # (edges repeat), as Xu et al.'s smallest local smoothing.
        padded = np.pad(rows, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
        stack = np.stack(
            [
                padded[:, :-1, :-1],
                padded[:, 1:, :-1],
                padded[:, :-1, 1:],
                padded[:, 1:, 1:],
            ]
        )
        smoothed: Array = np.median(stack, axis=0).reshape(inputs.shape)
        return smoothed

    def distances(self, scores: Array, squeezed_scores: list[Array]) -> Array:
        """Per row, the largest L1 distance between the scores and a squeezed copy's."""
        moved: Array = np.max(
            [np.abs(scores - other).sum(axis=1) for other in squeezed_scores], axis=0
        )
        return moved

    def suspects(self, inputs: Array, scores: Array, predict: Callable[[Array], Array]) -> Array:
        """Rows whose prediction moves by more than the threshold when squeezed."""
        squeezed = [predict(copy) for copy in self.squeezed(inputs)]
        flagged: Array = self.distances(scores, squeezed) > self.threshold
        return flagged
