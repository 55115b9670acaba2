"""The DAWN-style ownership watermark: selection, answers, sealed marks, verification."""

from __future__ import annotations

import hmac
from typing import Any

import numpy as np
import pytest
from scipy import stats

from bastion.protection.watermark import (
    ClassifierWatermark,
    MarksError,
    canonical_bytes,
    error_upper_bound,
    generate_marks_keypair,
    open_marks,
    seal_marks,
    verify,
)

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
CLASSES = 10


def rows(count: int, width: int = 64, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).normal(size=(count, width)).astype(np.float32)


def reference_select(key: bytes, row: np.ndarray[Any, Any], rate: float) -> bool:
    digest = hmac.digest(key, b"select" + canonical_bytes(row), "sha256")
    return int.from_bytes(digest[:8], "big") < rate * 2**64


def reference_label(key: bytes, row: np.ndarray[Any, Any], best: int, classes: int) -> int:
    digest = hmac.digest(key, b"label" + canonical_bytes(row), "sha256")
    return (best + 1 + int.from_bytes(digest[:8], "big") % (classes - 1)) % classes


@pytest.mark.parametrize("key", [b"", b"x" * 15])
def test_short_keys_are_refused(key: bytes) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        ClassifierWatermark(key)


@pytest.mark.parametrize("rate", [0.0, -0.1, 0.21, 1.0, float("nan")])
def test_rates_outside_the_range_are_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        ClassifierWatermark(KEY, rate)


@pytest.mark.parametrize("key", [KEY, b"k" * 16, b"long key " * 20])
def test_selection_and_labels_are_the_documented_hmacs(key: bytes) -> None:
    batch = rows(3000, seed=1)
    watermark = ClassifierWatermark(key, rate=0.1)
    mask = watermark.select(batch)
    assert mask.tolist() == [reference_select(key, row, 0.1) for row in batch]
    best = np.random.default_rng(2).integers(0, CLASSES, len(batch))
    labels = watermark.watermark_labels(batch, best, CLASSES)
    expected = [reference_label(key, r, int(b), CLASSES) for r, b in zip(batch, best, strict=True)]
    assert labels.tolist() == expected


def test_the_same_input_always_gets_the_same_answer() -> None:
    watermark = ClassifierWatermark(KEY, rate=0.05)
    batch = rows(2000, seed=3)
    mask = watermark.select(batch)
    assert 50 < mask.sum() < 150
    # Across calls, batch positions and batch sizes.
    assert np.array_equal(watermark.select(batch), mask)
    order = np.random.default_rng(4).permutation(len(batch))
    assert np.array_equal(watermark.select(batch[order]), mask[order])
    assert [bool(watermark.select(batch[i : i + 1])[0]) for i in range(200)] == mask[:200].tolist()
    # FP64 copies of the float32 values, and other shapes of the same row.
    wide = batch.astype(np.float64)
    assert np.array_equal(watermark.select(wide), mask)
    assert np.array_equal(watermark.select(batch.reshape(-1, 8, 8)), mask)
    assert np.array_equal(watermark.select(np.asfortranarray(batch)), mask)
    best = np.argmax(batch[:, :CLASSES], axis=1)
    labels = watermark.watermark_labels(batch, best, CLASSES)
    assert np.array_equal(watermark.watermark_labels(wide, best, CLASSES), labels)
    assert np.array_equal(watermark.watermark_labels(batch, best, CLASSES), labels)
    # Another key marks other rows.
    assert not np.array_equal(ClassifierWatermark(b"another key 1234", 0.05).select(batch), mask)


def test_the_marked_fraction_is_the_rate() -> None:
    batch = rows(100_000, seed=5)
    for rate in (0.005, 0.02):
        marked = int(ClassifierWatermark(KEY, rate).select(batch).sum())
        low, high = stats.binom.interval(1 - 1e-6, len(batch), rate)
        assert low <= marked <= high, (rate, marked)


def test_watermark_labels_are_other_classes_uniformly() -> None:
    watermark = ClassifierWatermark(KEY, rate=0.2)
    batch = rows(45_000, width=16, seed=6)
    best = np.random.default_rng(7).integers(0, CLASSES, len(batch))
    labels = watermark.watermark_labels(batch, best, CLASSES)
    assert labels.dtype == np.int64
    assert not np.any(labels == best)
    assert labels.min() >= 0 and labels.max() < CLASSES
    offsets = (labels - best - 1) % CLASSES  # 0 .. C-2, uniform if the label is
    counts = np.bincount(offsets, minlength=CLASSES)
    assert counts[-1] == 0
    assert stats.chisquare(counts[:-1]).pvalue > 1e-4
    for cls in range(CLASSES):  # uniform over the other classes for each best class
        others = np.bincount(labels[best == cls], minlength=CLASSES)
        assert others[cls] == 0
        assert stats.chisquare(np.delete(others, cls)).pvalue > 1e-4
    # Two classes: the watermark label is the other one.
    two = watermark.watermark_labels(batch[:100], best[:100] % 2, 2)
    assert np.array_equal(two, 1 - best[:100] % 2)


def test_apply_swaps_the_best_and_the_watermark_score_of_marked_rows_only() -> None:
    watermark = ClassifierWatermark(KEY, rate=0.05)
    batch = rows(4000, seed=8)
    scores = np.random.default_rng(9).dirichlet(np.ones(CLASSES), len(batch)).astype(np.float32)
    before = scores.copy()
    answer, mask = watermark.apply(batch, scores)
    assert np.array_equal(scores, before)  # the input is not modified
    assert answer.dtype == scores.dtype and answer.shape == scores.shape
    assert np.array_equal(mask, watermark.select(batch))
    assert 100 < mask.sum() < 300
    assert np.array_equal(answer[~mask], scores[~mask])
    best = np.argmax(scores, axis=1)
    labels = watermark.watermark_labels(batch, best, CLASSES)
    assert np.array_equal(np.argmax(answer[mask], axis=1), labels[mask])
    assert np.array_equal(np.sort(answer, axis=1), np.sort(scores, axis=1))
    changed = (answer != scores).sum(axis=1)
    assert np.all(changed[mask] == 2) and np.all(changed[~mask] == 0)
    marked = np.flatnonzero(mask)
    assert np.array_equal(answer[marked, labels[marked]], scores[marked, best[marked]])
    # Logits of FP64 give the same marks and labels.
    logits = np.log(scores.astype(np.float64))
    answer64, mask64 = watermark.apply(batch.astype(np.float64), logits)
    assert np.array_equal(mask64, mask)
    assert np.array_equal(np.argmax(answer64, axis=1), np.argmax(answer, axis=1))
    # The label output agrees with the scores.
    new_labels, label_mask = watermark.apply_labels(batch, best, CLASSES)
    assert np.array_equal(label_mask, mask)
    assert np.array_equal(new_labels, np.argmax(answer, axis=1))
    marks, marked_labels = watermark.mark(batch, best, CLASSES)
    assert np.array_equal(marks, mask) and np.array_equal(marked_labels, labels[mask])


def test_apply_checks_its_arguments() -> None:
    watermark = ClassifierWatermark(KEY)
    with pytest.raises(ValueError, match="batch size"):
        watermark.apply(rows(3), np.ones((2, 4)))
    with pytest.raises(ValueError, match="classes"):
        watermark.apply(rows(3), np.ones((3, 1)))
    with pytest.raises(ValueError, match="classes"):
        watermark.apply(rows(3), np.ones(3))
    with pytest.raises(TypeError):
        watermark.select(np.array([["a"]]))
    with pytest.raises(ValueError, match="batch"):
        watermark.select(np.float32(1.0))
    with pytest.raises(ValueError, match="best classes"):
        ClassifierWatermark(KEY, 0.2).watermark_labels(rows(3), np.array([0, 1, 10]), 10)
    empty, mask = watermark.apply(np.zeros((0, 64), np.float32), np.zeros((0, 4), np.float32))
    assert empty.shape == (0, 4) and mask.shape == (0,)


def test_sealed_marks_open_with_the_private_key_only() -> None:
    private, public = generate_marks_keypair()
    assert len(private) == len(public) == 32
    inputs = rows(37, seed=10).astype(np.float64).reshape(37, 8, 8)
    marked = np.arange(37) % CLASSES
    true = (marked + 3) % CLASSES
    blob = seal_marks(public, inputs, marked, true)
    assert blob[0] == 1
    assert inputs.astype(np.float32).tobytes() not in blob
    got_inputs, got_marked, got_true = open_marks(private, blob)
    assert got_inputs.dtype == np.float32 and got_inputs.shape == (37, 8, 8)
    assert np.array_equal(got_inputs, inputs.astype(np.float32))
    assert got_marked.dtype == got_true.dtype == np.int64
    assert np.array_equal(got_marked, marked) and np.array_equal(got_true, true)
    assert seal_marks(public, inputs, marked, true) != blob  # fresh ephemeral key and nonce
    # The stored inputs are the ones the marks were computed on.
    watermark = ClassifierWatermark(KEY)
    assert np.array_equal(watermark.select(got_inputs), watermark.select(inputs))
    # An empty record.
    empty = open_marks(private, seal_marks(public, np.zeros((0, 64)), [], []))
    assert empty[0].shape == (0, 64) and len(empty[1]) == len(empty[2]) == 0

    for position in (0, 1, 20, 33, 40, 45, 60, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(MarksError):
            open_marks(private, bytes(tampered))
    for cut in (0, 10, 45, len(blob) - 1):
        with pytest.raises(MarksError):
            open_marks(private, blob[:cut])
    with pytest.raises(MarksError):
        open_marks(private, blob + b"\0")
    other_private, _ = generate_marks_keypair()
    with pytest.raises(MarksError):
        open_marks(other_private, blob)


def test_sealing_checks_its_arguments() -> None:
    _, public = generate_marks_keypair()
    with pytest.raises(ValueError, match="32 bytes"):
        seal_marks(public[:31], rows(2), [1, 2], [0, 0])
    with pytest.raises(ValueError, match="usable"):
        seal_marks(bytes(32), rows(2), [1, 2], [0, 0])  # a low-order point
    with pytest.raises(ValueError, match="one watermark label"):
        seal_marks(public, rows(2), [1], [0, 0])


def marked_record(count: int, seed: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(watermark labels, true labels) of `count` marked inputs under KEY."""
    watermark = ClassifierWatermark(KEY, rate=0.2)
    batch = rows(count * 10, seed=seed)
    best = np.random.default_rng(seed).integers(0, CLASSES, len(batch))
    mask, labels = watermark.mark(batch, best, CLASSES)
    return labels[:count], best[mask][:count]


def test_a_suspect_that_copied_the_answers_is_identified() -> None:
    marked, true = marked_record(40, seed=11)
    assert len(marked) == 40
    verdict = verify(marked, true, marked, classes=CLASSES)
    assert (verdict.marks, verdict.agreed, verdict.agreement) == (40, 40, 1.0)
    assert verdict.p0 == pytest.approx(1 / 9)  # every mark disagrees with the victim: e = 1
    assert verdict.p_value == pytest.approx((1 / 9) ** 40)
    assert verdict.stolen
    # A copy that reproduces 30 of 40 marks, the others as the victim answered.
    partial = np.where(np.arange(40) < 30, marked, true)
    verdict = verify(marked, true, partial, classes=CLASSES)
    assert verdict.agreed == 30 and verdict.p_value < 1e-9 and verdict.stolen
    # Ten marks, the minimum at p0 = 1/9: (1/9)**10 < 1e-9 < (1/9)**9.
    assert verify(marked[:10], true[:10], marked[:10], classes=CLASSES).stolen
    assert not verify(marked[:9], true[:9], marked[:9], classes=CLASSES).stolen
    # The suspect's clean agreement gives a smaller p0, more power per mark.
    clean = verify(marked[:6], true[:6], marked[:6], classes=CLASSES, suspect_clean_agreement=0.9)
    assert clean.p0 == pytest.approx(0.1 / 9) and clean.stolen
    strict = verify(marked, true, marked, classes=CLASSES, alpha=1e-60)
    assert strict.p_value > 1e-60 and not strict.stolen


def test_an_independent_suspect_is_not_identified() -> None:
    rng = np.random.default_rng(12)
    for seed, accuracy in ((13, 0.9), (14, 0.5), (15, 0.0)):
        marked, true = marked_record(60, seed=seed)
        wrong = (true + 1 + rng.integers(0, CLASSES - 1, len(true))) % CLASSES
        suspect = np.where(rng.random(len(true)) < accuracy, true, wrong)
        verdict = verify(marked, true, suspect, classes=CLASSES)
        assert verdict.p_value > 0.01 and not verdict.stolen, (accuracy, verdict)
        clean = verify(marked, true, suspect, classes=CLASSES, suspect_clean_agreement=accuracy)
        assert clean.p_value > 0.01 and not clean.stolen, (accuracy, clean)


def test_the_p_value_is_conservative_under_the_null_hypothesis() -> None:
    """A suspect independent of the key, simulated: p-values are not too small too often."""
    rng = np.random.default_rng(16)
    trials, n = 1500, 30
    p_values = []
    for _ in range(trials):
        true = rng.integers(0, CLASSES, n)
        marked = (true + 1 + rng.integers(0, CLASSES - 1, n)) % CLASSES
        error = rng.choice([0.05, 0.3, 0.9])
        wrong = (true + 1 + rng.integers(0, CLASSES - 1, n)) % CLASSES
        suspect = np.where(rng.random(n) < error, wrong, true)
        p_values.append(verify(marked, true, suspect, classes=CLASSES).p_value)
    values = np.asarray(p_values)
    for level in (0.01, 0.05, 0.2):
        assert np.mean(values <= level) <= level


def test_verify_edge_cases() -> None:
    empty = verify([], [], [], classes=CLASSES)
    assert (empty.marks, empty.agreed, empty.p_value, empty.stolen) == (0, 0, 1.0, False)
    perfect = verify([1, 2], [0, 0], [0, 0], classes=CLASSES, suspect_clean_agreement=1.0)
    assert perfect.p0 == 0.0 and perfect.p_value == 1.0
    assert verify([1], [0], [1], classes=CLASSES, suspect_clean_agreement=1.0).p_value == 0.0
    assert error_upper_bound(0, 0) == 1.0
    assert error_upper_bound(5, 5) == 1.0
    assert 0.1 < error_upper_bound(10, 100) < 0.3
    with pytest.raises(ValueError, match="same length"):
        verify([1, 2], [0], [0, 0], classes=CLASSES)
    with pytest.raises(ValueError, match="not a record"):
        verify([1, 2], [1, 0], [0, 0], classes=CLASSES)
    with pytest.raises(ValueError, match="two classes"):
        verify([1], [0], [0], classes=1)
    with pytest.raises(ValueError, match="agreement"):
        verify([1], [0], [0], classes=CLASSES, suspect_clean_agreement=1.5)


def test_controls_are_the_next_share_of_the_same_hash_and_never_marks() -> None:
    wm = ClassifierWatermark(b"c" * 32, rate=0.01)
    rows = np.random.default_rng(11).normal(size=(50_000, 4)).astype(np.float32)
    marks, controls = wm.select_with_controls(rows)
    assert (marks == wm.select(rows)).all()
    assert not (marks & controls).any()
    assert 0.008 < controls.mean() < 0.012
