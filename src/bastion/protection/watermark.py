"""Ownership watermark of a classifier's answers, after DAWN (Szyller et al., ACM MM 2021).

DAWN ("Dynamic Adversarial Watermarking of Neural Networks") answers a small, keyed,
pseudo-random fraction of queries with a wrong label. An honest client loses that fraction
of answers; a client that trains a surrogate on the answers teaches it the wrong labels
too, and the owner, who recorded which queries were marked, later shows that a suspect
model reproduces them far more often than chance allows. This module is its pure core:
selection, answering, a sealed record of the marked queries, and the verification
statistics. It imports only numpy, the standard library, ``cryptography`` and (inside
:func:`verify`, so the answering path never loads it) scipy.

Selection
    Each input row (one row of a ``[batch, ...]`` batch) is reduced to its canonical
    bytes: the row cast to float32, little-endian, C-contiguous, ``tobytes()``. The same
    input therefore always gets the same answer, whatever the batch around it, and an FP64
    encoding of float32 values is the same input as the FP32 one (FP64 values that round to
    the same float32 are one input). With ``h = HMAC-SHA256(key, b"select" + canonical)``
    the row is marked iff ``int.from_bytes(h[:8], "big") < rate * 2**64``.

Watermark label
    For a marked row whose best class is ``y`` among ``C`` classes, with
    ``g = HMAC-SHA256(key, b"label" + canonical)`` and ``u = int.from_bytes(g[:8], "big")``,
    the watermark label is ``(y + 1 + u mod (C - 1)) mod C``: uniform over the ``C - 1``
    other classes (the modulo bias is below ``C / 2**64``) and, to anyone without the key,
    independent of the input and of any model. The prefixes ``b"select"`` and ``b"label"``
    keep the two uses of the key apart.

Answering (:meth:`ClassifierWatermark.apply`)
    A marked row's scores (probabilities or logits) have the scores of the best class and
    of the watermark class swapped: the answer's argmax is the watermark label and the
    distribution is otherwise the same (the same multiset of values: its shape alone does
    not give the mark away). Unmarked rows keep their exact values. With exactly tied top
    scores the swap may leave the argmax ambiguous; float scores practically never tie.
    :meth:`ClassifierWatermark.apply_labels` does the same to a label output.

Record of the marked queries (:func:`seal_marks`, :func:`open_marks`)
    Verification needs the marked inputs, their watermark labels and the labels the model
    gave before marking ("true labels"), but a server must not keep tenants' plaintext
    inputs. The record is sealed at once to an offline owner key, ECIES-style: an
    ephemeral X25519 key pair, the shared secret through HKDF-SHA256
    (``info=b"bastion watermark marks v1"``) into an AES-256-GCM key, the ephemeral public
    key as associated data. Blob: ``version (1) || ephemeral public key (32) || nonce (12)
    || ciphertext``. (This package may not import ``bastion.crypto``, so it does not use
    Bastion's HPKE adapter.) The plaintext is a fixed binary layout, no pickle: ``ndim``
    (u8), the input shape (``ndim`` x u64, the first the number of marks), the inputs as
    float32 little-endian, then the watermark labels and the true labels as int64
    little-endian.

Verification (:func:`verify`)
    On the ``n`` marked probe inputs, ``k`` is the number where the suspect's label equals
    the watermark label. Null hypothesis: the suspect is independent of the key. Since the
    watermark label is uniform over the classes other than the victim's label ``y``, a
    suspect answering ``s`` hits it with probability ``P(s != y) / (C - 1)``, and never
    when ``s == y``. With ``e`` an upper bound of the suspect's disagreement rate with the
    victim, ``p0 = min(1, e / (C - 1))`` and the p-value is ``P(X >= k)`` for
    ``X ~ Binomial(n, p0)``. ``e`` is 1 minus ``suspect_clean_agreement`` (the suspect's
    agreement with the victim on clean probe inputs from the same distribution as the
    marked queries) when given, else the upper ``1 - 1e-3`` Clopper-Pearson bound of
    ``m / n``, ``m = #(suspect != true label)`` on the marked inputs themselves.

    Why that is conservative: given the suspect's answers, under the null hypothesis each
    of the ``m`` disagreeing inputs hits its (key-chosen) watermark label independently
    with probability exactly ``1 / (C - 1)``, so ``k ~ Binomial(m, 1 / (C - 1))`` exactly,
    whatever the suspect's error rate. That is a sum of ``n`` independent Bernoulli
    variables (``m`` with ``1 / (C - 1)``, ``n - m`` with 0); by Hoeffding (1956,
    Theorem 4) its upper tail ``P(k >= t)`` is at most that of
    ``Binomial(n, m / (n (C - 1)))`` for every ``t >= m / (C - 1) + 1`` (where every
    small p-value lies), and a binomial tail only grows with its probability, which the
    Clopper-Pearson bound (``>= m / n``, far above it when ``m`` is small) raises further.
    So the p-value bounds the exact conditional one from above (checked numerically for
    every t, m <= n <= 300 with 10 classes, below the threshold too), and the ``1e-3`` of
    the bound is margin, not an added false-positive probability.

    The price: a stolen model disagrees with ``y`` on every mark it reproduces, so ``e``
    from the marks is near 1 and each reproduced mark is worth a factor ``C - 1`` only
    (10 reproduced marks of 10 for ``p < 1e-9`` with 10 classes).
    ``suspect_clean_agreement`` buys more per mark (a factor ``(C - 1) / e``) but is an
    estimate: it holds only if the clean probes are distributed like the marked queries,
    and for a strict test pass a lower confidence bound of the agreement, not the
    observed fraction.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

Array = np.ndarray[Any, Any]

MIN_KEY_BYTES = 16
MAX_RATE = 0.2
DEFAULT_ALPHA = 1e-9
# The confidence of the Clopper-Pearson upper bound of the suspect's disagreement rate.
ERROR_BOUND_CONFIDENCE = 1 - 1e-3

_SELECT = b"select"
_LABEL = b"label"
_BLOCK = 64  # SHA-256's block size, HMAC's key block

MARKS_VERSION = 1
MARKS_INFO = b"bastion watermark marks v1"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_HEADER_BYTES = 1 + _KEY_BYTES + _NONCE_BYTES
_MAX_NDIM = 32


class MarksError(ValueError):
    """A sealed record of marks that cannot be opened: tampered, truncated or another key."""


class _KeyedHmac:
    """HMAC-SHA256 (RFC 2104) of ``prefix + message`` under one key, its inner and outer
    pads hashed once: twice the speed of ``hmac.digest`` for the short messages here."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, prefix: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._inner.update(prefix)
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digests(self, rows: bytes, width: int, count: int) -> list[bytes]:
        """The MAC of each of the ``count`` consecutive ``width``-byte slices of ``rows``."""
        inner, outer = self._inner, self._outer
        if width == 0:  # zero-sized rows: each is the empty message
            o = outer.copy()
            o.update(inner.digest())
            return [o.digest()] * count
        view = memoryview(rows)
        out: list[bytes] = []
        append = out.append
        for start in range(0, width * count, width):
            h = inner.copy()
            h.update(view[start : start + width])
            o = outer.copy()
            o.update(h.digest())
            append(o.digest())
        return out


def canonical_rows(inputs: Array) -> tuple[bytes, int, int]:
    """The canonical bytes of a batch's rows, concatenated: (bytes, row width, rows)."""
    array = np.asarray(inputs)
    if array.ndim < 1:
        raise ValueError("inputs must have a batch dimension")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"inputs must be real numbers, not {array.dtype}")
    count = array.shape[0]
    flat = np.ascontiguousarray(array, dtype="<f4").reshape(count, math.prod(array.shape[1:]))
    return flat.tobytes(), flat.shape[1] * 4, count


def canonical_bytes(row: Array) -> bytes:
    """The canonical bytes of one input row: float32, little-endian, C order."""
    return np.ascontiguousarray(np.asarray(row), dtype="<f4").tobytes()


class ClassifierWatermark:
    """Keyed DAWN-style marking of a classifier's answers; see the module docstring."""

    __slots__ = ("_control_threshold", "_label", "_rate", "_select", "_threshold")

    def __init__(self, key: bytes, rate: float = 0.005) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the watermark key must have at least {MIN_KEY_BYTES} bytes")
        if not (0 < rate <= MAX_RATE):  # also rejects NaN
            raise ValueError(f"the watermark rate must be in (0, {MAX_RATE}]")
        self._rate = float(rate)
        self._select = _KeyedHmac(bytes(key), _SELECT)
        self._label = _KeyedHmac(bytes(key), _LABEL)
        # int.from_bytes(h[:8], "big") < rate * 2**64  <=>  h[:8] < ceil(rate * 2**64) as
        # 8 big-endian bytes (rate <= 0.2 keeps it below 2**64): a bytes comparison.
        self._threshold = math.ceil(self._rate * 2.0**64).to_bytes(8, "big")
        self._control_threshold = math.ceil(2 * self._rate * 2.0**64).to_bytes(8, "big")

    @property
    def rate(self) -> float:
        return self._rate

    def __repr__(self) -> str:
        return f"ClassifierWatermark(rate={self._rate})"

    def select(self, inputs: Array) -> Array:
        """Which rows of a batch are marked: a bool array of shape [batch]."""
        rows, width, count = canonical_rows(inputs)
        return self._mask(rows, width, count)

    def select_with_controls(self, inputs: Array) -> tuple[Array, Array]:
        """Which rows are marked, and which are controls: the next ``rate`` of the same
        keyed hash (``rate * 2**64 <= u < 2 * rate * 2**64``), so the two never overlap and
        cost one HMAC per row together."""
        rows, width, count = canonical_rows(inputs)
        digests = self._select.digests(rows, width, count)
        low, high = self._threshold, self._control_threshold
        marks = np.fromiter((d[:8] < low for d in digests), dtype=bool, count=count)
        controls = np.fromiter((low <= d[:8] < high for d in digests), dtype=bool, count=count)
        return marks, controls

    def _mask(self, rows: bytes, width: int, count: int) -> Array:
        threshold = self._threshold
        digests = self._select.digests(rows, width, count)
        return np.fromiter((d[:8] < threshold for d in digests), dtype=bool, count=count)

    def watermark_labels(self, inputs: Array, best: Array, classes: int) -> Array:
        """The watermark label of each row of ``inputs`` (marked or not) whose best class
        is ``best[i]``: int64 of shape [batch], never equal to ``best``."""
        rows, width, count = canonical_rows(inputs)
        return self._labels(rows, width, np.arange(count), best, classes)

    def _labels(self, rows: bytes, width: int, which: Array, best: Array, classes: int) -> Array:
        if classes < 2:
            raise ValueError("a watermark needs at least two classes")
        best = np.asarray(best, dtype=np.int64).reshape(-1)
        if len(best) != len(which):
            raise ValueError("one best class per row is needed")
        if len(best) and (best.min() < 0 or best.max() >= classes):
            raise ValueError("best classes must be in [0, classes)")
        if not len(which):
            return np.zeros(0, dtype=np.int64)
        picked = b"".join(rows[int(i) * width : (int(i) + 1) * width] for i in which)
        digests = self._label.digests(picked, width, len(which))
        offsets = np.fromiter(
            (int.from_bytes(d[:8], "big") % (classes - 1) for d in digests),
            dtype=np.int64,
            count=len(which),
        )
        return (best + 1 + offsets) % classes

    def mark(self, inputs: Array, best: Array, classes: int) -> tuple[Array, Array]:
        """(marked mask [batch], watermark labels of the marked rows, in order)."""
        rows, width, count = canonical_rows(inputs)
        mask = self._mask(rows, width, count)
        which = np.flatnonzero(mask)
        best = np.asarray(best).reshape(-1)
        if len(best) != count:
            raise ValueError("one best class per row is needed")
        return mask, self._labels(rows, width, which, best[which], classes)

    def apply(self, inputs: Array, scores: Array) -> tuple[Array, Array]:
        """Watermark a batch's scores [batch, C]: (new scores, marked mask [batch]).

        The scores of a marked row's best class and of its watermark class are swapped;
        other rows keep their values. ``scores`` is not modified.
        """
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[1] < 2:
            raise ValueError("scores must have shape [batch, classes] with two or more classes")
        rows, width, count = canonical_rows(inputs)
        if len(scores) != count:
            raise ValueError("inputs and scores must have the same batch size")
        mask = self._mask(rows, width, count)
        answer = scores.copy()
        which = np.flatnonzero(mask)
        if len(which):
            best = np.argmax(scores[which], axis=1)
            labels = self._labels(rows, width, which, best, scores.shape[1])
            answer[which, best] = scores[which, labels]
            answer[which, labels] = scores[which, best]
        return answer, mask

    def apply_labels(self, inputs: Array, labels: Array, classes: int) -> tuple[Array, Array]:
        """Watermark a batch's labels [batch]: (new labels, marked mask [batch])."""
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError("labels must have shape [batch]")
        mask, marked = self.mark(inputs, labels, classes)
        answer = labels.copy()
        answer[mask] = marked
        return answer, mask


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of testing a suspect model on the marked probe inputs."""

    marks: int  # n: marked probe inputs
    agreed: int  # k: where the suspect gave the watermark label
    agreement: float  # k / n
    p0: float  # the null hypothesis' bound of P(suspect == watermark label)
    p_value: float  # P(X >= k), X ~ Binomial(n, p0)
    stolen: bool  # p_value < alpha


def _scipy_stats() -> Any:
    # Imported on first use: the answering path never needs scipy (nor its import time).
    from scipy import stats

    return stats


def error_upper_bound(disagreed: int, n: int, confidence: float = ERROR_BOUND_CONFIDENCE) -> float:
    """Clopper-Pearson upper bound of a rate from ``disagreed`` of ``n`` (1 when n == 0)."""
    if disagreed >= n:
        return 1.0
    return float(_scipy_stats().beta.ppf(confidence, disagreed + 1, n - disagreed))


def verify(
    watermark_labels: Array,
    true_labels: Array,
    suspect_labels: Array,
    *,
    suspect_clean_agreement: float | None = None,
    classes: int,
    alpha: float = DEFAULT_ALPHA,
) -> Verdict:
    """Test whether a suspect learned the watermark, on the marked probe inputs.

    ``watermark_labels`` and ``true_labels`` come from the record of the marks;
    ``suspect_labels`` are the suspect's labels on the same inputs, in order. See the
    module docstring for the statistics and why they are conservative.
    """
    if classes < 2:
        raise ValueError("a watermark needs at least two classes")
    marked = np.asarray(watermark_labels).reshape(-1)
    true = np.asarray(true_labels).reshape(-1)
    suspect = np.asarray(suspect_labels).reshape(-1)
    if not (len(marked) == len(true) == len(suspect)):
        raise ValueError("watermark, true and suspect labels must have the same length")
    if np.any(marked == true):
        raise ValueError("a watermark label equals its true label: not a record of marks")
    n = len(marked)
    k = int(np.count_nonzero(suspect == marked))
    if suspect_clean_agreement is not None:
        if not (0.0 <= suspect_clean_agreement <= 1.0):
            raise ValueError("suspect_clean_agreement must be in [0, 1]")
        error = 1.0 - float(suspect_clean_agreement)
    else:
        error = error_upper_bound(int(np.count_nonzero(suspect != true)), n)
    p0 = min(1.0, error / (classes - 1))
    p_value = float(_scipy_stats().binom.sf(k - 1, n, p0)) if k > 0 else 1.0
    return Verdict(
        marks=n,
        agreed=k,
        agreement=k / n if n else 0.0,
        p0=p0,
        p_value=p_value,
        stolen=p_value < alpha,
    )


def generate_marks_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair for the record of marks: (private, public), 32 bytes each."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes_raw()
    return raw, private.public_key().public_bytes_raw()


def _aead_key(shared: bytes) -> AESGCM:
    kdf = HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=MARKS_INFO)
    return AESGCM(kdf.derive(shared))


def _serialize(inputs: Array, watermark_labels: Array, true_labels: Array) -> bytes:
    array = np.asarray(inputs)
    if array.dtype.kind not in "biuf":
        raise TypeError("inputs must be real numbers")
    if array.ndim < 1 or array.ndim > _MAX_NDIM:
        raise ValueError(f"inputs must have 1 to {_MAX_NDIM} dimensions")
    features = np.ascontiguousarray(array, dtype="<f4")
    count = features.shape[0]
    marked = np.ascontiguousarray(np.asarray(watermark_labels).reshape(-1), dtype="<i8")
    true = np.ascontiguousarray(np.asarray(true_labels).reshape(-1), dtype="<i8")
    if len(marked) != count or len(true) != count:
        raise ValueError("one watermark label and one true label per input row are needed")
    header = struct.pack(f"<B{features.ndim}Q", features.ndim, *features.shape)
    return header + features.tobytes() + marked.tobytes() + true.tobytes()


def _deserialize(payload: bytes) -> tuple[Array, Array, Array]:
    if not payload:
        raise MarksError("the record of marks is empty")
    ndim = payload[0]
    if not 1 <= ndim <= _MAX_NDIM or len(payload) < 1 + 8 * ndim:
        raise MarksError("the record of marks is malformed")
    shape = struct.unpack_from(f"<{ndim}Q", payload, 1)
    offset = 1 + 8 * ndim
    count = shape[0]
    size = math.prod(shape)
    if len(payload) != offset + 4 * size + 16 * count:
        raise MarksError("the record of marks is malformed")
    inputs = np.frombuffer(payload, dtype="<f4", count=size, offset=offset).reshape(shape)
    offset += 4 * size
    marked = np.frombuffer(payload, dtype="<i8", count=count, offset=offset)
    true = np.frombuffer(payload, dtype="<i8", count=count, offset=offset + 8 * count)
    return inputs.copy(), marked.copy(), true.copy()


def seal_marks(
    public_key: bytes, inputs: Array, watermark_labels: Array, true_labels: Array
) -> bytes:
    """Seal a record of marked queries to the owner's X25519 public key (32 bytes).

    ``inputs`` are stored as their canonical float32 values, the values they were marked
    by. Anyone may seal; only the private key's holder can open.
    """
    payload = _serialize(inputs, watermark_labels, true_labels)
    try:
        recipient = X25519PublicKey.from_public_bytes(bytes(public_key))
    except ValueError:
        raise ValueError("the marks public key must be 32 bytes of X25519") from None
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    try:
        shared = ephemeral.exchange(recipient)
    except ValueError:  # a low-order point: no shared secret
        raise ValueError("the marks public key is not a usable X25519 key") from None
    nonce = os.urandom(_NONCE_BYTES)
    sealed = _aead_key(shared).encrypt(nonce, payload, ephemeral_public)
    return bytes([MARKS_VERSION]) + ephemeral_public + nonce + sealed


def open_marks(private_key: bytes, blob: bytes) -> tuple[Array, Array, Array]:
    """Open a sealed record: (inputs float32, watermark labels int64, true labels int64).

    Raises :class:`MarksError` when the blob was altered, is not a record of marks, or
    was sealed to another key.
    """
    blob = bytes(blob)
    if len(blob) < _HEADER_BYTES + 16 or blob[0] != MARKS_VERSION:
        raise MarksError("not a sealed record of marks (version 1)")
    ephemeral_public = blob[1 : 1 + _KEY_BYTES]
    nonce = blob[1 + _KEY_BYTES : _HEADER_BYTES]
    try:
        private = X25519PrivateKey.from_private_bytes(bytes(private_key))
    except ValueError:
        raise ValueError("the marks private key must be 32 bytes of X25519") from None
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        payload = _aead_key(shared).decrypt(nonce, blob[_HEADER_BYTES:], ephemeral_public)
    except (InvalidTag, ValueError):
        raise MarksError("the record of marks is not authentic for this key") from None
    return _deserialize(payload)
