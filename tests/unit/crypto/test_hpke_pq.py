"""The post-quantum KEMs of the HPKE adapter: ML-KEM-768 (0x0041) and the hybrid
MLKEM768-X25519 (X-Wing, 0x647A) of draft-ietf-hpke-pq.

Held to the draft's published vectors byte for byte (vectors/hpke_pq.json, copied from
draft-ietf-hpke-pq-05 Appendix A; vectors/HPKE_PQ_NOTES.md says what the draft specifies),
and to an implementation nobody here wrote: `cryptography`'s native single-shot HPKE
(`hpke.Suite(KEM.MLKEM768_X25519 | KEM.MLKEM768, ...)`), in both directions. `cryptography`
offers no derandomized ML-KEM encapsulation, so the vectors are checked from the
recipient's side (key derivation, decapsulation, key schedule, open, export) and the
sender's side against the other implementation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hpke as native
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from bastion.crypto import hpke, ohttp

VECTORS = json.loads((Path(__file__).parent / "vectors" / "hpke_pq.json").read_text())["vectors"]
PQ_KEMS = (hpke.KEM_MLKEM768_X25519, hpke.KEM_MLKEM768)
AEADS = (hpke.AEAD_AES_128_GCM, hpke.AEAD_CHACHA20_POLY1305)
_NATIVE_KEM = {
    hpke.KEM_MLKEM768_X25519: native.KEM.MLKEM768_X25519,
    hpke.KEM_MLKEM768: native.KEM.MLKEM768,
}
_NATIVE_AEAD = {
    hpke.AEAD_AES_128_GCM: native.AEAD.AES_128_GCM,
    hpke.AEAD_CHACHA20_POLY1305: native.AEAD.CHACHA20_POLY1305,
}


def _hex(value: str) -> bytes:
    return bytes.fromhex(value)


def _id(vector: dict[str, Any]) -> str:
    return f"kem=0x{vector['kem_id']:04x},aead=0x{vector['aead_id']:04x}"


def _suite(vector: dict[str, Any]) -> hpke.Suite:
    return hpke.Suite(vector["kem_id"], vector["kdf_id"], vector["aead_id"])


def test_the_vectors_cover_both_kems() -> None:
    assert {v["kem_id"] for v in VECTORS} == set(PQ_KEMS)
    assert all(v["mode"] == 0 and v["kdf_id"] == hpke.KDF_HKDF_SHA256 for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=_id)
def test_derive_key_pair_matches_the_draft(vector: dict[str, Any]) -> None:
    key = hpke.PrivateKey.derive(vector["kem_id"], _hex(vector["ikmR"]))
    # The private key is the seed (64 bytes d || z for ML-KEM, 32 for X-Wing).
    assert key.to_bytes() == _hex(vector["skRm"])
    assert key.public_bytes() == _hex(vector["pkRm"])
    assert hpke.PrivateKey.from_bytes(vector["kem_id"], _hex(vector["skRm"])) == key


@pytest.mark.parametrize("vector", VECTORS, ids=_id)
def test_decapsulation_and_key_schedule_match_the_draft(vector: dict[str, Any]) -> None:
    key = hpke.PrivateKey.from_bytes(vector["kem_id"], _hex(vector["skRm"]))
    enc = _hex(vector["enc"])
    kem = hpke._KEMS[vector["kem_id"]]
    assert kem.decap(key._material, key.public_bytes(), enc) == _hex(vector["shared_secret"])
    context = hpke.setup_recipient(_suite(vector), key, enc, _hex(vector["info"]))
    assert context._exporter_secret == _hex(vector["exporter_secret"])
    base_nonce = _hex(vector["base_nonce"])
    for seq, encryption in enumerate(vector["encryptions"]):
        assert _hex(encryption["nonce"]) == (int.from_bytes(base_nonce, "big") ^ seq).to_bytes(
            len(base_nonce), "big"
        )
        plaintext = context.open(_hex(encryption["ct"]), _hex(encryption["aad"]))
        assert plaintext == _hex(encryption["pt"])
    for export in vector["exports"]:
        value = context.export(_hex(export["exporter_context"]), export["L"])
        assert value == _hex(export["exported_value"])


@pytest.mark.parametrize("vector", VECTORS, ids=_id)
def test_the_draft_key_seals_what_the_draft_key_opens(vector: dict[str, Any]) -> None:
    """The sender side with the draft's recipient key: a fresh encapsulation to pkRm opens
    with skRm (the vectors' own enc needs derandomized ML-KEM, which cryptography lacks)."""
    suite = _suite(vector)
    key = hpke.PrivateKey.from_bytes(vector["kem_id"], _hex(vector["skRm"]))
    enc, sender = hpke.setup_sender(suite, _hex(vector["pkRm"]), b"info")
    assert len(enc) == hpke.enc_size(vector["kem_id"])
    receiver = hpke.setup_recipient(suite, key, enc, b"info")
    assert receiver.open(sender.seal(b"message", b"aad"), b"aad") == b"message"
    assert receiver.export(b"ctx", 32) == sender.export(b"ctx", 32)


def _native_private(key: hpke.PrivateKey) -> Any:
    """The same private key as cryptography's own HPKE objects."""
    if key.kem_id == hpke.KEM_MLKEM768:
        return mlkem.MLKEM768PrivateKey.from_seed_bytes(key.to_bytes())
    expanded = hashlib.shake_256(key.to_bytes()).digest(96)
    return native.MLKEM768X25519PrivateKey(
        mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64]),
        x25519.X25519PrivateKey.from_private_bytes(expanded[64:]),
    )


@pytest.mark.parametrize("aead_id", AEADS)
@pytest.mark.parametrize("kem_id", PQ_KEMS)
def test_cryptography_encrypts_and_bastion_opens(kem_id: int, aead_id: int) -> None:
    key = hpke.PrivateKey.generate(kem_id)
    theirs = native.Suite(_NATIVE_KEM[kem_id], native.KDF.HKDF_SHA256, _NATIVE_AEAD[aead_id])
    message, info = os.urandom(100), b"bastion interop"
    sealed = theirs.encrypt(message, _native_private(key).public_key(), info=info)
    nenc = hpke.enc_size(kem_id)
    context = hpke.setup_recipient(hpke.Suite(kem_id, hpke.KDF_HKDF_SHA256, aead_id), key,
                                   sealed[:nenc], info)  # fmt: skip
    assert context.open(sealed[nenc:]) == message


@pytest.mark.parametrize("aead_id", AEADS)
@pytest.mark.parametrize("kem_id", PQ_KEMS)
def test_bastion_encrypts_and_cryptography_opens(kem_id: int, aead_id: int) -> None:
    key = hpke.PrivateKey.generate(kem_id)
    ours = hpke.Suite(kem_id, hpke.KDF_HKDF_SHA256, aead_id)
    message, info = os.urandom(100), b"bastion interop"
    enc, sender = hpke.setup_sender(ours, key.public_bytes(), info)
    theirs = native.Suite(_NATIVE_KEM[kem_id], native.KDF.HKDF_SHA256, _NATIVE_AEAD[aead_id])
    assert theirs.decrypt(enc + sender.seal(message), _native_private(key), info=info) == message


@pytest.mark.parametrize("kem_id", PQ_KEMS)
def test_truncated_or_padded_encapsulations_are_refused(kem_id: int) -> None:
    suite = hpke.Suite(kem_id, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM)
    key = hpke.PrivateKey.generate(kem_id)
    enc, _ = hpke.setup_sender(suite, key.public_bytes(), b"")
    for bad in (enc[:-1], enc + b"\x00", b"", enc[:32]):
        with pytest.raises(hpke.OpenError):
            hpke.setup_recipient(suite, key, bad, b"")


@pytest.mark.parametrize("kem_id", PQ_KEMS)
def test_a_tampered_encapsulation_or_another_key_never_opens(kem_id: int) -> None:
    suite = hpke.Suite(kem_id, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM)
    key, other = hpke.PrivateKey.generate(kem_id), hpke.PrivateKey.generate(kem_id)
    enc, sender = hpke.setup_sender(suite, key.public_bytes(), b"")
    sealed = sender.seal(b"secret")
    # Flip a bit in the ML-KEM ciphertext, then (for the hybrid) in the X25519 part: ML-KEM
    # rejects implicitly (a pseudo-random secret), so the AEAD is what refuses.
    positions = [0, 500, 1087] + ([1090, 1119] if kem_id == hpke.KEM_MLKEM768_X25519 else [])
    for position in positions:
        forged = bytearray(enc)
        forged[position] ^= 0x01
        try:
            context = hpke.setup_recipient(suite, key, bytes(forged), b"")
        except hpke.OpenError:
            continue  # a point X25519 refuses
        with pytest.raises(hpke.OpenError):
            context.open(sealed)
    with pytest.raises(hpke.OpenError):
        hpke.setup_recipient(suite, other, enc, b"").open(sealed)
    assert hpke.setup_recipient(suite, key, enc, b"").open(sealed) == b"secret"


def test_the_hybrid_refuses_a_low_order_x25519_share() -> None:
    suite = hpke.Suite(hpke.KEM_MLKEM768_X25519, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM)
    key = hpke.PrivateKey.generate(hpke.KEM_MLKEM768_X25519)
    enc, _ = hpke.setup_sender(suite, key.public_bytes(), b"")
    with pytest.raises(hpke.OpenError):
        hpke.setup_recipient(suite, key, enc[:1088] + bytes(32), b"")


def test_suites_do_not_mix() -> None:
    hybrid = hpke.PrivateKey.generate(hpke.KEM_MLKEM768_X25519)
    pure = hpke.PrivateKey.generate(hpke.KEM_MLKEM768)
    classical = hpke.PrivateKey.generate(hpke.KEM_X25519_SHA256)
    hybrid_suite = hpke.Suite(hpke.KEM_MLKEM768_X25519, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM)
    enc, _ = hpke.setup_sender(hybrid_suite, hybrid.public_bytes(), b"")
    for wrong in (pure, classical):
        with pytest.raises(hpke.UnsupportedSuite):
            hpke.setup_recipient(hybrid_suite, wrong, enc, b"")
    # A public key of another KEM has another length: refused before any work.
    for wrong in (pure, classical):
        with pytest.raises(hpke.HpkeError):
            hpke.setup_sender(hybrid_suite, wrong.public_bytes(), b"")
    # The ML-KEM half of the hybrid's ciphertext is not an ML-KEM-768 encapsulation.
    pure_suite = hpke.Suite(hpke.KEM_MLKEM768, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM)
    with pytest.raises(hpke.OpenError):
        hpke.setup_recipient(pure_suite, pure, enc, b"")
    # Derandomized sender options exist for DHKEM only.
    with pytest.raises(hpke.UnsupportedSuite):
        hpke.setup_sender(hybrid_suite, hybrid.public_bytes(), b"", ikm_e=bytes(32))


def test_unusable_public_and_private_keys_are_refused() -> None:
    suite = hpke.Suite(hpke.KEM_MLKEM768, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM)
    # FIPS 203's encapsulation key check: coefficients must be below q = 3329.
    with pytest.raises(hpke.HpkeError):
        hpke.setup_sender(suite, b"\xff" * 1184, b"")
    for kem_id in PQ_KEMS:
        with pytest.raises(hpke.HpkeError):
            hpke.PrivateKey.from_bytes(kem_id, b"\x00" * (hpke.private_key_size(kem_id) - 1))


def test_sizes_and_names() -> None:
    assert (hpke.public_key_size(hpke.KEM_MLKEM768_X25519), hpke.enc_size(0x647A)) == (1216, 1120)
    assert (hpke.public_key_size(hpke.KEM_MLKEM768), hpke.enc_size(0x0041)) == (1184, 1088)
    assert hpke.private_key_size(0x647A) == 32 and hpke.private_key_size(0x0041) == 64
    assert hpke.KEM_NAMES == {"x25519": 0x20, "mlkem768": 0x41, "mlkem768-x25519": 0x647A}
    assert [hpke.is_post_quantum(k) for k in (0x20, 0x41, 0x647A)] == [False, True, True]
    for kem_id in PQ_KEMS:
        key = hpke.PrivateKey.generate(kem_id)
        assert key.to_bytes().hex() not in repr(key) and key.public_bytes()[:32].hex() in repr(key)


@pytest.mark.parametrize("kem_id", PQ_KEMS)
def test_ohttp_round_trips_on_the_post_quantum_kems(kem_id: int) -> None:
    """RFC 9458 messages, plain and chunked, on a post-quantum key configuration: the
    response key comes from the HPKE exporter, which only this adapter provides."""
    key = ohttp.GatewayKey.generate(7, kem_id=kem_id)
    config = ohttp.KeyConfig.decode(key.config().encode())
    assert config.kem_id == kem_id and len(config.public_key) == hpke.public_key_size(kem_id)
    data, client = ohttp.encapsulate_request(config, b"request")
    header = ohttp.parse_request_header(data)
    assert header.kem_id == kem_id and len(header.enc) == hpke.enc_size(kem_id)
    plaintext, server = ohttp.decapsulate_request({7: key}, data)
    assert plaintext == b"request"
    assert client.open(server.seal(b"response")) == b"response"
    # A request cut inside its (larger) encapsulated key is malformed, not a crash.
    with pytest.raises(ohttp.MalformedMessage):
        ohttp.parse_request_header(data[: header.size - 1])
