"""A keyed watermark for generated text, and its detector (KGW).

This is the "soft" watermark of Kirchenbauer et al., "A Watermark for Large Language
Models" (ICML 2023). Before each token is sampled, the previous token selects a keyed
pseudo-random "green list" holding a fraction ``gamma`` of the vocabulary, and ``delta``
is added to the logits of the green tokens. Text the model writes then holds many more
green tokens than the ``gamma`` share that text written without the key holds; anyone who
has the key counts them and computes a z-score, and nobody without it can tell green from
red. Quality barely changes where the model has several good choices (high entropy), and
nothing changes where it has one: a strong favourite keeps winning against a bias of
``delta``, so low-entropy text (code, quotations, lists) carries less of the watermark.

Construction. The green list of a previous token ``p`` comes from
``d = HMAC-SHA256(key, p as 8 bytes big-endian)``: SHAKE-256 of a fixed label and ``d``
gives a 32-bit big-endian rank to every token id, and the ``round(gamma * vocab_size)``
ids of lowest rank (ties broken by id) are green. Every step is a standard primitive with
a fixed definition, so the lists do not change with the numpy version (whose random
generators promise no stable streams across releases). Lists are cached in a bounded
least-recently-used map, so biasing costs a clone and an add per token.

Detection counts, over the bigrams (previous, token) of a token sequence, how many
tokens are green for their predecessor. Each distinct bigram counts once (as in the
authors' follow-up, "On the Reliability of Watermarks for Large Language Models", which
ignores repeated n-grams), so text that repeats itself cannot push the score up or down
by repetition. With ``T`` bigrams scored and ``G`` green,
``z = (G - gamma T) / sqrt(T gamma (1 - gamma))``; its one-sided normal p-value is the
chance that text written without the key scores as high. Under that null hypothesis the
green count is close to binomial, so z > 4 has a false-positive rate near 3e-5.

Parameters: ``gamma = 0.25`` and ``delta = 2`` are the paper's usual choice; a larger
``delta`` marks low-entropy text more strongly at a larger cost in quality. Detection is
per model: :func:`derive_key` derives each model's key from one master secret with HKDF,
so one model's key reveals nothing about another's, and text is attributed to the model
whose key detects it.

What it resists: light editing (each changed token spoils at most two bigrams, so a
change of a few tokens in ten keeps a long text detectable), cropping (any long enough
window is scored on its own), and forgery or removal by anyone who sees only watermarked
text and not the key, in small amounts. What it does not resist: paraphrasing, by hand or
by another model, and "emoji" or translation attacks that rewrite every token, remove it;
so does scrubbing with enough queries. With the context of one previous token the green
lists leak through the output's bigram statistics: Jovanović et al., "Watermark Stealing
in Large Language Models" (ICML 2024) learn enough from about 30,000 answers, for under
$50, to both scrub the watermark and forge it on text of their own choosing. Rate limits
and per-model keys raise that cost; they do not remove it. A detection is therefore
evidence that text came from this model, never proof that other text did not, and a
spoofed detection is possible for a determined attacker. Short texts carry too few
bigrams: around 200 tokens are needed for a reliable z > 4.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

# The z-score above which text counts as watermarked (false-positive rate ~3e-5).
DEFAULT_THRESHOLD_Z = 4.0
MIN_KEY_BYTES = 16
KEY_BYTES = 32
DEFAULT_CACHE_SIZE = 4096
_HKDF_INFO = b"bastion text watermark v1\x00"
_RANK_LABEL = b"bastion text watermark v1 green list\x00"
_RANK_BYTES = 4
_MAX_TOKEN_ID = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Detection:
    """The outcome of scoring one token sequence for the watermark.

    ``tokens_scored`` is the number of distinct bigrams scored, ``green`` how many of them
    end in a green token, ``z`` the z-score and ``p_value`` the one-sided chance of a score
    at least this high in text written without the key. With nothing to score, ``z`` is 0
    and ``p_value`` 1.
    """

    tokens_scored: int
    green: int
    z: float
    p_value: float

    def verdict(self, threshold_z: float = DEFAULT_THRESHOLD_Z) -> bool:
        """Whether the z-score exceeds `threshold_z`: the text is watermarked."""
        return self.z > threshold_z

    @property
    def watermarked(self) -> bool:
        """Whether the z-score exceeds the default threshold of 4."""
        return self.verdict()


def derive_key(secret: bytes, model: str) -> bytes:
    """A model's 32-byte watermark key: HKDF-SHA256 of the master `secret`, bound to `model`.

    The info string is a fixed label, a zero byte and the model's name in UTF-8, so the
    keys of two models (or of two secrets) are unrelated. The secret must hold at least
    16 bytes.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(f"The master secret must hold at least {MIN_KEY_BYTES} bytes.")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=_HKDF_INFO + model.encode("utf-8"),
    )
    return hkdf.derive(bytes(secret))


class TextWatermark:
    """The KGW watermark of one model: bias logits while generating, score text afterwards.

    `key` is the secret (16 bytes or more, see :func:`derive_key`), `vocab_size` the
    number of token ids that are partitioned into green and red, `gamma` the green share
    and `delta` the bias added to green logits. Green lists of up to `cache_size`
    previous tokens are kept. The key never appears in ``repr``. Instances are safe to
    share between threads.
    """

    __slots__ = (
        "_cache",
        "_cache_size",
        "_delta",
        "_gamma",
        "_green_size",
        "_key",
        "_lock",
        "_vocab_size",
    )

    def __init__(
        self,
        key: bytes,
        vocab_size: int,
        gamma: float = 0.25,
        delta: float = 2.0,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"The watermark key must hold at least {MIN_KEY_BYTES} bytes.")
        if vocab_size < 2:
            raise ValueError("vocab_size must be at least 2.")
        if not 0 < gamma < 1:
            raise ValueError("gamma must be in (0, 1).")
        green_size = round(gamma * vocab_size)
        if not 0 < green_size < vocab_size:
            raise ValueError("gamma leaves the green list or the red list empty.")
        if not (math.isfinite(delta) and delta >= 0):
            raise ValueError("delta must be a finite number >= 0.")
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1.")
        self._key = bytes(key)
        self._vocab_size = int(vocab_size)
        self._gamma = float(gamma)
        self._delta = float(delta)
        self._green_size = green_size
        self._cache_size = cache_size
        self._cache: OrderedDict[int, npt.NDArray[np.bool_]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def key(self) -> bytes:
        return self._key

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def gamma(self) -> float:
        return self._gamma

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def green_size(self) -> int:
        """How many token ids each green list holds: ``round(gamma * vocab_size)``."""
        return self._green_size

    def __repr__(self) -> str:
        return (
            f"TextWatermark(vocab_size={self._vocab_size}, gamma={self._gamma}, "
            f"delta={self._delta})"
        )

    def _build_mask(self, previous_token: int) -> npt.NDArray[np.bool_]:
        seed = hmac.new(self._key, previous_token.to_bytes(8, "big"), hashlib.sha256).digest()
        stream = hashlib.shake_256(_RANK_LABEL + seed).digest(_RANK_BYTES * self._vocab_size)
        ranks = np.frombuffer(stream, dtype=">u4")
        order = np.argsort(ranks, kind="stable")
        mask = np.zeros(self._vocab_size, dtype=np.bool_)
        mask[order[: self._green_size]] = True
        return mask

    def green_mask(self, previous_token: int) -> npt.NDArray[np.bool_]:
        """The green list after `previous_token`, as a read-only boolean mask over the vocab."""
        view = self._mask(previous_token).view()
        view.setflags(write=False)
        return view

    def _mask(self, previous_token: int) -> npt.NDArray[np.bool_]:
        # The cached array itself: torch.from_numpy wants a writable one; never written.
        if not 0 <= previous_token <= _MAX_TOKEN_ID:
            raise ValueError(f"Token id {previous_token} is out of range.")
        with self._lock:
            mask = self._cache.get(previous_token)
            if mask is not None:
                self._cache.move_to_end(previous_token)
                return mask
        mask = self._build_mask(previous_token)
        with self._lock:
            self._cache[previous_token] = mask
            self._cache.move_to_end(previous_token)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return mask

    def green_ids(self, previous_token: int) -> list[int]:
        """The green token ids after `previous_token`, in increasing order."""
        return [int(i) for i in np.flatnonzero(self.green_mask(previous_token))]

    def bias(self, previous_token: int, logits: torch.Tensor) -> torch.Tensor:
        """A copy of the 1-D `logits` with `delta` added to the green ids of `previous_token`.

        The caller's tensor is left as it was. Entries at ids of `vocab_size` and above (a
        model's padded vocabulary) are outside the partition and keep their value.
        """
        import torch

        if logits.dim() != 1 or logits.shape[0] < self._vocab_size:
            raise ValueError(
                f"Expected 1-D logits over at least {self._vocab_size} tokens, "
                f"got shape {tuple(logits.shape)}."
            )
        mask = torch.from_numpy(self._mask(previous_token))
        biased = logits.clone()
        head = biased[: self._vocab_size]
        head.add_(mask.to(device=head.device, dtype=head.dtype), alpha=self._delta)
        return biased

    def score(self, token_ids: Sequence[int]) -> Detection:
        """Score a token sequence: count green tokens over its distinct bigrams.

        The first token has no predecessor and is not scored. Token ids outside the
        vocabulary are never green (so they count against the text).
        """
        bigrams = {(int(a), int(b)) for a, b in itertools.pairwise(token_ids)}
        scored = len(bigrams)
        if scored == 0:
            return Detection(tokens_scored=0, green=0, z=0.0, p_value=1.0)
        green = sum(
            1
            for previous, token in bigrams
            if 0 <= token < self._vocab_size and bool(self._mask(previous)[token])
        )
        fraction = self._green_size / self._vocab_size
        z = (green - fraction * scored) / math.sqrt(scored * fraction * (1 - fraction))
        p_value = 0.5 * math.erfc(z / math.sqrt(2))
        return Detection(tokens_scored=scored, green=green, z=z, p_value=p_value)
