"""Batching settings from a model's options, with Triton's semantics."""

from __future__ import annotations

import pytest

from bastion.wire.batching import (
    BatchPolicy,
    batch_policy_of,
    check_batch_options,
    model_batch_policy,
)


def test_no_options_no_batching() -> None:
    assert not batch_policy_of({}).enabled
    assert batch_policy_of({"threads": 2}) == BatchPolicy()


def test_options_set_the_policy_and_metadata_uses_tritons_names() -> None:
    policy = batch_policy_of(
        {
            "batch.max_size": 32,
            "batch.max_queue_delay_us": "500",
            "batch.preferred_sizes": [16, 8, 8],
        }
    )
    assert policy == BatchPolicy(max_size=32, max_queue_delay_us=500, preferred_sizes=(8, 16))
    assert policy.describe() == {
        "max_batch_size": 32,
        "max_queue_delay_microseconds": 500,
        "preferred_batch_size": [8, 16],
    }
    # As the CLI passes a comma-separated list.
    assert batch_policy_of(
        {"batch.max_size": 8, "batch.preferred_sizes": "2,4"}
    ).preferred_sizes == (2, 4)


@pytest.mark.parametrize(
    "options",
    [
        {"batch.max_size": 0},
        {"batch.max_size": 100_000},
        {"batch.max_size": True},
        {"batch.max_size": "lots"},
        {"batch.max_queue_delay_us": -1},
        {"batch.max_size": 8, "batch.preferred_sizes": [16]},
        {"batch.max_size": 8, "batch.preferred_sizes": {"a": 1}},
    ],
)
def test_invalid_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="batch"):
        check_batch_options(options)


def test_ready_and_take_follow_preferred_sizes() -> None:
    policy = BatchPolicy(max_size=16, preferred_sizes=(4, 8))
    assert not policy.ready(3) and policy.ready(4) and not policy.ready(5) and policy.ready(16)
    # The delay over with 6 waiting: the largest preferred size that fits goes first.
    assert policy.take(6) == 4 and policy.take(9) == 8 and policy.take(3) == 3
    assert BatchPolicy(max_size=4).take(9) == 4


def test_runtime_defaults_and_invalid_stored_options() -> None:
    assert model_batch_policy("sentence-embedding", {}).max_size == 32
    assert model_batch_policy("text-generation", {}).max_size == 8
    assert model_batch_policy("text-generation", {"batch.max_size": 1}).max_size == 1
    assert not model_batch_policy("onnx", {}).enabled
    assert not model_batch_policy("onnx", {"batch.max_size": -3}).enabled
