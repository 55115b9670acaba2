"""Streaming AEAD: Tink-compatible AES-GCM-HKDF files that open only whole, in order, unaltered."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable

import pytest
import tink  # type: ignore[import-untyped]
from tink import cleartext_keyset_handle, streaming_aead  # type: ignore[import-untyped]
from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2  # type: ignore[import-untyped]

from bastion.crypto.streaming_aead import (
    FIRST_PLAINTEXT_SEGMENT_SIZE,
    HEADER_SIZE,
    PLAINTEXT_SEGMENT_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    StreamingAeadError,
    ciphertext_size,
    decrypt_into,
    decrypt_segments,
    decrypt_to_bytearray,
    encrypt_file,
    plaintext_size,
)

KEY = bytes(range(32))
AD = b"bundle/llama/model.safetensors"
FIRST = FIRST_PLAINTEXT_SEGMENT_SIZE
FULL = PLAINTEXT_SEGMENT_SIZE
MARKER = b"TOP-SECRET-WEIGHTS"


def plaintext_of(size: int) -> bytes:
    """Recognisable plaintext: the marker repeated, so a leak into an error would show."""
    return (MARKER * (size // len(MARKER) + 1))[:size]


def encrypt(plaintext: bytes, key: bytes = KEY, ad: bytes = AD) -> bytes:
    out = io.BytesIO()
    assert encrypt_file(key, ad, io.BytesIO(plaintext), out) == len(out.getvalue())
    return out.getvalue()


def decrypt(ciphertext: bytes, key: bytes = KEY, ad: bytes = AD) -> bytes:
    return bytes(decrypt_to_bytearray(key, ad, io.BytesIO(ciphertext)))


def decrypt_streamed(ciphertext: bytes, key: bytes = KEY, ad: bytes = AD) -> bytes:
    return b"".join(bytes(part) for part in decrypt_segments(key, ad, io.BytesIO(ciphertext)))


class ReadOnlyStream:
    """A non-seekable source with only `read`, like a pipe or a socket file."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._inner.read(min(size, 1000) if size > 0 else size)

    def seekable(self) -> bool:
        return False


# ---------------------------------------------------------------- round trips

SIZES = [
    0,
    1,
    FIRST - 1,
    FIRST,
    FIRST + 1,
    FIRST + FULL - 1,
    FIRST + FULL,
    FIRST + FULL + 1,
    3 * SEGMENT_SIZE + 12345,
]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_sizes_and_digest(size: int) -> None:
    plaintext = os.urandom(size)
    encrypt_digest = hashlib.sha256()
    encrypt_progress: list[int] = []
    out = io.BytesIO()
    written = encrypt_file(
        KEY, AD, io.BytesIO(plaintext), out, digest=encrypt_digest, progress=encrypt_progress.append
    )
    ciphertext = out.getvalue()
    assert written == len(ciphertext) == ciphertext_size(size)
    assert plaintext_size(len(ciphertext)) == size
    assert ciphertext[0] == HEADER_SIZE
    assert sum(encrypt_progress) == size
    assert encrypt_digest.digest() == hashlib.sha256(plaintext).digest()

    decrypt_digest = hashlib.sha256()
    decrypt_progress: list[int] = []
    opened = decrypt_to_bytearray(
        KEY, AD, io.BytesIO(ciphertext), digest=decrypt_digest, progress=decrypt_progress.append
    )
    assert isinstance(opened, bytearray)
    assert opened == plaintext
    assert sum(decrypt_progress) == size
    assert decrypt_digest.digest() == hashlib.sha256(plaintext).digest()
    assert decrypt_to_bytearray(KEY, AD, io.BytesIO(ciphertext), expected_size=size) == plaintext
    assert decrypt_streamed(ciphertext) == plaintext


def test_segment_layout_matches_the_format() -> None:
    ciphertext = encrypt(plaintext_of(FIRST + FULL + 10))
    # Header, then a first segment shortened by the header, a full one, and the rest.
    assert len(ciphertext) == SEGMENT_SIZE + SEGMENT_SIZE + 10 + TAG_SIZE
    assert [len(part) for part in decrypt_segments(KEY, AD, io.BytesIO(ciphertext))] == [
        FIRST,
        FULL,
        10,
    ]


def test_each_encryption_uses_a_fresh_salt_and_nonce_prefix() -> None:
    plaintext = plaintext_of(100)
    first, second = encrypt(plaintext), encrypt(plaintext)
    assert first[1:HEADER_SIZE] != second[1:HEADER_SIZE]
    assert first[HEADER_SIZE:] != second[HEADER_SIZE:]
    assert MARKER not in first


def test_non_seekable_source_needs_the_expected_size() -> None:
    plaintext = os.urandom(FIRST + 5000)
    ciphertext = encrypt(plaintext)
    stream = ReadOnlyStream(ciphertext)
    opened = decrypt_to_bytearray(KEY, AD, stream, expected_size=len(plaintext))  # type: ignore[arg-type]
    assert opened == plaintext
    with pytest.raises(ValueError):
        decrypt_to_bytearray(KEY, AD, ReadOnlyStream(ciphertext))  # type: ignore[arg-type]
    # Encryption from a read-only stream with short reads works too.
    out = io.BytesIO()
    encrypt_file(KEY, AD, ReadOnlyStream(plaintext), out)  # type: ignore[arg-type]
    assert decrypt(out.getvalue()) == plaintext


def test_plaintext_size_rejects_sizes_no_ciphertext_has() -> None:
    for impossible in (
        0,
        HEADER_SIZE,
        HEADER_SIZE + TAG_SIZE - 1,
        SEGMENT_SIZE + 1,
        2 * SEGMENT_SIZE + 15,
    ):
        with pytest.raises(StreamingAeadError):
            plaintext_size(impossible)
    assert plaintext_size(HEADER_SIZE + TAG_SIZE) == 0


def test_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError):
        encrypt(b"x", key=KEY[:16])


# ---------------------------------------------------------------- Tink interop


@pytest.fixture(scope="module")
def tink_primitive() -> streaming_aead.StreamingAead:
    """Tink's StreamingAead for AES256_GCM_HKDF_1MB holding our raw KEY (RAW output prefix)."""
    streaming_aead.register()
    key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(version=0, key_value=KEY)
    key.params.ciphertext_segment_size = SEGMENT_SIZE
    key.params.derived_key_size = 32
    key.params.hkdf_hash_type = common_pb2.SHA256
    keyset = tink_pb2.Keyset(primary_key_id=42)
    entry = keyset.key.add()
    entry.key_data.type_url = "type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey"
    entry.key_data.value = key.SerializeToString()
    entry.key_data.key_material_type = tink_pb2.KeyData.SYMMETRIC
    entry.status = tink_pb2.ENABLED
    entry.key_id = 42
    entry.output_prefix_type = tink_pb2.RAW
    handle = cleartext_keyset_handle.from_keyset(keyset)
    return handle.primitive(streaming_aead.StreamingAead)


class CapturingBytesIO(io.BytesIO):
    """Tink closes the stream it writes to; keep what it wrote."""

    captured = b""

    def close(self) -> None:
        self.captured = self.getvalue()
        super().close()


INTEROP_SIZES = [0, 1, FIRST, FIRST + 1, FIRST + FULL, 2 * SEGMENT_SIZE + 777]


@pytest.mark.parametrize("size", INTEROP_SIZES)
def test_tink_ciphertext_decrypts_with_ours(
    tink_primitive: streaming_aead.StreamingAead, size: int
) -> None:
    plaintext = os.urandom(size)
    sink = CapturingBytesIO()
    with tink_primitive.new_encrypting_stream(sink, AD) as writer:
        writer.write(plaintext)
    assert len(sink.captured) == ciphertext_size(size)
    assert decrypt(sink.captured) == plaintext
    with pytest.raises(StreamingAeadError):
        decrypt(sink.captured, ad=b"another file")


@pytest.mark.parametrize("size", INTEROP_SIZES)
def test_our_ciphertext_decrypts_with_tink(
    tink_primitive: streaming_aead.StreamingAead, size: int
) -> None:
    plaintext = os.urandom(size)
    ciphertext = encrypt(plaintext)
    with tink_primitive.new_decrypting_stream(io.BytesIO(ciphertext), AD) as reader:
        assert reader.read() == plaintext


def test_tink_refuses_our_ciphertext_under_other_associated_data(
    tink_primitive: streaming_aead.StreamingAead,
) -> None:
    ciphertext = encrypt(plaintext_of(1000))
    with (
        pytest.raises(tink.TinkError),
        tink_primitive.new_decrypting_stream(io.BytesIO(ciphertext), b"other") as reader,
    ):
        reader.read()


# ---------------------------------------------------------------- attacks

# Four segments: header | s0 (short) | s1 | s2 | s3 (short last).
ATTACK_PLAINTEXT = plaintext_of(FIRST + 2 * FULL + 5000)


@pytest.fixture(scope="module")
def victim() -> bytes:
    return encrypt(ATTACK_PLAINTEXT)


def segments_of(ciphertext: bytes) -> tuple[bytes, list[bytes]]:
    header, body = ciphertext[:HEADER_SIZE], ciphertext[HEADER_SIZE:]
    first = SEGMENT_SIZE - HEADER_SIZE
    parts = [body[:first]]
    parts += [body[i : i + SEGMENT_SIZE] for i in range(first, len(body), SEGMENT_SIZE)]
    return header, parts


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def assert_refused(ciphertext: bytes, key: bytes = KEY, ad: bytes = AD) -> None:
    """Every decryption path refuses, with the one message that reveals nothing."""
    openers: list[Callable[[], object]] = [
        lambda: decrypt(ciphertext, key, ad),
        lambda: decrypt_to_bytearray(
            key, ad, io.BytesIO(ciphertext), expected_size=len(ATTACK_PLAINTEXT)
        ),
        lambda: decrypt_streamed(ciphertext, key, ad),
        # From the ciphertext as a buffer (a memory map, in bundles), not a file.
        lambda: decrypt_into(key, ad, memoryview(ciphertext), bytearray(len(ATTACK_PLAINTEXT))),
    ]
    messages = set()
    for opener in openers:
        with pytest.raises(StreamingAeadError) as caught:
            opener()
        assert MARKER not in str(caught.value).encode()
        assert MARKER not in repr(caught.value.args).encode()
        messages.add(str(caught.value))
    assert len(messages) == 1


def test_victim_is_four_segments_and_opens(victim: bytes) -> None:
    _, parts = segments_of(victim)
    assert len(parts) == 4
    assert decrypt(victim) == ATTACK_PLAINTEXT


@pytest.mark.parametrize(
    "offset",
    [
        0,  # header length byte
        5,  # salt
        HEADER_SIZE - 1,  # nonce prefix
        HEADER_SIZE + 10,  # first segment data
        SEGMENT_SIZE - 1,  # first segment tag
        SEGMENT_SIZE + 1000,  # a middle segment
        -1,  # the last segment's tag
    ],
)
def test_flipped_byte_is_refused(victim: bytes, offset: int) -> None:
    assert_refused(flip(victim, offset % len(victim)))


@pytest.mark.parametrize(
    "cut",
    [
        3 * SEGMENT_SIZE,  # at a segment boundary: the last segment is gone
        SEGMENT_SIZE,  # only the first segment left
        2 * SEGMENT_SIZE + 500,  # in the middle of a segment
        len(ATTACK_PLAINTEXT) + HEADER_SIZE + 4 * TAG_SIZE - 1,  # one byte of the last tag
        HEADER_SIZE + TAG_SIZE,
        HEADER_SIZE,
        HEADER_SIZE - 1,
        0,
    ],
)
def test_truncation_is_refused(victim: bytes, cut: int) -> None:
    assert_refused(victim[:cut])


def test_dropped_reordered_or_duplicated_segments_are_refused(victim: bytes) -> None:
    header, parts = segments_of(victim)
    s0, s1, s2, s3 = parts
    for forged in (
        [s0, s2, s3],  # a middle segment dropped
        [s0, s2, s1, s3],  # two segments swapped
        [s0, s1, s1, s2, s3],  # a segment duplicated
        [s0, s1, s2, s2],  # a full segment replayed in place of the last
    ):
        assert_refused(header + b"".join(forged))


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * TAG_SIZE, b"\x00" * 100])
def test_appended_data_is_refused(victim: bytes, extra: bytes) -> None:
    assert_refused(victim + extra)


def test_appended_segment_is_refused(victim: bytes) -> None:
    _, parts = segments_of(victim)
    assert_refused(victim + parts[-1])


def test_cross_file_swap_is_refused(victim: bytes) -> None:
    # The same key encrypts another file of the bundle under its own associated data.
    assert_refused(victim, ad=b"bundle/llama/tokenizer.json")


def test_wrong_key_is_refused(victim: bytes) -> None:
    assert_refused(victim, key=bytes(32))


def test_splicing_two_ciphertexts_is_refused(victim: bytes) -> None:
    # Same key, same associated data, same plaintext: only the fresh salt and prefix differ.
    other_header, other_parts = segments_of(encrypt(ATTACK_PLAINTEXT))
    header, parts = segments_of(victim)
    assert_refused(header + b"".join(other_parts[:1] + parts[1:]))
    assert_refused(other_header + b"".join(parts))


def test_wrong_expected_size_is_refused(victim: bytes) -> None:
    for size in (len(ATTACK_PLAINTEXT) - 1, len(ATTACK_PLAINTEXT) + 1, FIRST):
        with pytest.raises(StreamingAeadError):
            decrypt_to_bytearray(KEY, AD, io.BytesIO(victim), expected_size=size)


def test_streamed_truncation_surfaces_at_the_end(victim: bytes) -> None:
    # Segments before the cut are authentic and are yielded; the missing end still raises.
    header, parts = segments_of(victim)
    received: list[bytes] = []
    with pytest.raises(StreamingAeadError):
        for part in decrypt_segments(KEY, AD, io.BytesIO(header + b"".join(parts[:3]))):
            received.append(bytes(part))
    assert b"".join(received) == ATTACK_PLAINTEXT[: FIRST + FULL]
    assert len(received) == 2


def test_decrypt_into_a_caller_buffer(victim: bytes) -> None:
    out = memoryview(bytearray(len(ATTACK_PLAINTEXT) + 8))[4:-4]
    decrypt_into(KEY, AD, io.BytesIO(victim), out)
    assert out == ATTACK_PLAINTEXT
    with pytest.raises(ValueError):
        decrypt_into(KEY, AD, io.BytesIO(victim), memoryview(bytes(len(ATTACK_PLAINTEXT))))
    with pytest.raises(StreamingAeadError):
        decrypt_into(KEY, AD, io.BytesIO(victim), bytearray(len(ATTACK_PLAINTEXT) - 1))


def test_decrypt_from_a_buffer_with_a_digest(victim: bytes) -> None:
    out = bytearray(len(ATTACK_PLAINTEXT))
    digest = hashlib.sha256()
    decrypt_into(KEY, AD, memoryview(victim), out, digest=digest)
    assert out == ATTACK_PLAINTEXT
    assert digest.digest() == hashlib.sha256(ATTACK_PLAINTEXT).digest()
    with pytest.raises(StreamingAeadError):
        decrypt_into(KEY, AD, memoryview(victim + b"x"), bytearray(len(ATTACK_PLAINTEXT)))


def test_unauthenticated_plaintext_is_never_left_in_the_buffer(victim: bytes) -> None:
    # AES-GCM decrypts before it checks the tag; the refused segment must not stay readable.
    out = bytearray(len(ATTACK_PLAINTEXT))
    with pytest.raises(StreamingAeadError):
        decrypt_into(KEY, AD, io.BytesIO(flip(victim, SEGMENT_SIZE + 1000)), out)
    assert out[:FIRST] == ATTACK_PLAINTEXT[:FIRST]
    assert out[FIRST:] == bytes(len(out) - FIRST)
