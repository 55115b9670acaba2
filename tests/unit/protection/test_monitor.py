"""The extraction monitor, on digits: real streams pass, synthetic probes are blocked."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from bastion.protection import monitor as m
from bastion.protection.monitor import (
    ExtractionMonitor,
    MonitorPolicy,
    Reference,
    build_reference,
    features_of,
    monitor_policy_of,
)

Data = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], LogisticRegression, Reference]


@pytest.fixture(scope="module")
def digits() -> Data:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(
        x.astype(np.float32), y, test_size=0.5, random_state=0, stratify=y
    )
    victim = LogisticRegression(max_iter=3000).fit(x_train, y_train)
    return x_train, x_test, victim, build_reference(x_train)


def _run(monitor: ExtractionMonitor, victim: Any, stream: np.ndarray[Any, Any]) -> dict[str, int]:
    """Send `stream` one query a request; the query count at which each level was first
    reported."""
    first: dict[str, int] = {}
    labels = victim.predict(stream)
    for i, row in enumerate(stream):
        report = monitor.observe("key", "tenant", row[None], labels[i : i + 1])
        if report is not None:
            first.setdefault(report.level, i + 1)
    return first


def test_fifty_benign_tenants_sending_real_digits_are_never_blocked(digits: Data) -> None:
    _, x_test, victim, reference = digits
    rng = np.random.default_rng(1)
    for _ in range(50):
        stream = x_test[rng.permutation(len(x_test))[: int(rng.integers(100, 800))]]
        first = _run(ExtractionMonitor(MonitorPolicy(), reference), victim, stream)
        assert "block" not in first and "throttle" not in first


def _jbda(victim: Any, seeds: np.ndarray[Any, Any], n: int) -> np.ndarray[Any, Any]:
    """Jacobian-based augmentation (Papernot et al. 2017) with a linear substitute."""
    points = seeds
    while len(points) < n:
        substitute = LogisticRegression(max_iter=500).fit(points, victim.predict(points))
        classes = list(substitute.classes_)
        gradients = substitute.coef_[[classes.index(c) for c in substitute.predict(points)]]
        points = np.vstack([points, np.clip(points + 1.6 * np.sign(gradients), 0, 16)])
    return points[:n].astype(np.float32)


@pytest.mark.parametrize("attack", ["uniform", "noise_around_mean", "jbda"])
def test_synthetic_probes_are_blocked_within_500_queries(digits: Data, attack: str) -> None:
    x_train, x_test, victim, reference = digits
    rng = np.random.default_rng(2)
    if attack == "uniform":
        stream = rng.uniform(0, 16, (500, 64))
    elif attack == "noise_around_mean":
        spread = x_train.std(axis=0) + 1e-3
        stream = np.clip(x_train.mean(axis=0) + rng.normal(size=(500, 64)) * spread, 0, 16)
    else:
        stream = _jbda(victim, x_test[rng.permutation(len(x_test))[:50]], 500)
    first = _run(ExtractionMonitor(MonitorPolicy(), reference), victim, stream.astype(np.float32))
    assert first.get("block", 10**9) <= 500, first
    assert first["block"] >= m.MIN_QUERIES_TO_BLOCK


def test_prada_alone_flags_a_stream_of_tiny_steps(digits: Data) -> None:
    """Without a reference, PRADA still sees synthetic structure: each query a small step
    from the last, so the nearest-distance stream is far from normal."""
    _, x_test, victim, _ = digits
    rng = np.random.default_rng(3)
    steps = [x_test[0]]
    for i in range(400):
        jump = i % 40 == 0
        base = x_test[rng.integers(len(x_test))] if jump else steps[-1]
        steps.append(np.clip(base + rng.normal(0, 0.05, 64), 0, 16))
    first = _run(ExtractionMonitor(MonitorPolicy(), None), victim, np.asarray(steps, np.float32))
    assert "block" in first, first


def test_the_natural_data_attacker_is_not_blocked_but_raises_a_coverage_alert(
    digits: Data,
) -> None:
    """Real digits asked in bulk look like a heavy benign user: documented as beyond the
    monitor (the output policy and watermark are the defence), but coverage alerts."""
    _, x_test, victim, reference = digits
    first = _run(ExtractionMonitor(MonitorPolicy(), reference), victim, x_test)
    assert "block" not in first and "alert" in first


def test_reports_come_on_level_changes_and_every_few_dozen_queries(digits: Data) -> None:
    _, x_test, victim, reference = digits
    monitor = ExtractionMonitor(MonitorPolicy(), reference)
    labels = victim.predict(x_test[:200])
    reports = [monitor.observe("k", "t", x_test[i : i + 1], labels[i : i + 1]) for i in range(200)]
    sent = [r for r in reports if r is not None]
    assert [r.queries for r in sent] == [50, 100, 150, 200]
    assert all(set(r.signals) >= {"prada", "ood", "coverage"} for r in sent)
    # The report holds scores and counts only: nothing from the inputs.
    assert all(isinstance(v, float) for r in sent for v in r.signals.values())


def test_a_batch_counts_every_row_and_reset_forgets_the_key(digits: Data) -> None:
    _, _, victim, reference = digits
    monitor = ExtractionMonitor(MonitorPolicy(), reference)
    noise = np.random.default_rng(4).uniform(0, 16, (60, 64)).astype(np.float32)
    report = monitor.observe("k", "t", noise, victim.predict(noise))
    assert report is not None and report.level == "block" and report.queries == 60
    monitor.reset("k")
    assert monitor.snapshot() == []


def test_memory_is_bounded_per_key_and_per_worker(digits: Data, monkeypatch: Any) -> None:
    _, x_test, victim, reference = digits
    monkeypatch.setattr(m, "MAX_STREAMS", 3)
    monitor = ExtractionMonitor(MonitorPolicy(), reference)
    labels = victim.predict(x_test)
    for i in range(len(x_test)):
        monitor.observe(f"k{i % 5}", "t", x_test[i : i + 1], labels[i : i + 1])
    assert len(monitor.snapshot()) == 3
    stream = next(iter(monitor._streams.values()))
    assert stream.count <= m.GROWING_CAP
    assert len(stream.distances) <= m.DISTANCE_WINDOW


def test_monitor_off_watches_nothing(digits: Data) -> None:
    _, _, victim, reference = digits
    monitor = ExtractionMonitor(MonitorPolicy(enabled=False), reference)
    noise = np.random.default_rng(5).uniform(0, 16, (100, 64)).astype(np.float32)
    assert monitor.observe("k", "t", noise, victim.predict(noise)) is None


def test_the_reference_round_trips_and_keeps_no_samples(digits: Data) -> None:
    x_train, _, _, reference = digits
    data = reference.to_json()
    again = Reference.from_json(data)
    assert again.threshold == pytest.approx(reference.threshold)
    assert again.step == 1.0 and again.cells == reference.cells
    # Statistics only (a mean, directions, spreads, grid edges): nothing per sample, so
    # its size does not grow with the sample.
    assert set(json.loads(data)) == {
        "version",
        "mean",
        "components",
        "variances",
        "threshold",
        "step",
        "edges",
        "cells",
    }
    assert build_reference(x_train[:100]).to_json().__len__() == pytest.approx(len(data), rel=0.1)


@pytest.mark.parametrize(
    "document",
    [b"not json", b"[]", b'{"version": 2}', b'{"version": 1, "mean": [1]}'],
)
def test_a_bad_reference_is_refused(document: bytes) -> None:
    with pytest.raises(ValueError, match="protection reference"):
        Reference.from_json(document)


def test_a_reference_needs_enough_finite_samples() -> None:
    with pytest.raises(ValueError, match="at least 50"):
        build_reference(np.zeros((10, 4)))
    bad = np.random.default_rng(0).normal(size=(60, 4))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_reference(bad)


def test_wide_inputs_are_pooled_to_a_bounded_width() -> None:
    rows = features_of(np.ones((2, 3, 32, 32), dtype=np.float32))
    assert rows.shape == (2, m.MAX_FEATURES)
    assert np.allclose(rows, 1.0)


def test_policy_options() -> None:
    policy = monitor_policy_of({"protect.block_at": "off", "protect.throttle_at": "0.8"})
    assert policy.block_at is None and policy.throttle_at == 0.8
    assert policy.level(5.0, 1000) == "throttle"
    assert MonitorPolicy().level(5.0, 10) == "alert"  # too few queries to block
    assert not monitor_policy_of({"protect.monitor": "off"}).enabled
    for bad in (
        {"protect.monitor": "maybe"},
        {"protect.alert_at": "high"},
        {"protect.block_at": "-1"},
        {"protect.throttle_rps": "0"},
    ):
        with pytest.raises(ValueError):
            monitor_policy_of(bad)


def test_the_same_input_again_and_again_is_not_an_attack(digits: Data) -> None:
    """A client retrying, or a load test sending one image: nothing new is learnt."""
    _, x_test, victim, reference = digits
    stream = np.repeat(x_test[:3], 300, axis=0)
    first = _run(ExtractionMonitor(MonitorPolicy(), reference), victim, stream)
    assert "block" not in first and "alert" not in first


def test_nan_inputs_are_outliers_and_do_not_silence_prada(digits: Data) -> None:
    _, _, _, reference = digits
    monitor = ExtractionMonitor(MonitorPolicy(), reference)
    rows = np.full((60, 64), np.nan, dtype=np.float32)
    report = monitor.observe("k", "t", rows, np.zeros(60, dtype=np.int64))
    assert report is not None and report.level == "block"
    assert report.signals["outlier_share"] == 1.0
