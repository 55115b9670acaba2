"""A model's batching settings, read from its options by the gateway and its worker alike.

Dynamic batching follows Triton's semantics: the worker runs up to ``batch.max_size``
requests of a model in one runtime call; when fewer are waiting, it waits at most
``batch.max_queue_delay_us`` microseconds (counted from the oldest one's arrival) for
more, and a batch of one of the ``batch.preferred_sizes`` is sent as soon as it can be
formed. With no delay (the default), a batch is whatever is waiting when the model is
free: no request ever waits for company, yet under load requests pile up while a batch
runs and the next batch is full.

For text generation, ``batch.max_size`` is the most sequences decoded together
(continuous batching); 1 turns batching off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

MAX_SIZE_OPTION = "batch.max_size"
DELAY_OPTION = "batch.max_queue_delay_us"
PREFERRED_OPTION = "batch.preferred_sizes"
BATCH_OPTIONS = (MAX_SIZE_OPTION, DELAY_OPTION, PREFERRED_OPTION)

# Bounds: a batch is built in one worker's memory, and a delay holds answers back.
MAX_BATCH_SIZE = 1024
MAX_QUEUE_DELAY_US = 1_000_000


class BatchPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a model's worker batches requests; ``max_size`` 1 means it does not."""

    max_size: int = 1
    max_queue_delay_us: int = 0
    preferred_sizes: tuple[int, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.max_size > 1

    def describe(self) -> dict[str, Any]:
        """As shown in the model's metadata (Triton's names)."""
        return {
            "max_batch_size": self.max_size,
            "max_queue_delay_microseconds": self.max_queue_delay_us,
            "preferred_batch_size": list(self.preferred_sizes),
        }

    def ready(self, waiting: int) -> bool:
        """Whether a batch of `waiting` requests should go now rather than wait for more."""
        return waiting >= self.max_size or waiting in self.preferred_sizes

    def take(self, waiting: int) -> int:
        """How many of `waiting` requests (the delay over) form the next batch: the largest
        preferred size that fits, else all of them up to ``max_size``."""
        fits = [size for size in self.preferred_sizes if size <= waiting]
        return max(fits) if fits else min(waiting, self.max_size)


def _int_option(options: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = options.get(name, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"The {name} option must be an integer from {low} to {high}.")
    return value


def batch_policy_of(options: Mapping[str, Any], default: BatchPolicy | None = None) -> BatchPolicy:
    """The batching a model's options ask for (`default` where they say nothing);
    ValueError if they are invalid."""
    base = default or BatchPolicy()
    if not any(name in options for name in BATCH_OPTIONS):
        return base
    max_size = _int_option(options, MAX_SIZE_OPTION, base.max_size, 1, MAX_BATCH_SIZE)
    delay = _int_option(options, DELAY_OPTION, base.max_queue_delay_us, 0, MAX_QUEUE_DELAY_US)
    raw = options.get(PREFERRED_OPTION, list(base.preferred_sizes))
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, list | tuple):
        raise ValueError(f"The {PREFERRED_OPTION} option must be a list of batch sizes.")
    preferred: list[int] = []
    for item in raw:
        size = _int_option({PREFERRED_OPTION: item}, PREFERRED_OPTION, 1, 1, max_size)
        if size not in preferred:
            preferred.append(size)
    return BatchPolicy(
        max_size=max_size, max_queue_delay_us=delay, preferred_sizes=tuple(sorted(preferred))
    )


def check_batch_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError unless the model's batching options are valid."""
    batch_policy_of(options)


# Batching a runtime does unless its model's options say otherwise: an embedding model's
# rows are independent by construction, and text generation decodes sequences together.
# A classifier (ONNX) batches only when its owner says its rows are independent.
RUNTIME_DEFAULTS: Mapping[str, BatchPolicy] = {
    "sentence-embedding": BatchPolicy(max_size=32),
    "text-generation": BatchPolicy(max_size=8),
}


def model_batch_policy(runtime: str, options: Mapping[str, Any]) -> BatchPolicy:
    """A model's batching: its options over its runtime's default; an invalid setting
    (refused when the model is registered) counts as no batching."""
    try:
        return batch_policy_of(options, RUNTIME_DEFAULTS.get(runtime))
    except ValueError:
        return BatchPolicy()
