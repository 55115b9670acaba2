"""HPKE (RFC 9180) base mode, plus the symmetric pieces OHTTP needs.

Three KEMs, each with HKDF-SHA256 and either AES-128-GCM or ChaCha20-Poly1305:

- DHKEM(X25519, HKDF-SHA256) (0x0020), the classical KEM Oblivious HTTP deployments use;
- ML-KEM-768 (0x0041) and the hybrid MLKEM768-X25519 (0x647A, X-Wing), the post-quantum
  KEMs of draft-ietf-hpke-pq: traffic recorded today stays private against a future quantum
  computer. The hybrid is secure while either ML-KEM-768 or X25519 is, and is the one
  Bastion prefers.

A short list keeps the code that handles untrusted input small. Everything runs on native
primitives: X25519, ML-KEM-768 and the AEADs of pyca `cryptography` (one AEAD object per
context, the private key objects loaded once), SHAKE256 and SHA3-256 from hashlib, HKDF-SHA256
as `hmac.new` calls (OpenSSL's HMAC), and the parts of the key schedule that depend only on
the suite and `info` computed once. Only the composition is ours: the X-Wing combiner and
key derivation, and HPKE's key schedule and exporter (which `cryptography`'s single-shot
HPKE does not offer, and OHTTP's responses need). The key schedule is RFC 9180's for every
KEM. pyhpke (for DHKEM) and `cryptography`'s own HPKE (for the post-quantum KEMs) serve as
the independent implementations the tests hold this one to, beside the RFC's and the
draft's published vectors (tests/unit/crypto/test_hpke.py, test_hpke_pq.py).

Errors never carry key bytes or plaintext.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

KEM_X25519_SHA256 = 0x0020
KEM_MLKEM768 = 0x0041
KEM_MLKEM768_X25519 = 0x647A
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM = 0x0001
AEAD_CHACHA20_POLY1305 = 0x0003

# Sizes from RFC 9180 section 7 and draft-ietf-hpke-pq: Nh per KDF, Nk/Nn per AEAD (each
# KEM's Nenc, Npk and Nsk are on its class below).
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
            self.kem_id in _KEMS
            and self.kdf_id in _KDF_HASH_SIZE
            and self.aead_id in _AEAD_KEY_SIZE
        )

    def __str__(self) -> str:
        return f"kem=0x{self.kem_id:04x}, kdf=0x{self.kdf_id:04x}, aead=0x{self.aead_id:04x}"


SUPPORTED_SUITES: tuple[Suite, ...] = tuple(
    Suite(kem_id, KDF_HKDF_SHA256, aead_id)
    for kem_id in (KEM_MLKEM768_X25519, KEM_MLKEM768, KEM_X25519_SHA256)
    for aead_id in (AEAD_AES_128_GCM, AEAD_CHACHA20_POLY1305)
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


# --- KEMs (RFC 9180 section 4.1; draft-ietf-hpke-pq) -----------------------------------------
# Each KEM turns a recipient's public key into (shared_secret, enc) and back. A private key
# is kept as the KEM's key objects (loaded once) beside its serialization (Nsk bytes: the
# X25519 scalar, or the seed the ML-KEM keys are expanded from).


class _Kem:
    """What the key schedule needs from one KEM."""

    kem_id: int
    name: str
    public_size: int  # Npk
    enc_size: int  # Nenc
    private_size: int  # Nsk
    post_quantum: bool

    def load(self, raw: bytes) -> tuple[Any, bytes]:
        """The key objects and the public key of the serialized private key `raw`."""
        raise NotImplementedError

    def derive(self, ikm: bytes) -> bytes:
        """DeriveKeyPair(ikm): the serialized private key."""
        raise NotImplementedError

    def encap(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Encap(pkR): (shared_secret, enc). ValueError if `public_key` is unusable."""
        raise NotImplementedError

    def decap(self, material: Any, public_key: bytes, enc: bytes) -> bytes:
        """Decap(enc, skR): the shared secret. ValueError if `enc` is unusable."""
        raise NotImplementedError

    def usable(self, public_key: bytes) -> bool:
        """Whether a public key of the right length can be encapsulated to."""
        return True


class _DhKemX25519(_Kem):
    """DHKEM(X25519, HKDF-SHA256), RFC 9180 section 4.1."""

    kem_id = KEM_X25519_SHA256
    name = "x25519"
    public_size = enc_size = private_size = 32
    post_quantum = False
    _suite_id = b"KEM" + struct.pack(">H", KEM_X25519_SHA256)

    def load(self, raw: bytes) -> tuple[X25519PrivateKey, bytes]:
        key = X25519PrivateKey.from_private_bytes(raw)
        return key, key.public_key().public_bytes_raw()

    def derive(self, ikm: bytes) -> bytes:
        dkp_prk = _labeled_extract(self._suite_id, b"", b"dkp_prk", ikm)
        return _labeled_expand(self._suite_id, dkp_prk, b"sk", b"", self.private_size)

    def encap(self, public_key: bytes) -> tuple[bytes, bytes]:
        return self.encap_with(X25519PrivateKey.generate(), public_key)

    def encap_with(self, ephemeral: X25519PrivateKey, public_key: bytes) -> tuple[bytes, bytes]:
        # X25519 refuses a low-order public key (the shared secret would be all zeros).
        dh = ephemeral.exchange(_x25519_public(public_key))
        enc = ephemeral.public_key().public_bytes_raw()
        return self._extract_and_expand(dh, enc + public_key), enc

    def decap(self, material: X25519PrivateKey, public_key: bytes, enc: bytes) -> bytes:
        dh = material.exchange(_x25519_public(enc))
        return self._extract_and_expand(dh, enc + public_key)

    def _extract_and_expand(self, dh: bytes, kem_context: bytes) -> bytes:
        eae_prk = _labeled_extract(self._suite_id, b"", b"eae_prk", dh)
        return _labeled_expand(self._suite_id, eae_prk, b"shared_secret", kem_context, _HASH_SIZE)


# ML-KEM-768 sizes (FIPS 203): encapsulation key, ciphertext, and the seed d || z.
_MLKEM768_PUBLIC = 1184
_MLKEM768_CIPHERTEXT = 1088
_MLKEM_SEED = 64


def _mlkem_key_valid(public_key: bytes) -> bool:
    """FIPS 203's encapsulation key check on the ML-KEM-768 key a public key starts with."""
    try:
        MLKEM768PublicKey.from_public_bytes(bytes(public_key[:_MLKEM768_PUBLIC]))
    except ValueError:
        return False
    return True


class _MlKem768(_Kem):
    """ML-KEM-768 (FIPS 203) as an HPKE KEM: its shared secret is HPKE's."""

    kem_id = KEM_MLKEM768
    name = "mlkem768"
    public_size = _MLKEM768_PUBLIC
    enc_size = _MLKEM768_CIPHERTEXT
    private_size = _MLKEM_SEED
    post_quantum = True

    def load(self, raw: bytes) -> tuple[MLKEM768PrivateKey, bytes]:
        key = MLKEM768PrivateKey.from_seed_bytes(raw)
        return key, key.public_key().public_bytes_raw()

    def usable(self, public_key: bytes) -> bool:
        return _mlkem_key_valid(public_key)

    def derive(self, ikm: bytes) -> bytes:
        return _shake256_derive(self.kem_id, ikm, self.private_size)

    def encap(self, public_key: bytes) -> tuple[bytes, bytes]:
        # from_public_bytes checks the encapsulation key (FIPS 203 7.2's modulus check).
        shared_secret, ciphertext = MLKEM768PublicKey.from_public_bytes(public_key).encapsulate()
        return shared_secret, ciphertext

    def decap(self, material: MLKEM768PrivateKey, public_key: bytes, enc: bytes) -> bytes:
        # A well-formed but forged ciphertext gives a pseudo-random secret (implicit
        # rejection): the AEAD then fails, as for any wrong key.
        return material.decapsulate(enc)


# X-Wing's combiner label, the six bytes \.//^\ (draft-connolly-cfrg-xwing-kem).
_XWING_LABEL = b"\\.//^\\"
_XWING_SEED = 32


class _XWing(_Kem):
    """MLKEM768-X25519 (X-Wing): ML-KEM-768 and X25519 combined with SHA3-256.

    Public key pk_M || pk_X (1216 bytes), ciphertext ct_M || ct_X (1120 bytes), private key
    a 32-byte seed expanded by SHAKE256 into the ML-KEM seed and the X25519 scalar.
    """

    kem_id = KEM_MLKEM768_X25519
    name = "mlkem768-x25519"
    public_size = _MLKEM768_PUBLIC + 32
    enc_size = _MLKEM768_CIPHERTEXT + 32
    private_size = _XWING_SEED
    post_quantum = True

    def load(self, raw: bytes) -> tuple[tuple[MLKEM768PrivateKey, X25519PrivateKey], bytes]:
        if len(raw) != _XWING_SEED:
            raise ValueError("an X-Wing private key is a 32-byte seed")
        expanded = hashlib.shake_256(raw).digest(_MLKEM_SEED + 32)
        mlkem_key = MLKEM768PrivateKey.from_seed_bytes(expanded[:_MLKEM_SEED])
        x25519_key = X25519PrivateKey.from_private_bytes(expanded[_MLKEM_SEED:])
        public = (
            mlkem_key.public_key().public_bytes_raw() + x25519_key.public_key().public_bytes_raw()
        )
        return (mlkem_key, x25519_key), public

    def usable(self, public_key: bytes) -> bool:
        return _mlkem_key_valid(public_key)

    def derive(self, ikm: bytes) -> bytes:
        return _shake256_derive(self.kem_id, ikm, self.private_size)

    def encap(self, public_key: bytes) -> tuple[bytes, bytes]:
        if len(public_key) != self.public_size:
            raise ValueError("an X-Wing public key has 1216 bytes")
        pk_m, pk_x = public_key[:_MLKEM768_PUBLIC], public_key[_MLKEM768_PUBLIC:]
        ss_m, ct_m = MLKEM768PublicKey.from_public_bytes(pk_m).encapsulate()
        ephemeral = X25519PrivateKey.generate()
        ct_x = ephemeral.public_key().public_bytes_raw()
        ss_x = ephemeral.exchange(_x25519_public(pk_x))
        return _xwing_combine(ss_m, ss_x, ct_x, pk_x), ct_m + ct_x

    def decap(
        self,
        material: tuple[MLKEM768PrivateKey, X25519PrivateKey],
        public_key: bytes,
        enc: bytes,
    ) -> bytes:
        mlkem_key, x25519_key = material
        ct_m, ct_x = enc[:_MLKEM768_CIPHERTEXT], enc[_MLKEM768_CIPHERTEXT:]
        ss_m = mlkem_key.decapsulate(ct_m)
        ss_x = x25519_key.exchange(_x25519_public(ct_x))
        return _xwing_combine(ss_m, ss_x, ct_x, public_key[_MLKEM768_PUBLIC:])


def _xwing_combine(ss_m: bytes, ss_x: bytes, ct_x: bytes, pk_x: bytes) -> bytes:
    """SHA3-256(ss_M || ss_X || ct_X || pk_X || XWingLabel)."""
    return hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + _XWING_LABEL).digest()


def _shake256_derive(kem_id: int, ikm: bytes, length: int) -> bytes:
    """DeriveKeyPair's seed for the post-quantum KEMs: SHAKE256.LabeledDerive(ikm,
    "DeriveKeyPair", "", length) with the KEM's suite id (draft-ietf-hpke-pq-05 sections 3
    and 4, draft-ietf-hpke-hpke section 4), whatever the suite's own KDF."""
    label = b"DeriveKeyPair"
    message = b"".join(
        (
            ikm,
            _HPKE_VERSION,
            b"KEM" + struct.pack(">H", kem_id),
            struct.pack(">H", len(label)) + label,
            struct.pack(">H", length),
        )
    )
    return hashlib.shake_256(message).digest(length)


_KEMS: dict[int, _Kem] = {kem.kem_id: kem for kem in (_DhKemX25519(), _MlKem768(), _XWing())}
#: The KEMs by the names the settings and the command line use.
KEM_NAMES: dict[str, int] = {kem.name: kem.kem_id for kem in _KEMS.values()}


def _kem(kem_id: int) -> _Kem:
    try:
        return _KEMS[kem_id]
    except KeyError:
        raise UnsupportedSuite(f"unsupported HPKE KEM 0x{kem_id:04x}") from None


def kem_name(kem_id: int) -> str:
    """The KEM's short name (x25519, mlkem768, mlkem768-x25519), or its id in hex."""
    kem = _KEMS.get(kem_id)
    return kem.name if kem is not None else f"0x{kem_id:04x}"


def is_post_quantum(kem_id: int) -> bool:
    """Whether the KEM resists a quantum computer (ML-KEM alone, or in the hybrid)."""
    return _kem(kem_id).post_quantum


def enc_size(kem_id: int) -> int:
    """Nenc, the length of the encapsulated key."""
    return _kem(kem_id).enc_size


def public_key_size(kem_id: int) -> int:
    """Npk, the length of a serialized public key."""
    return _kem(kem_id).public_size


def public_key_usable(kem_id: int, public_key: bytes) -> bool:
    """Whether `public_key` can be encapsulated to: the right length and, for the ML-KEM
    KEMs, a valid encapsulation key (FIPS 203's modulus check). A low-order X25519 key is
    found only at encapsulation (the exchange refuses it)."""
    kem = _KEMS.get(kem_id)
    return kem is not None and len(public_key) == kem.public_size and kem.usable(public_key)


def private_key_size(kem_id: int) -> int:
    """Nsk, the length of a serialized private key."""
    return _kem(kem_id).private_size


class PrivateKey:
    """An HPKE KEM private key. Its repr shows only the public key."""

    __slots__ = ("_kem", "_material", "_public", "_raw")

    def __init__(self, kem: _Kem, raw: bytes, material: Any, public: bytes) -> None:
        # Use generate(), from_bytes() or derive(); this constructor trusts its arguments.
        self._kem = kem
        self._raw = raw
        self._material = material
        self._public = public

    @classmethod
    def generate(cls, kem_id: int = KEM_X25519_SHA256) -> PrivateKey:
        """A fresh random key pair."""
        kem = _kem(kem_id)
        return cls._of(kem, secrets.token_bytes(kem.private_size))

    @classmethod
    def from_bytes(cls, kem_id: int, raw: bytes) -> PrivateKey:
        """Load a serialized private key (SerializePrivateKey of RFC 9180)."""
        kem = _kem(kem_id)
        if len(raw) != kem.private_size:
            raise HpkeError("the private key has the wrong length")
        return cls._of(kem, bytes(raw))

    @classmethod
    def derive(cls, kem_id: int, ikm: bytes) -> PrivateKey:
        """DeriveKeyPair(ikm) (RFC 9180 7.1.3, draft-ietf-hpke-pq); for known-answer tests."""
        kem = _kem(kem_id)
        return cls._of(kem, kem.derive(bytes(ikm)))

    @classmethod
    def _of(cls, kem: _Kem, raw: bytes) -> PrivateKey:
        try:
            material, public = kem.load(raw)
        except ValueError:
            raise HpkeError("the private key is unusable") from None
        return cls(kem, raw, material, public)

    @property
    def kem_id(self) -> int:
        return self._kem.kem_id

    def to_bytes(self) -> bytes:
        """The raw secret (Nsk bytes). Handle with care: never log it."""
        return self._raw

    def public_bytes(self) -> bytes:
        """The raw public key (SerializePublicKey of RFC 9180)."""
        return self._public

    def __repr__(self) -> str:
        return f"PrivateKey(kem_id=0x{self.kem_id:04x}, public={self._public[:32].hex()}…)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivateKey):
            return NotImplemented
        return self.kem_id == other.kem_id and hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash((self.kem_id, self._public))

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
    known-answer tests of DHKEM; production callers leave both unset to get a fresh random
    key. (`cryptography` offers no derandomized ML-KEM encapsulation, so the post-quantum
    KEMs are checked from the recipient's side, and against another implementation.)
    """
    params = _suite_params(suite)
    kem = _kem(suite.kem_id)
    if ikm_e is not None and ephemeral_key is not None:
        raise ValueError("give ikm_e or ephemeral_key, not both")
    if len(public_key) != kem.public_size:
        raise HpkeError("the public key has the wrong length")
    public_key = bytes(public_key)
    try:
        if ikm_e is None and ephemeral_key is None:
            shared_secret, enc = kem.encap(public_key)
        else:
            if not isinstance(kem, _DhKemX25519):
                raise UnsupportedSuite("a chosen ephemeral key needs DHKEM(X25519)")
            if ephemeral_key is None:
                assert ikm_e is not None
                ephemeral_key = PrivateKey.derive(kem.kem_id, ikm_e)
            if ephemeral_key.kem_id != suite.kem_id:
                raise UnsupportedSuite("the ephemeral key is for another KEM")
            shared_secret, enc = kem.encap_with(ephemeral_key._material, public_key)
    except ValueError as exc:
        raise HpkeError("HPKE encapsulation failed") from exc
    return enc, SenderContext(params, shared_secret, _key_schedule_context(suite, bytes(info)))


def setup_recipient(
    suite: Suite, private_key: PrivateKey, enc: bytes, info: bytes
) -> RecipientContext:
    """SetupBaseR(enc, skR, info). Raises OpenError if `enc` cannot be decapsulated."""
    params = _suite_params(suite)
    if private_key.kem_id != suite.kem_id:
        raise UnsupportedSuite("the private key is for another KEM")
    kem = private_key._kem
    if len(enc) != kem.enc_size:
        raise OpenError("the encapsulated key has the wrong length")
    try:
        # X25519 refuses a low-order point (an all-zero shared secret).
        shared_secret = kem.decap(private_key._material, private_key._public, bytes(enc))
    except ValueError:
        raise OpenError("HPKE decapsulation failed") from None
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
