"""The KGW text watermark: green lists, the logits bias, detection and key derivation."""

from __future__ import annotations

import hashlib
import hmac
import math
import statistics
import time

import numpy as np
import pytest
import torch

from bastion.protection.textmark import Detection, TextWatermark, derive_key

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
VOCAB = 4096


@pytest.fixture(scope="module")
def watermark() -> TextWatermark:
    return TextWatermark(KEY, VOCAB)


def _sample_watermarked(watermark: TextWatermark, length: int, seed: int) -> list[int]:
    """Tokens drawn from uniform logits over the vocabulary, with the bias applied."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.zeros(VOCAB)
    tokens = [int(torch.randint(VOCAB, (1,), generator=generator).item())]
    while len(tokens) < length:
        probs = torch.softmax(watermark.bias(tokens[-1], logits), dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator).item()))
    return tokens


def test_green_list_has_gamma_share_and_is_deterministic(watermark: TextWatermark) -> None:
    assert watermark.green_size == 1024
    for previous in (0, 1, 4095, 2**40):
        mask = watermark.green_mask(previous)
        assert mask.shape == (VOCAB,)
        assert int(mask.sum()) == 1024
        ids = watermark.green_ids(previous)
        assert ids == sorted(ids)
        assert len(ids) == 1024
        # A fresh instance (no cache) derives the same list from the same key.
        assert TextWatermark(KEY, VOCAB).green_ids(previous) == ids
    assert watermark.green_ids(0) != watermark.green_ids(1)
    with pytest.raises(ValueError):
        watermark.green_mask(0)[0] = True  # the cached list is read-only to callers
    with pytest.raises(ValueError):
        watermark.green_mask(-1)


def test_green_list_follows_the_documented_construction(watermark: TextWatermark) -> None:
    # HMAC-SHA256 of the previous token, expanded by SHAKE-256 into 32-bit ranks: this pins
    # the lists so that a library upgrade cannot silently change what detection expects.
    previous = 1234
    seed = hmac.new(KEY, previous.to_bytes(8, "big"), hashlib.sha256).digest()
    stream = hashlib.shake_256(b"bastion text watermark v1 green list\x00" + seed).digest(4 * VOCAB)
    ranks = [int.from_bytes(stream[4 * i : 4 * i + 4], "big") for i in range(VOCAB)]
    expected = sorted(sorted(range(VOCAB), key=lambda i: (ranks[i], i))[:1024])
    assert watermark.green_ids(previous) == expected


def test_different_keys_give_unrelated_lists(watermark: TextWatermark) -> None:
    other = TextWatermark(OTHER_KEY, VOCAB)
    for previous in range(20):
        overlap = len(set(watermark.green_ids(previous)) & set(other.green_ids(previous)))
        # Independent lists share about gamma * 1024 = 256 ids (sd ~12).
        assert 190 < overlap < 320


def test_green_size_rounds_gamma_times_vocab() -> None:
    assert TextWatermark(KEY, 10, gamma=0.25).green_size == round(2.5)
    assert TextWatermark(KEY, 1000, gamma=0.5).green_size == 500
    assert int(TextWatermark(KEY, 1000, gamma=0.1).green_mask(7).sum()) == 100


def test_bias_adds_delta_to_green_ids_only(watermark: TextWatermark) -> None:
    padded = VOCAB + 64  # a model's padded vocabulary: the padding is outside the partition
    logits = torch.zeros(padded)
    biased = watermark.bias(42, logits)
    assert torch.equal(logits, torch.zeros(padded)), "the caller's logits must not change"
    green = torch.from_numpy(watermark.green_mask(42).copy())
    assert torch.equal(biased[:VOCAB][green], torch.full((1024,), 2.0))
    assert torch.equal(biased[:VOCAB][~green], torch.zeros(VOCAB - 1024))
    assert torch.equal(biased[VOCAB:], torch.zeros(64))
    half = watermark.bias(42, torch.zeros(VOCAB, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert int((half == 2).sum()) == 1024
    custom = TextWatermark(KEY, VOCAB, delta=3.0).bias(42, logits)
    assert set(custom.tolist()) == {0.0, 3.0}


def test_bias_rejects_logits_of_the_wrong_shape(watermark: TextWatermark) -> None:
    with pytest.raises(ValueError, match="1-D"):
        watermark.bias(0, torch.zeros(1, VOCAB))
    with pytest.raises(ValueError, match="1-D"):
        watermark.bias(0, torch.zeros(VOCAB - 1))


def test_bias_is_fast(watermark: TextWatermark) -> None:
    logits = torch.randn(VOCAB)
    for previous in range(64):
        watermark.bias(previous, logits)  # build and cache these green lists
    calls = 2000
    with torch.inference_mode():
        start = time.perf_counter()
        for i in range(calls):
            watermark.bias(i % 64, logits)
        per_call = (time.perf_counter() - start) / calls
    assert per_call < 1e-3  # measured about 10 microseconds


def test_green_list_cache_is_bounded() -> None:
    watermark = TextWatermark(KEY, VOCAB, cache_size=3)
    lists = [watermark.green_ids(previous) for previous in range(10)]
    assert len(watermark._cache) == 3
    assert [watermark.green_ids(previous) for previous in range(10)] == lists


def test_random_text_is_not_detected(watermark: TextWatermark) -> None:
    zs = []
    for seed in range(500):
        tokens = np.random.default_rng(seed).integers(0, VOCAB, size=201).tolist()
        detection = watermark.score(tokens)
        assert detection.tokens_scored == 200  # no repeated bigram among random tokens
        assert not detection.watermarked
        zs.append(detection.z)
    # Without the key the z-score is close to standard normal: measured mean 0.04, standard
    # deviation 1.06, largest 3.59, 16 of 500 (3.2%; about 2.6% expected for a binomial
    # count) at 2 or more and 498 of 500 within 3 of 0.
    assert abs(statistics.fmean(zs)) < 0.15
    assert 0.85 < statistics.pstdev(zs) < 1.15
    assert max(zs) < 4
    assert sum(z >= 2 for z in zs) <= 20
    assert sum(abs(z) < 3 for z in zs) >= 495


def test_watermarked_toy_text_is_detected(watermark: TextWatermark) -> None:
    for seed in range(5):
        tokens = _sample_watermarked(watermark, 201, seed)
        detection = watermark.score(tokens)
        assert detection.tokens_scored >= 195
        # About 71% of tokens are green with delta 2 on flat logits: z near 15.
        assert detection.z > 10
        assert detection.watermarked
        assert detection.p_value < 1e-20
        # Another key does not see it.
        assert abs(TextWatermark(OTHER_KEY, VOCAB).score(tokens).z) < 4


def test_repeated_bigrams_count_once(watermark: TextWatermark) -> None:
    green_after_7 = watermark.green_ids(7)[0]
    once = watermark.score([7, green_after_7])
    assert (once.tokens_scored, once.green) == (1, 1)
    repeated = watermark.score([7, green_after_7] * 100)
    # Only (7, g) and (g, 7) are distinct, however often the text repeats them.
    assert repeated.tokens_scored == 2
    assert repeated.green == once.green + int(watermark.green_mask(green_after_7)[7])
    tokens = _sample_watermarked(watermark, 101, seed=9)
    assert watermark.score(tokens * 5).z == pytest.approx(watermark.score(tokens).z, abs=0.5)


def test_score_statistics(watermark: TextWatermark) -> None:
    for short in ([], [5]):
        assert watermark.score(short) == Detection(tokens_scored=0, green=0, z=0.0, p_value=1.0)
    tokens = _sample_watermarked(watermark, 60, seed=3)
    detection = watermark.score(tokens)
    scored, green = detection.tokens_scored, detection.green
    z = (green - 0.25 * scored) / math.sqrt(scored * 0.25 * 0.75)
    assert detection.z == pytest.approx(z)
    assert detection.p_value == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    # Ids outside the vocabulary are never green.
    assert watermark.score([1, VOCAB + 5]).green == 0
    middling = Detection(tokens_scored=100, green=40, z=3.46, p_value=2.7e-4)
    assert not middling.watermarked
    assert middling.verdict(threshold_z=3.0)
    assert not middling.verdict(threshold_z=3.46)


def test_derive_key_is_hkdf_bound_to_model_and_secret() -> None:
    secret = b"m" * 32
    key = derive_key(secret, "tiny-chat")
    assert len(key) == 32
    assert key == derive_key(secret, "tiny-chat")
    assert key != derive_key(secret, "tiny-chat2")
    assert key != derive_key(b"n" * 32, "tiny-chat")
    # RFC 5869 by hand: no salt means a salt of 32 zero bytes; one block of output.
    prk = hmac.new(b"\x00" * 32, secret, hashlib.sha256).digest()
    info = b"bastion text watermark v1\x00tiny-chat"
    assert key == hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    with pytest.raises(ValueError, match="16 bytes"):
        derive_key(b"short", "tiny-chat")


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        TextWatermark(b"k" * 15, VOCAB)
    for gamma in (0.0, 1.0, -0.1, 0.0001):
        with pytest.raises(ValueError):
            TextWatermark(KEY, VOCAB, gamma=gamma)
    for delta in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            TextWatermark(KEY, VOCAB, delta=delta)
    with pytest.raises(ValueError):
        TextWatermark(KEY, 1)
    with pytest.raises(ValueError):
        TextWatermark(KEY, VOCAB, cache_size=0)


def test_repr_hides_the_key(watermark: TextWatermark) -> None:
    assert KEY.hex() not in repr(watermark)
    assert repr(KEY) not in repr(watermark)
    assert "vocab_size=4096" in repr(watermark)
