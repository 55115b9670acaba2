"""Envelope encryption: secrets open only with the right KEK, context and untouched bytes."""

from __future__ import annotations

import os

import pytest

from bastion.crypto.keyring import MAGIC, KeyRing, KeyRingError, LocalKek

SECRET = b"\x01" * 32


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing(LocalKek(os.urandom(32)))


def test_round_trip_and_secret_not_in_envelope(ring: KeyRing) -> None:
    envelope = ring.seal(SECRET, "ohttp-key/1")
    assert envelope.startswith(MAGIC)
    assert SECRET not in envelope
    assert ring.open(envelope, "ohttp-key/1") == SECRET


def test_each_seal_uses_a_fresh_data_key(ring: KeyRing) -> None:
    assert ring.seal(SECRET, "c") != ring.seal(SECRET, "c")


def test_another_context_does_not_open(ring: KeyRing) -> None:
    envelope = ring.seal(SECRET, "ohttp-key/1")
    with pytest.raises(KeyRingError):
        ring.open(envelope, "ohttp-key/2")


def test_another_master_key_does_not_open(ring: KeyRing) -> None:
    envelope = ring.seal(SECRET, "c")
    with pytest.raises(KeyRingError):
        KeyRing(LocalKek(os.urandom(32))).open(envelope, "c")


@pytest.mark.parametrize("position", [0, 4, 6, 15, 40, -20, -1])
def test_any_flipped_byte_is_refused(ring: KeyRing, position: int) -> None:
    envelope = bytearray(ring.seal(SECRET, "c"))
    envelope[position] ^= 0x01
    with pytest.raises(KeyRingError):
        ring.open(bytes(envelope), "c")


@pytest.mark.parametrize("length", [0, 3, 5, 12, 40, 80])
def test_truncated_envelopes_are_refused(ring: KeyRing, length: int) -> None:
    envelope = ring.seal(SECRET, "c")
    with pytest.raises(KeyRingError):
        ring.open(envelope[:length], "c")


def test_unknown_format_version_is_refused(ring: KeyRing) -> None:
    envelope = ring.seal(SECRET, "c")
    with pytest.raises(KeyRingError, match="format version"):
        ring.open(b"BKR\x02" + envelope[4:], "c")


def test_another_provider_name_is_refused(ring: KeyRing) -> None:
    class OtherKek(LocalKek):
        name = "transit"

    other = KeyRing(OtherKek(os.urandom(32)))
    with pytest.raises(KeyRingError, match="another key provider"):
        ring.open(other.seal(SECRET, "c"), "c")
