"""Known-answer tests for the HPKE adapter.

Vectors: RFC 9180 Appendix A.1.1 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base
mode) and A.2.1 (same with ChaCha20-Poly1305), copied from the RFC text (they also appear in
https://github.com/cfrg/draft-irtf-cfrg-hpke test-vectors.json). HKDF: RFC 5869 A.1.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import pyhpke
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from bastion.crypto import hpke

# The classical suites, which RFC 9180's vectors and pyhpke cover.
X25519_SUITES = tuple(s for s in hpke.SUPPORTED_SUITES if s.kem_id == hpke.KEM_X25519_SHA256)

INFO = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")  # "Ode on a Grecian Urn"
PT = bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")


def aad(seq: int) -> bytes:
    return b"Count-%d" % seq


@dataclass(frozen=True)
class Vector:
    suite: hpke.Suite
    ikm_e: str
    pk_em: str
    sk_em: str
    ikm_r: str
    pk_rm: str
    sk_rm: str
    ciphertexts: dict[int, str]  # sequence number -> ct
    exports: dict[str, str]  # exporter_context -> 32-byte exported value


# RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, Base.
A_1_1 = Vector(
    suite=hpke.Suite(hpke.KEM_X25519_SHA256, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),
    ikm_e="7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234",
    pk_em="37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    sk_em="52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736",
    ikm_r="6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037",
    pk_rm="3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
    sk_rm="4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8",
    ciphertexts={
        0: "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a9"
        "6d8770ac83d07bea87e13c512a",
        1: "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab25"
        "1c03d0c22a56b8ca42c2063b84",
        2: "498dfcabd92e8acedc281e85af1cb4e3e31c7dc394a1ca20e173cb7251649158"
        "8d96a19ad4a683518973dcc180",
        4: "583bd32bc67a5994bb8ceaca813d369bca7b2a42408cddef5e22f880b631215a"
        "09fc0012bc69fccaa251c0246d",
        255: "7175db9717964058640a3a11fb9007941a5d1757fda1a6935c805c21af32505b"
        "f106deefec4a49ac38d71c9e0a",
        256: "957f9800542b0b8891badb026d79cc54597cb2d225b54c00c5238c25d05c30e3"
        "fbeda97d2e0e1aba483a2df9f2",
    },
    exports={
        "": "3853fe2b4035195a573ffc53856e77058e15d9ea064de3e59f4961d0095250ee",
        "00": "2e8f0b54673c7029649d4eb9d5e33bf1872cf76d623ff164ac185da9e88c21a5",
        "54657374436f6e74657874": (
            "e9e43065102c3836401bed8c3c3c75ae46be1639869391d62c61f1ec7af54931"
        ),
    },
)

# RFC 9180 Appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305, Base.
A_2_1 = Vector(
    suite=hpke.Suite(hpke.KEM_X25519_SHA256, hpke.KDF_HKDF_SHA256, hpke.AEAD_CHACHA20_POLY1305),
    ikm_e="909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b",
    pk_em="1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
    sk_em="f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600",
    ikm_r="1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df",
    pk_rm="4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a",
    sk_rm="8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb",
    ciphertexts={
        0: "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db"
        "21993c62ce81883d2dd1b51a28",
        1: "6b53c051e4199c518de79594e1c4ab18b96f081549d45ce015be002090bb119e"
        "85285337cc95ba5f59992dc98c",
        2: "71146bd6795ccc9c49ce25dda112a48f202ad220559502cef1f34271e0cb4b02"
        "b4f10ecac6f48c32f878fae86b",
        4: "63357a2aa291f5a4e5f27db6baa2af8cf77427c7c1a909e0b37214dd47db122b"
        "b153495ff0b02e9e54a50dbe16",
        255: "18ab939d63ddec9f6ac2b60d61d36a7375d2070c9b683861110757062c52b888"
        "0a5f6b3936da9cd6c23ef2a95c",
        256: "7a4a13e9ef23978e2c520fd4d2e757514ae160cd0cd05e556ef692370ca53076"
        "214c0c40d4c728d6ed9e727a5b",
    },
    exports={
        "": "4bbd6243b8bb54cec311fac9df81841b6fd61f56538a775e7c80a9f40160606e",
        "00": "8c1df14732580e5501b00f82b10a1647b40713191b7c1240ac80e2b68808ba69",
        "54657374436f6e74657874": (
            "5acb09211139c43b3090489a9da433e8a30ee7188ba8b0a9a1ccf0c229283e53"
        ),
    },
)

VECTORS = pytest.mark.parametrize("vector", [A_1_1, A_2_1], ids=["A.1.1", "A.2.1"])


def recipient_key(vector: Vector) -> hpke.PrivateKey:
    return hpke.PrivateKey.derive(hpke.KEM_X25519_SHA256, bytes.fromhex(vector.ikm_r))


@VECTORS
def test_derive_key_pair_matches_vector(vector: Vector) -> None:
    receiver = recipient_key(vector)
    assert receiver.to_bytes().hex() == vector.sk_rm
    assert receiver.public_bytes().hex() == vector.pk_rm
    ephemeral = hpke.PrivateKey.derive(hpke.KEM_X25519_SHA256, bytes.fromhex(vector.ikm_e))
    assert ephemeral.to_bytes().hex() == vector.sk_em
    assert ephemeral.public_bytes().hex() == vector.pk_em
    reloaded = hpke.PrivateKey.from_bytes(hpke.KEM_X25519_SHA256, bytes.fromhex(vector.sk_rm))
    assert reloaded == receiver
    assert reloaded.public_bytes() == receiver.public_bytes()


@VECTORS
def test_sender_matches_vector(vector: Vector) -> None:
    pk_r = bytes.fromhex(vector.pk_rm)
    enc, sender = hpke.setup_sender(vector.suite, pk_r, INFO, ikm_e=bytes.fromhex(vector.ikm_e))
    assert enc.hex() == vector.pk_em
    for seq in range(max(vector.ciphertexts) + 1):
        ct = sender.seal(PT, aad(seq))
        if seq in vector.ciphertexts:
            assert ct.hex() == vector.ciphertexts[seq], f"sequence {seq}"
    for context, value in vector.exports.items():
        assert sender.export(bytes.fromhex(context), 32).hex() == value


@VECTORS
def test_sender_with_explicit_ephemeral_key_matches_vector(vector: Vector) -> None:
    ephemeral = hpke.PrivateKey.from_bytes(hpke.KEM_X25519_SHA256, bytes.fromhex(vector.sk_em))
    enc, sender = hpke.setup_sender(
        vector.suite, bytes.fromhex(vector.pk_rm), INFO, ephemeral_key=ephemeral
    )
    assert enc.hex() == vector.pk_em
    assert sender.seal(PT, aad(0)).hex() == vector.ciphertexts[0]


@VECTORS
def test_recipient_matches_vector(vector: Vector) -> None:
    receiver = hpke.setup_recipient(
        vector.suite, recipient_key(vector), bytes.fromhex(vector.pk_em), INFO
    )
    for context, value in vector.exports.items():
        assert receiver.export(bytes.fromhex(context), 32).hex() == value
    _, sender = hpke.setup_sender(
        vector.suite, bytes.fromhex(vector.pk_rm), INFO, ikm_e=bytes.fromhex(vector.ikm_e)
    )
    for seq in range(max(vector.ciphertexts) + 1):
        ct = bytes.fromhex(vector.ciphertexts[seq]) if seq in vector.ciphertexts else None
        if ct is None:
            ct = sender.seal(PT, aad(seq))
        else:
            sender.seal(PT, aad(seq))  # Keep the sender's sequence in step.
        assert receiver.open(ct, aad(seq)) == PT, f"sequence {seq}"


def fresh_recipient(vector: Vector, key: hpke.PrivateKey | None = None) -> hpke.RecipientContext:
    return hpke.setup_recipient(
        vector.suite, key or recipient_key(vector), bytes.fromhex(vector.pk_em), INFO
    )


@VECTORS
def test_tampered_ciphertext_fails(vector: Vector) -> None:
    ct = bytearray.fromhex(vector.ciphertexts[0])
    for index in (0, len(ct) // 2, len(ct) - 1):  # body and tag
        tampered = bytearray(ct)
        tampered[index] ^= 0x01
        with pytest.raises(hpke.OpenError):
            fresh_recipient(vector).open(bytes(tampered), aad(0))
    with pytest.raises(hpke.OpenError):
        fresh_recipient(vector).open(bytes(ct[:-1]), aad(0))


@VECTORS
def test_wrong_aad_fails(vector: Vector) -> None:
    with pytest.raises(hpke.OpenError):
        fresh_recipient(vector).open(bytes.fromhex(vector.ciphertexts[0]), aad(1))


@VECTORS
def test_wrong_sequence_fails_and_poisons_the_context(vector: Vector) -> None:
    receiver = fresh_recipient(vector)
    with pytest.raises(hpke.OpenError):
        receiver.open(bytes.fromhex(vector.ciphertexts[1]), aad(1))
    # After a failure the context is out of step with RFC 9180, so it refuses everything.
    with pytest.raises(hpke.OpenError):
        receiver.open(bytes.fromhex(vector.ciphertexts[0]), aad(0))


@VECTORS
def test_wrong_private_key_fails(vector: Vector) -> None:
    other = hpke.PrivateKey.generate()
    with pytest.raises(hpke.OpenError):
        fresh_recipient(vector, other).open(bytes.fromhex(vector.ciphertexts[0]), aad(0))


@VECTORS
def test_wrong_info_fails(vector: Vector) -> None:
    receiver = hpke.setup_recipient(
        vector.suite, recipient_key(vector), bytes.fromhex(vector.pk_em), INFO + b"!"
    )
    with pytest.raises(hpke.OpenError):
        receiver.open(bytes.fromhex(vector.ciphertexts[0]), aad(0))


def test_bad_enc_fails_with_open_error() -> None:
    suite = X25519_SUITES[0]
    key = hpke.PrivateKey.generate()
    with pytest.raises(hpke.OpenError):
        hpke.setup_recipient(suite, key, b"\x01" * 31, b"")
    # The all-zero point has low order: X25519 would produce an all-zero shared secret.
    with pytest.raises(hpke.OpenError):
        hpke.setup_recipient(suite, key, bytes(32), b"")
    with pytest.raises(hpke.HpkeError):
        hpke.setup_sender(suite, bytes(32), b"")


@pytest.mark.parametrize(
    "suite",
    [
        hpke.Suite(0x0010, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),  # P-256 KEM
        hpke.Suite(hpke.KEM_X25519_SHA256, 0x0002, hpke.AEAD_AES_128_GCM),  # HKDF-SHA384
        hpke.Suite(hpke.KEM_X25519_SHA256, hpke.KDF_HKDF_SHA256, 0x0002),  # AES-256-GCM
        hpke.Suite(hpke.KEM_X25519_SHA256, hpke.KDF_HKDF_SHA256, 0xFFFF),  # export-only
    ],
)
def test_unsupported_suites_are_refused(suite: hpke.Suite) -> None:
    assert not suite.is_supported()
    key = hpke.PrivateKey.generate()
    with pytest.raises(hpke.UnsupportedSuite):
        hpke.setup_sender(suite, key.public_bytes(), b"")
    with pytest.raises(hpke.UnsupportedSuite):
        hpke.setup_recipient(suite, key, key.public_bytes(), b"")


def test_supported_suites_and_sizes() -> None:
    assert all(suite.is_supported() for suite in hpke.SUPPORTED_SUITES)
    assert {s.aead_id for s in hpke.SUPPORTED_SUITES} == {
        hpke.AEAD_AES_128_GCM,
        hpke.AEAD_CHACHA20_POLY1305,
    }
    assert hpke.aead_key_size(hpke.AEAD_AES_128_GCM) == 16
    assert hpke.aead_key_size(hpke.AEAD_CHACHA20_POLY1305) == 32
    assert hpke.aead_nonce_size(hpke.AEAD_AES_128_GCM) == 12
    assert hpke.enc_size(hpke.KEM_X25519_SHA256) == 32
    with pytest.raises(hpke.UnsupportedSuite):
        hpke.aead_key_size(0x0002)
    with pytest.raises(hpke.UnsupportedSuite):
        hpke.enc_size(0x0010)
    with pytest.raises(hpke.UnsupportedSuite):
        hpke.PrivateKey.generate(0x0010)


def test_private_key_never_shows_or_pickles_its_secret() -> None:
    key = hpke.PrivateKey.generate()
    assert key.to_bytes().hex() not in repr(key)
    assert key.public_bytes().hex() in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(hpke.HpkeError):
        hpke.PrivateKey.from_bytes(hpke.KEM_X25519_SHA256, b"\x01" * 31)


def test_round_trip_both_suites_with_random_keys() -> None:
    for suite in hpke.SUPPORTED_SUITES:
        key = hpke.PrivateKey.generate(suite.kem_id)
        enc, sender = hpke.setup_sender(suite, key.public_bytes(), b"info")
        receiver = hpke.setup_recipient(suite, key, enc, b"info")
        for index in range(3):
            message = b"message %d" % index
            assert receiver.open(sender.seal(message, b"a"), b"a") == message
        assert sender.export(b"x", 48) == receiver.export(b"x", 48)


def test_hkdf_matches_rfc_5869_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    prk = hpke.kdf_extract(hpke.KDF_HKDF_SHA256, salt, ikm)
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    okm = hpke.kdf_expand(hpke.KDF_HKDF_SHA256, prk, info, 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )
    with pytest.raises(hpke.UnsupportedSuite):
        hpke.kdf_extract(0x0002, salt, ikm)


@pytest.mark.parametrize("aead_id", [hpke.AEAD_AES_128_GCM, hpke.AEAD_CHACHA20_POLY1305])
def test_aead_helpers_round_trip_and_refuse_forgeries(aead_id: int) -> None:
    key = bytes(range(hpke.aead_key_size(aead_id)))
    nonce = bytes(12)
    ct = hpke.aead_seal(aead_id, key, nonce, b"secret", b"aad")
    assert len(ct) == len(b"secret") + hpke.AEAD_TAG_SIZE
    assert hpke.aead_open(aead_id, key, nonce, ct, b"aad") == b"secret"
    with pytest.raises(hpke.OpenError):
        hpke.aead_open(aead_id, key, nonce, ct, b"other")
    with pytest.raises(hpke.OpenError):
        hpke.aead_open(aead_id, key, nonce, ct[:-1] + bytes([ct[-1] ^ 1]), b"aad")
    with pytest.raises(ValueError):
        hpke.aead_seal(aead_id, key[:-1], nonce, b"")


# --- the native implementation against pyhpke, the reference it replaced -------------------


def _reference_suite(suite: hpke.Suite) -> pyhpke.CipherSuite:
    return pyhpke.CipherSuite.new(
        pyhpke.KEMId(suite.kem_id), pyhpke.KDFId(suite.kdf_id), pyhpke.AEADId(suite.aead_id)
    )


@pytest.mark.parametrize("suite", X25519_SUITES, ids=["AES-128-GCM", "ChaCha20-Poly1305"])
@pytest.mark.parametrize("trial", range(8))
def test_native_contexts_match_pyhpke_on_random_keys(suite: hpke.Suite, trial: int) -> None:
    reference = _reference_suite(suite)
    info = os.urandom(trial * 7)
    key = hpke.PrivateKey.generate()
    reference_key = reference.kem.deserialize_private_key(key.to_bytes())
    public = reference.kem.deserialize_public_key(key.public_bytes())
    # The OHTTP response key comes from this exporter secret (RFC 9458 4.4).
    contexts = [b"message/bhttp response", b"message/bhttp chunked response", b"", b"x" * 80]
    lengths = [16, 32, 33, 255]

    # The native sender, pyhpke the recipient.
    enc, sender = hpke.setup_sender(suite, key.public_bytes(), info)
    ref_recipient = reference.create_recipient_context(enc, reference_key, info)
    for seq in range(3):
        message, aad_ = os.urandom(seq * 50), os.urandom(seq)
        assert ref_recipient.open(sender.seal(message, aad_), aad_) == message
    for context, length in zip(contexts, lengths, strict=True):
        assert sender.export(context, length) == ref_recipient.export(context, length)

    # pyhpke the sender, the native recipient.
    ref_enc, ref_sender = reference.create_sender_context(public, info)
    recipient = hpke.setup_recipient(suite, key, ref_enc, info)
    for seq in range(3):
        message, aad_ = os.urandom(seq * 50 + 1), os.urandom(seq)
        assert recipient.open(ref_sender.seal(message, aad_), aad_) == message
    for context, length in zip(contexts, lengths, strict=True):
        assert recipient.export(context, length) == ref_sender.export(context, length)


@pytest.mark.parametrize("suite", X25519_SUITES, ids=["AES-128-GCM", "ChaCha20-Poly1305"])
def test_native_derive_and_explicit_ephemeral_key_match_pyhpke(suite: hpke.Suite) -> None:
    reference = _reference_suite(suite)
    ikm = os.urandom(32)
    derived = hpke.PrivateKey.derive(suite.kem_id, ikm)
    pair = reference.kem.derive_key_pair(ikm)
    assert derived.to_bytes() == pair.private_key.to_private_bytes()
    assert derived.public_bytes() == pair.public_key.to_public_bytes()

    recipient = hpke.PrivateKey.generate()
    public = reference.kem.deserialize_public_key(recipient.public_bytes())
    enc, sender = hpke.setup_sender(suite, recipient.public_bytes(), b"i", ephemeral_key=derived)
    ref_enc, ref_sender = reference.create_sender_context(public, b"i", eks=pair)
    assert enc == ref_enc == derived.public_bytes()
    assert sender.seal(b"same", b"a") == ref_sender.seal(b"same", b"a")
    assert sender.export(b"e", 16) == ref_sender.export(b"e", 16)


def test_export_refuses_lengths_out_of_range() -> None:
    key = hpke.PrivateKey.generate()
    _, sender = hpke.setup_sender(X25519_SUITES[0], key.public_bytes(), b"")
    assert len(sender.export(b"", 255 * 32)) == 255 * 32
    for length in (0, 255 * 32 + 1):
        with pytest.raises(ValueError):
            sender.export(b"", length)


def test_hkdf_matches_pyca_for_every_key_and_output_size() -> None:
    # Salts longer than SHA-256's block (64 bytes) are hashed first; outputs of more than
    # one hash length take several HMAC blocks.
    for salt_size in (0, 1, 32, 48, 63, 64, 65, 80, 200):
        salt, ikm, info = os.urandom(salt_size), os.urandom(salt_size + 3), os.urandom(20)
        prk = hpke.kdf_extract(hpke.KDF_HKDF_SHA256, salt, ikm)
        assert prk == HKDF.extract(hashes.SHA256(), salt or None, ikm)
        for length in (1, 16, 32, 33, 64, 82, 255 * 32):
            expected = HKDFExpand(hashes.SHA256(), length, info).derive(prk)
            assert hpke.kdf_expand(hpke.KDF_HKDF_SHA256, prk, info, length) == expected
