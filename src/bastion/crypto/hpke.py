"""HPKE (RFC 9180) base mode, plus the symmetric pieces OHTTP needs.

Only DHKEM(X25519, HKDF-SHA256) with HKDF-SHA256 and either AES-128-GCM or ChaCha20-Poly1305
is supported: those are the suites Oblivious HTTP deployments use, and a short list keeps the
code that handles untrusted input small. Everything runs on native primitives: X25519 and
the AEADs of pyca `cryptography` (one AEAD object per context, the private key object
loaded once), HKDF-SHA256 as `hmac.new` calls (OpenSSL's HMAC), and the parts of the
key schedule that depend only on the suite and `info` computed once. Every request costs one
X25519 exchange (two for a sender, who makes an ephemeral key) and a handful of HMACs.
pyhpke, the implementation this module used to wrap, serves only as the reference the
tests hold this one to (tests/unit/crypto/test_hpke.py), beside RFC 9180's vectors.

Errors never carry key bytes or plaintext.
"""

from __future__ import annotations

import functools
import hmac
import struct
from dataclasses import dataclass
from typing import NoReturn, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

KEM_X25519_SHA256 = 0x0020
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM = 0x0001
AEAD_CHACHA20_POLY1305 = 0x0003

# Sizes from RFC 9180 section 7: Nsk/Npk/Nenc per KEM, Nh per KDF, Nk/Nn per AEAD.
_KEM_ENC_SIZE = {KEM_X25519_SHA256: 32}
_KDF_HASH_SIZE = {KDF_HKDF_SHA256: 32}
_AEAD_KEY_SIZE = {AEAD_AES_128_GCM: 16, AEAD_CHACHA20_POLY1305: 32}
_AEAD_NONCE_SIZE = 12
_HASH_SIZE = 32
AEAD_TAG_SIZE = 16

_HPKE_VERSION = b"HPKE-v1"
_MODE_BASE = b"\x00"


class HpkeError(Exception):
    """Base of the errors this module raises."""


class UnsupportedSuite(HpkeError):
    """A KEM, KDF or AEAD identifier that this adapter does not support."""


class OpenError(HpkeError):
    """Decryption or decapsulation failed: the input is not authentic for this key."""


@dataclass(frozen=True, slots=True)
class Suite:
    """An HPKE cipher suite, by its IANA identifiers."""

    kem_id: int
    kdf_id: int
    aead_id: int

    def is_supported(self) -> bool:
        """Whether this adapter implements the suite."""
        return (
            self.kem_id in _KEM_ENC_SIZE
            and self.kdf_id in _KDF_HASH_SIZE
            and self.aead_id in _AEAD_KEY_SIZE
        )

    def __str__(self) -> str:
        return f"kem=0x{self.kem_id:04x}, kdf=0x{self.kdf_id:04x}, aead=0x{self.aead_id:04x}"


SUPPORTED_SUITES: tuple[Suite, ...] = (
    Suite(KEM_X25519_SHA256, KDF_HKDF_SHA256, AEAD_AES_128_GCM),
    Suite(KEM_X25519_SHA256, KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305),
)


def aead_key_size(aead_id: int) -> int:
    """Nk, the AEAD key length in bytes."""
    try:
        return _AEAD_KEY_SIZE[aead_id]
    except KeyError:
        raise UnsupportedSuite(f"unsupported HPKE AEAD 0x{aead_id:04x}") from None


def aead_nonce_size(aead_id: int) -> int:
    """Nn, the AEAD nonce length in bytes."""
    aead_key_size(aead_id)
    return _AEAD_NONCE_SIZE


def enc_size(kem_id: int) -> int:
    """Nenc, the length of the encapsulated key (equal to Npk for the supported KEM)."""
    try:
        return _KEM_ENC_SIZE[kem_id]
    except KeyError:
        raise UnsupportedSuite(f"unsupported HPKE KEM 0x{kem_id:04x}") from None


def _require_kdf(kdf_id: int) -> None:
    if kdf_id != KDF_HKDF_SHA256:
        raise UnsupportedSuite(f"unsupported HPKE KDF 0x{kdf_id:04x}")


def _require_supported(suite: Suite) -> None:
    if not suite.is_supported():
        raise UnsupportedSuite(f"unsupported HPKE suite ({suite})")


@dataclass(frozen=True, slots=True)
class _SuiteParams:
    """What the key schedule of one supported suite needs, computed once per suite."""

    kem_suite_id: bytes  # "KEM" || I2OSP(kem_id, 2)
    suite_id: bytes  # "HPKE" || I2OSP(kem_id, 2) || I2OSP(kdf_id, 2) || I2OSP(aead_id, 2)
    psk_id_hash: bytes  # LabeledExtract("", "psk_id_hash", "") for base mode's empty psk_id
    aead: type[AESGCM] | type[ChaCha20Poly1305]
    key_size: int
    nonce_size: int


@functools.lru_cache(maxsize=8)
def _suite_params(suite: Suite) -> _SuiteParams:
    _require_supported(suite)
    suite_id = b"HPKE" + struct.pack(">HHH", suite.kem_id, suite.kdf_id, suite.aead_id)
    return _SuiteParams(
        kem_suite_id=b"KEM" + struct.pack(">H", suite.kem_id),
        suite_id=suite_id,
        psk_id_hash=_labeled_extract(suite_id, b"", b"psk_id_hash", b""),
        aead=AESGCM if suite.aead_id == AEAD_AES_128_GCM else ChaCha20Poly1305,
        key_size=_AEAD_KEY_SIZE[suite.aead_id],
        nonce_size=_AEAD_NONCE_SIZE,
    )


@functools.lru_cache(maxsize=64)
def _key_schedule_context(suite: Suite, info: bytes) -> bytes:
    """mode_base || psk_id_hash || LabeledExtract("", "info_hash", info) (RFC 9180 5.1).

    It depends only on the suite and `info`, which is the same for every request to one
    OHTTP key, so it is computed once; neither is secret."""
    params = _suite_params(suite)
    info_hash = _labeled_extract(params.suite_id, b"", b"info_hash", info)
    return _MODE_BASE + params.psk_id_hash + info_hash


# --- HKDF-SHA256 (RFC 5869) and HPKE's labelled forms (RFC 9180 section 4) ----------------
# Each HMAC-SHA256 runs in OpenSSL through hmac.new (a request takes ten or so, ~1.5 µs
# each). Not hmac.digest, as quick alone: it releases the GIL around every call, and on a
# worker whose other threads are runnable each release costs a wait for the GIL's return.


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, "sha256").digest()


def _extract(salt: bytes, ikm: bytes) -> bytes:
    # An empty salt stands for HashLen zero bytes (RFC 5869 2.2): HMAC pads it so anyway.
    return _hmac(salt, ikm)


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    if length <= _HASH_SIZE:
        return _hmac(prk, info + b"\x01")[:length]
    if length > 255 * _HASH_SIZE:
        raise ValueError("HKDF-Expand length out of range")
    blocks: list[bytes] = []
    block = b""
    for counter in range(1, -(-length // _HASH_SIZE) + 1):
        block = _hmac(prk, block + info + bytes((counter,)))
        blocks.append(block)
    return b"".join(blocks)[:length]


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, _HPKE_VERSION + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled_info = length.to_bytes(2, "big") + _HPKE_VERSION + suite_id + label + info
    return _expand(prk, labeled_info, length)


def _x25519_public(raw: bytes) -> X25519PublicKey:
    if len(raw) != 32:
        raise ValueError("an X25519 public key has 32 bytes")
    return X25519PublicKey.from_public_bytes(raw)


class PrivateKey:
    """An HPKE KEM private key. Its repr shows only the public key."""

    __slots__ = ("_kem_id", "_key", "_public")

    def __init__(self, kem_id: int, key: X25519PrivateKey, public: bytes) -> None:
        # Use generate(), from_bytes() or derive(); this constructor trusts its arguments.
        self._kem_id = kem_id
        self._key = key
        self._public = public

    @classmethod
    def generate(cls, kem_id: int = KEM_X25519_SHA256) -> PrivateKey:
        """A fresh random key pair."""
        enc_size(kem_id)
        return cls._of(kem_id, X25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, kem_id: int, raw: bytes) -> PrivateKey:
        """Load a serialized private key (SerializePrivateKey of RFC 9180)."""
        if len(raw) != enc_size(kem_id):
            raise HpkeError("the private key has the wrong length")
        return cls._of(kem_id, X25519PrivateKey.from_private_bytes(bytes(raw)))

    @classmethod
    def derive(cls, kem_id: int, ikm: bytes) -> PrivateKey:
        """DeriveKeyPair(ikm) of RFC 9180 section 7.1.3; for known-answer tests."""
        enc_size(kem_id)
        kem_suite_id = b"KEM" + struct.pack(">H", kem_id)
        dkp_prk = _labeled_extract(kem_suite_id, b"", b"dkp_prk", ikm)
        secret = _labeled_expand(kem_suite_id, dkp_prk, b"sk", b"", _KEM_ENC_SIZE[kem_id])
        return cls._of(kem_id, X25519PrivateKey.from_private_bytes(secret))

    @classmethod
    def _of(cls, kem_id: int, key: X25519PrivateKey) -> PrivateKey:
        return cls(kem_id, key, key.public_key().public_bytes_raw())

    @property
    def kem_id(self) -> int:
        return self._kem_id

    def to_bytes(self) -> bytes:
        """The raw secret. Handle with care: never log it."""
        return self._key.private_bytes_raw()

    def public_bytes(self) -> bytes:
        """The raw public key (SerializePublicKey of RFC 9180)."""
        return self._public

    def __repr__(self) -> str:
        return f"PrivateKey(kem_id=0x{self._kem_id:04x}, public={self._public.hex()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivateKey):
            return NotImplemented
        return self._kem_id == other._kem_id and hmac.compare_digest(
            self.to_bytes(), other.to_bytes()
        )

    def __hash__(self) -> int:
        return hash((self._kem_id, self._public))

    def __reduce__(self) -> NoReturn:
        # Keys cross process boundaries only as explicit bytes, never through pickle.
        raise TypeError("an HPKE private key cannot be pickled")


class _Context:
    """The key schedule's output (RFC 9180 5.1): the AEAD with its base nonce and sequence
    number, and the exporter secret."""

    __slots__ = ("_aead", "_base_nonce", "_exporter_secret", "_limit", "_seq", "_suite_id")

    def __init__(self, params: _SuiteParams, shared_secret: bytes, context: bytes) -> None:
        # `context` is the key schedule context (_key_schedule_context).
        suite_id = params.suite_id
        secret = _labeled_extract(suite_id, shared_secret, b"secret", b"")
        key = _labeled_expand(suite_id, secret, b"key", context, params.key_size)
        base_nonce = _labeled_expand(suite_id, secret, b"base_nonce", context, params.nonce_size)
        self._exporter_secret = _labeled_expand(suite_id, secret, b"exp", context, _HASH_SIZE)
        self._suite_id = suite_id
        self._aead = params.aead(key)
        self._base_nonce = int.from_bytes(base_nonce, "big")
        self._seq = 0
        # RFC 9180 5.2: the sequence number must never reach 2^(8*Nn) - 1.
        self._limit = (1 << (8 * params.nonce_size)) - 1

    def _nonce(self) -> bytes:
        if self._seq >= self._limit:
            raise HpkeError("HPKE message limit reached")
        return (self._base_nonce ^ self._seq).to_bytes(_AEAD_NONCE_SIZE, "big")

    def export(self, exporter_context: bytes, length: int) -> bytes:
        """Export a secret of `length` bytes bound to `exporter_context` (RFC 9180 5.3)."""
        # RFC 9180 5.3 bounds L by 255 * Nh; the only supported KDF has Nh = 32.
        if not 0 < length <= 255 * _HASH_SIZE:
            raise ValueError("export length out of range")
        return _labeled_expand(
            self._suite_id, self._exporter_secret, b"sec", exporter_context, length
        )


class SenderContext(_Context):
    """The sender's HPKE context: seal messages in order, export secrets."""

    __slots__ = ()

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Encrypt the next message; each call uses the next sequence number."""
        nonce = self._nonce()
        try:
            sealed = self._aead.encrypt(nonce, plaintext, aad)
        except (ValueError, OverflowError) as exc:
            raise HpkeError("HPKE seal failed") from exc
        self._seq += 1
        return sealed


class RecipientContext(_Context):
    """The recipient's HPKE context: open messages in order, export secrets.

    RFC 9180 advances the sequence number only when an open succeeds; a context that saw a
    forgery stays in step, but nothing good can follow one, so this context refuses every
    open after the first failure (as it always has).
    """

    __slots__ = ("_failed",)

    def __init__(self, params: _SuiteParams, shared_secret: bytes, context: bytes) -> None:
        super().__init__(params, shared_secret, context)
        self._failed = False

    def open(self, ciphertext: bytes, aad: bytes = b"") -> bytes:
        """Decrypt the next message; raises OpenError if it is not authentic."""
        if self._failed:
            raise OpenError("HPKE context unusable after a failed open")
        try:
            plaintext = self._aead.decrypt(self._nonce(), ciphertext, aad)
        except (InvalidTag, ValueError, OverflowError, HpkeError):
            self._failed = True
            raise OpenError("HPKE open failed") from None
        self._seq += 1
        return plaintext


def _shared_secret(params: _SuiteParams, dh: bytes, enc: bytes, public_r: bytes) -> bytes:
    """ExtractAndExpand(dh, kem_context) of DHKEM (RFC 9180 4.1)."""
    kem_suite_id = params.kem_suite_id
    eae_prk = _labeled_extract(kem_suite_id, b"", b"eae_prk", dh)
    return _labeled_expand(kem_suite_id, eae_prk, b"shared_secret", enc + public_r, _HASH_SIZE)


def setup_sender(
    suite: Suite,
    public_key: bytes,
    info: bytes,
    *,
    ikm_e: bytes | None = None,
    ephemeral_key: PrivateKey | None = None,
) -> tuple[bytes, SenderContext]:
    """SetupBaseS(pkR, info): returns (enc, context).

    `ikm_e` (derive the ephemeral key) and `ephemeral_key` (use it as is) exist only for
    known-answer tests; production callers leave both unset to get a fresh random key.
    """
    params = _suite_params(suite)
    if ikm_e is not None and ephemeral_key is not None:
        raise ValueError("give ikm_e or ephemeral_key, not both")
    if len(public_key) != enc_size(suite.kem_id):
        raise HpkeError("the public key has the wrong length")
    if ikm_e is not None:
        ephemeral = PrivateKey.derive(suite.kem_id, ikm_e)
    elif ephemeral_key is not None:
        if ephemeral_key.kem_id != suite.kem_id:
            raise UnsupportedSuite("the ephemeral key is for another KEM")
        ephemeral = ephemeral_key
    else:
        ephemeral = PrivateKey.generate(suite.kem_id)
    public_key = bytes(public_key)
    try:
        # X25519 refuses a low-order public key (the shared secret would be all zeros).
        dh = ephemeral._key.exchange(_x25519_public(public_key))
    except ValueError as exc:
        raise HpkeError("HPKE encapsulation failed") from exc
    enc = ephemeral.public_bytes()
    shared_secret = _shared_secret(params, dh, enc, public_key)
    return enc, SenderContext(params, shared_secret, _key_schedule_context(suite, bytes(info)))


def setup_recipient(
    suite: Suite, private_key: PrivateKey, enc: bytes, info: bytes
) -> RecipientContext:
    """SetupBaseR(enc, skR, info). Raises OpenError if `enc` cannot be decapsulated."""
    params = _suite_params(suite)
    if private_key.kem_id != suite.kem_id:
        raise UnsupportedSuite("the private key is for another KEM")
    if len(enc) != enc_size(suite.kem_id):
        raise OpenError("the encapsulated key has the wrong length")
    enc = bytes(enc)
    try:
        # A low-order point gives an all-zero shared secret, which X25519 refuses.
        dh = private_key._key.exchange(_x25519_public(enc))
    except ValueError:
        raise OpenError("HPKE decapsulation failed") from None
    shared_secret = _shared_secret(params, dh, enc, private_key.public_bytes())
    return RecipientContext(params, shared_secret, _key_schedule_context(suite, bytes(info)))


def kdf_extract(kdf_id: int, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract(salt, ikm) (RFC 5869), without HPKE's labels."""
    _require_kdf(kdf_id)
    return _extract(salt, ikm)


def kdf_expand(kdf_id: int, prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand(prk, info, length) (RFC 5869), without HPKE's labels."""
    _require_kdf(kdf_id)
    return _expand(prk, info, length)


class AeadCipher(Protocol):
    """What pyca's AESGCM and ChaCha20Poly1305 objects offer."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


def aead_cipher(aead_id: int, key: bytes) -> AeadCipher:
    """A reusable AEAD object for `key`, for callers that encrypt many chunks with it."""
    if len(key) != aead_key_size(aead_id):
        raise ValueError("the AEAD key has the wrong length")
    if aead_id == AEAD_AES_128_GCM:
        return AESGCM(key)
    return ChaCha20Poly1305(key)


def aead_seal(aead_id: int, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """AEAD Seal: the ciphertext followed by the 16-byte tag."""
    if len(nonce) != aead_nonce_size(aead_id):
        raise ValueError("the AEAD nonce has the wrong length")
    return aead_cipher(aead_id, key).encrypt(nonce, plaintext, aad)


def aead_open(aead_id: int, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes = b"") -> bytes:
    """AEAD Open. Raises OpenError if the ciphertext or aad is not authentic."""
    if len(nonce) != aead_nonce_size(aead_id):
        raise ValueError("the AEAD nonce has the wrong length")
    try:
        return aead_cipher(aead_id, key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise OpenError("AEAD authentication failed") from None
