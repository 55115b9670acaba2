"""A thin adapter over pyhpke for HPKE (RFC 9180) base mode, plus the symmetric pieces OHTTP needs.

Only DHKEM(X25519, HKDF-SHA256) with HKDF-SHA256 and either AES-128-GCM or ChaCha20-Poly1305
is supported: those are the suites Oblivious HTTP deployments use, and a short list keeps the
code that handles untrusted input small. KEM encapsulation and the key schedule go through
pyhpke; the symmetric helpers (`kdf_extract`, `kdf_expand`, `aead_seal`, `aead_open`) call
pyca `cryptography` directly because OHTTP's response encryption needs nothing more.

Errors never carry key bytes or plaintext.
"""

from __future__ import annotations

import functools
import hmac
from dataclasses import dataclass
from typing import NoReturn, Protocol

import pyhpke
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from pyhpke.kem import KEM

KEM_X25519_SHA256 = 0x0020
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM = 0x0001
AEAD_CHACHA20_POLY1305 = 0x0003

# Sizes from RFC 9180 section 7: Nsk/Npk/Nenc per KEM, Nh per KDF, Nk/Nn per AEAD.
_KEM_ENC_SIZE = {KEM_X25519_SHA256: 32}
_KDF_HASH_SIZE = {KDF_HKDF_SHA256: 32}
_AEAD_KEY_SIZE = {AEAD_AES_128_GCM: 16, AEAD_CHACHA20_POLY1305: 32}
_AEAD_NONCE_SIZE = 12
AEAD_TAG_SIZE = 16


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


def _kdf_hash(kdf_id: int) -> hashes.HashAlgorithm:
    if kdf_id != KDF_HKDF_SHA256:
        raise UnsupportedSuite(f"unsupported HPKE KDF 0x{kdf_id:04x}")
    return hashes.SHA256()


def _require_supported(suite: Suite) -> None:
    if not suite.is_supported():
        raise UnsupportedSuite(f"unsupported HPKE suite ({suite})")


@functools.lru_cache(maxsize=8)
def _cipher_suite(suite: Suite) -> pyhpke.CipherSuite:
    # A pyhpke CipherSuite holds only algorithm descriptors, so one per suite can be shared;
    # building it costs more than the AEAD operation on a small message.
    _require_supported(suite)
    return pyhpke.CipherSuite.new(
        pyhpke.KEMId(suite.kem_id), pyhpke.KDFId(suite.kdf_id), pyhpke.AEADId(suite.aead_id)
    )


def _kem(kem_id: int) -> KEM:
    enc_size(kem_id)
    return KEM(pyhpke.KEMId(kem_id))


class PrivateKey:
    """An HPKE KEM private key. Its repr shows only the public key."""

    __slots__ = ("_kem_id", "_key", "_public")

    def __init__(self, kem_id: int, key: pyhpke.KEMKeyInterface, public: bytes) -> None:
        # Use generate(), from_bytes() or derive(); this constructor trusts its arguments.
        self._kem_id = kem_id
        self._key = key
        self._public = public

    @classmethod
    def generate(cls, kem_id: int = KEM_X25519_SHA256) -> PrivateKey:
        """A fresh random key pair."""
        enc_size(kem_id)
        secret = X25519PrivateKey.generate()
        key = pyhpke.KEMKey.from_pyca_cryptography_key(secret)
        return cls(kem_id, key, secret.public_key().public_bytes_raw())

    @classmethod
    def from_bytes(cls, kem_id: int, raw: bytes) -> PrivateKey:
        """Load a serialized private key (SerializePrivateKey of RFC 9180)."""
        if len(raw) != enc_size(kem_id):
            raise HpkeError("the private key has the wrong length")
        secret = X25519PrivateKey.from_private_bytes(raw)
        key = pyhpke.KEMKey.from_pyca_cryptography_key(secret)
        return cls(kem_id, key, secret.public_key().public_bytes_raw())

    @classmethod
    def derive(cls, kem_id: int, ikm: bytes) -> PrivateKey:
        """DeriveKeyPair(ikm) of RFC 9180 section 7.1.3; for known-answer tests."""
        pair = _kem(kem_id).derive_key_pair(ikm)
        return cls(kem_id, pair.private_key, pair.public_key.to_public_bytes())

    @property
    def kem_id(self) -> int:
        return self._kem_id

    def to_bytes(self) -> bytes:
        """The raw secret. Handle with care: never log it."""
        return self._key.to_private_bytes()

    def public_bytes(self) -> bytes:
        """The raw public key (SerializePublicKey of RFC 9180)."""
        return self._public

    def _key_pair(self) -> pyhpke.KEMKeyPair:
        public = _kem(self._kem_id).deserialize_public_key(self._public)
        return pyhpke.KEMKeyPair(self._key, public)

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


class SenderContext:
    """The sender's HPKE context: seal messages in order, export secrets."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: pyhpke.ContextInterface) -> None:
        self._ctx = ctx

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Encrypt the next message; each call uses the next sequence number."""
        try:
            return self._ctx.seal(plaintext, aad)
        except pyhpke.PyHPKEError as exc:
            raise HpkeError("HPKE seal failed") from exc

    def export(self, exporter_context: bytes, length: int) -> bytes:
        """Export a secret of `length` bytes bound to `exporter_context` (RFC 9180 5.3)."""
        return _export(self._ctx, exporter_context, length)


class RecipientContext:
    """The recipient's HPKE context: open messages in order, export secrets.

    pyhpke advances the sequence number even when an open fails, whereas RFC 9180 advances
    it only on success. Rather than continue out of step, a context refuses every open
    after the first failure.
    """

    __slots__ = ("_ctx", "_failed")

    def __init__(self, ctx: pyhpke.ContextInterface) -> None:
        self._ctx = ctx
        self._failed = False

    def open(self, ciphertext: bytes, aad: bytes = b"") -> bytes:
        """Decrypt the next message; raises OpenError if it is not authentic."""
        if self._failed:
            raise OpenError("HPKE context unusable after a failed open")
        try:
            return self._ctx.open(ciphertext, aad)
        except pyhpke.PyHPKEError:
            self._failed = True
            raise OpenError("HPKE open failed") from None

    def export(self, exporter_context: bytes, length: int) -> bytes:
        """Export a secret of `length` bytes bound to `exporter_context` (RFC 9180 5.3)."""
        return _export(self._ctx, exporter_context, length)


def _export(ctx: pyhpke.ContextInterface, exporter_context: bytes, length: int) -> bytes:
    # RFC 9180 5.3 bounds L by 255 * Nh; the only supported KDF has Nh = 32.
    if not 0 < length <= 255 * 32:
        raise ValueError("export length out of range")
    return ctx.export(exporter_context, length)


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
    cipher_suite = _cipher_suite(suite)
    if ikm_e is not None and ephemeral_key is not None:
        raise ValueError("give ikm_e or ephemeral_key, not both")
    if len(public_key) != enc_size(suite.kem_id):
        raise HpkeError("the public key has the wrong length")
    eks: pyhpke.KEMKeyPair | None = None
    if ikm_e is not None:
        eks = cipher_suite.kem.derive_key_pair(ikm_e)
    elif ephemeral_key is not None:
        if ephemeral_key.kem_id != suite.kem_id:
            raise UnsupportedSuite("the ephemeral key is for another KEM")
        eks = ephemeral_key._key_pair()
    try:
        pkr = cipher_suite.kem.deserialize_public_key(public_key)
        enc, ctx = cipher_suite.create_sender_context(pkr, info, eks=eks)
    except (ValueError, pyhpke.PyHPKEError) as exc:
        # X25519 refuses a low-order public key (the shared secret would be all zeros).
        raise HpkeError("HPKE encapsulation failed") from exc
    return enc, SenderContext(ctx)


def setup_recipient(
    suite: Suite, private_key: PrivateKey, enc: bytes, info: bytes
) -> RecipientContext:
    """SetupBaseR(enc, skR, info). Raises OpenError if `enc` cannot be decapsulated."""
    cipher_suite = _cipher_suite(suite)
    if private_key.kem_id != suite.kem_id:
        raise UnsupportedSuite("the private key is for another KEM")
    if len(enc) != enc_size(suite.kem_id):
        raise OpenError("the encapsulated key has the wrong length")
    try:
        ctx = cipher_suite.create_recipient_context(enc, private_key._key, info)
    except (ValueError, pyhpke.PyHPKEError):
        # A low-order point gives an all-zero shared secret, which X25519 refuses.
        raise OpenError("HPKE decapsulation failed") from None
    return RecipientContext(ctx)


def kdf_extract(kdf_id: int, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract(salt, ikm) (RFC 5869), without HPKE's labels."""
    return HKDF.extract(_kdf_hash(kdf_id), salt, ikm)


def kdf_expand(kdf_id: int, prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand(prk, info, length) (RFC 5869), without HPKE's labels."""
    return HKDFExpand(_kdf_hash(kdf_id), length, info).derive(prk)


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
