"""Streaming AEAD for model files: Tink's AES-GCM-HKDF streaming scheme (AES256_GCM_HKDF_1MB).

A model file of any size is encrypted in 1 MiB segments, so it can be decrypted and checked
piece by piece without ever holding a whole unauthenticated file. The wire format is exactly
Tink's ``AesGcmHkdfStreaming`` with a 32-byte key, HKDF-SHA256, 1 MiB ciphertext segments and
no first-segment offset, so a file we write opens with Tink's ``StreamingAead`` for the key
template ``AES256_GCM_HKDF_1MB`` (RAW output prefix: Tink adds nothing before the header) and
the other way round::

    header   = 0x28 (header length, 40) | salt (32 bytes) | nonce prefix (7 bytes)
    key      = HKDF-SHA256(ikm=key, salt=salt, info=associated data, length=32)
    segment  = AES-256-GCM(key, nonce, plaintext segment), no GCM associated data
    nonce    = nonce prefix | segment index (u32, big-endian) | 0x01 if last segment else 0x00

Segment ``i`` is ``SEGMENT_SIZE`` bytes of ciphertext (plaintext + 16-byte tag), except that
segment 0 is shorter by the header, and the last segment may be shorter (or, for empty
plaintext, only a tag). The last-segment flag in the nonce is what makes truncation at a
segment boundary fail; the index makes reordering fail; the associated data (which file of
which bundle this is) makes a ciphertext moved to another file fail.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEGMENT_SIZE = 1 << 20
KEY_SIZE = 32
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
HEADER_SIZE = 1 + KEY_SIZE + NONCE_PREFIX_SIZE
PLAINTEXT_SEGMENT_SIZE = SEGMENT_SIZE - TAG_SIZE
FIRST_PLAINTEXT_SEGMENT_SIZE = PLAINTEXT_SEGMENT_SIZE - HEADER_SIZE
# The segment index is a 32-bit counter in the nonce; past it nonces would repeat.
_MAX_SEGMENTS = 1 << 32
_NONCE_SUFFIX = struct.Struct(">IB")

Progress = Callable[[int], None]


class StreamingAeadError(Exception):
    """A ciphertext did not decrypt; the message says nothing about why or about its content."""


class Digest(Protocol):
    """What we feed plaintext to while we encrypt or decrypt, e.g. ``hashlib.sha256()``."""

    def update(self, data: memoryview, /) -> None: ...


def _fail() -> StreamingAeadError:
    # One message for every cause (wrong key or associated data, tampering, truncation,
    # extension, reordering) so that an error is no oracle about the file.
    return StreamingAeadError(
        "The encrypted file does not decrypt: wrong key or associated data, "
        "or the file was altered, truncated or extended."
    )


def ciphertext_size(plaintext_size: int) -> int:
    """The size of the ciphertext (header included) of `plaintext_size` bytes."""
    if plaintext_size < 0:
        raise ValueError("plaintext_size must be >= 0")
    return HEADER_SIZE + plaintext_size + TAG_SIZE * _segment_count(plaintext_size)


def plaintext_size(ciphertext_size: int) -> int:
    """The size of the plaintext in a ciphertext of `ciphertext_size` bytes.

    Raises StreamingAeadError if no ciphertext can have that size.
    """
    if ciphertext_size < HEADER_SIZE + TAG_SIZE:
        raise _fail()
    segments = -(-ciphertext_size // SEGMENT_SIZE)
    last_segment = ciphertext_size - (segments - 1) * SEGMENT_SIZE
    if segments == 1:
        last_segment -= HEADER_SIZE
    if last_segment < TAG_SIZE or segments > _MAX_SEGMENTS:
        raise _fail()
    return ciphertext_size - HEADER_SIZE - TAG_SIZE * segments


def _segment_count(plaintext_size: int) -> int:
    if plaintext_size <= FIRST_PLAINTEXT_SEGMENT_SIZE:
        return 1
    rest = plaintext_size - FIRST_PLAINTEXT_SEGMENT_SIZE
    return 1 + -(-rest // PLAINTEXT_SEGMENT_SIZE)


class _SegmentCipher:
    """AES-GCM under the key derived for one ciphertext, with its per-segment nonces."""

    __slots__ = ("_aead", "_prefix")

    def __init__(self, key: bytes, associated_data: bytes, salt: bytes, prefix: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"the key must be {KEY_SIZE} bytes")
        derived = HKDF(
            algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=associated_data
        ).derive(key)
        self._aead = AESGCM(derived)
        self._prefix = prefix

    @classmethod
    def from_header(cls, key: bytes, associated_data: bytes, header: bytes) -> _SegmentCipher:
        if len(header) != HEADER_SIZE or header[0] != HEADER_SIZE:
            raise _fail()
        return cls(key, associated_data, header[1 : 1 + KEY_SIZE], header[1 + KEY_SIZE :])

    def _nonce(self, index: int, last: bool) -> bytes:
        if index >= _MAX_SEGMENTS:
            raise ValueError("too many segments for one ciphertext")
        return self._prefix + _NONCE_SUFFIX.pack(index, last)

    def encrypt_into(self, index: int, last: bool, plaintext: memoryview, out: memoryview) -> None:
        self._aead.encrypt_into(self._nonce(index, last), plaintext, None, out)

    def decrypt_into(self, index: int, last: bool, ciphertext: memoryview, out: memoryview) -> None:
        if len(ciphertext) < TAG_SIZE:
            raise _fail()
        try:
            self._aead.decrypt_into(self._nonce(index, last), ciphertext, None, out)
        except InvalidTag:
            # OpenSSL has already written the unauthenticated plaintext: never leave it.
            out[:] = bytes(len(out))
            raise _fail() from None


def _reader(source: BinaryIO) -> Callable[[memoryview], int]:
    """A function that fills a view from `source` as far as it can, returning the count."""
    readinto = getattr(source, "readinto", None)

    def fill(view: memoryview) -> int:
        filled = 0
        while filled < len(view):
            if readinto is not None:
                count = readinto(view[filled:]) or 0
            else:
                chunk = source.read(len(view) - filled)
                count = len(chunk)
                view[filled : filled + count] = chunk
            if count == 0:
                break
            filled += count
        return filled

    return fill


def encrypt_file(
    key: bytes,
    associated_data: bytes,
    source: BinaryIO,
    destination: BinaryIO,
    *,
    digest: Digest | None = None,
    progress: Progress | None = None,
) -> int:
    """Encrypt everything `source` holds to `destination`; returns the ciphertext size.

    `digest` (e.g. ``hashlib.sha256()``) is updated with the plaintext on the way, and
    `progress` is called with the number of plaintext bytes of each segment done.
    """
    salt, prefix = os.urandom(KEY_SIZE), os.urandom(NONCE_PREFIX_SIZE)
    cipher = _SegmentCipher(key, associated_data, salt, prefix)
    destination.write(bytes([HEADER_SIZE]) + salt + prefix)
    written = HEADER_SIZE
    fill = _reader(source)
    # Two plaintext buffers: we must read ahead one segment to know whether the current
    # one is the last (a full segment followed by end of file is the last, as in Tink).
    current = memoryview(bytearray(PLAINTEXT_SEGMENT_SIZE))
    following = memoryview(bytearray(PLAINTEXT_SEGMENT_SIZE))
    sealed = memoryview(bytearray(SEGMENT_SIZE))
    capacity = FIRST_PLAINTEXT_SEGMENT_SIZE
    length = fill(current[:capacity])
    index = 0
    while True:
        next_length = 0 if length < capacity else fill(following)
        last = next_length == 0
        plaintext = current[:length]
        out = sealed[: length + TAG_SIZE]
        cipher.encrypt_into(index, last, plaintext, out)
        destination.write(out)
        written += len(out)
        if digest is not None:
            digest.update(plaintext)
        if progress is not None:
            progress(length)
        if last:
            return written
        current, following = following, current
        length, capacity, index = next_length, PLAINTEXT_SEGMENT_SIZE, index + 1


def decrypt_to_bytearray(
    key: bytes,
    associated_data: bytes,
    source: BinaryIO,
    *,
    expected_size: int | None = None,
    digest: Digest | None = None,
    progress: Progress | None = None,
) -> bytearray:
    """Decrypt the ciphertext `source` holds into one new buffer, checking every segment.

    The plaintext size is `expected_size` if given (e.g. from a signed manifest), else it
    follows from the size of `source`, which must then be seekable. `digest` is updated with
    the plaintext as it is decrypted, so a caller can check a hash without a second pass.
    Raises StreamingAeadError on a wrong key or associated data, any altered byte,
    truncation, extension, or reordered segments; the buffer is then discarded.
    """
    if expected_size is None:
        if not source.seekable():
            raise ValueError("give expected_size or a seekable source")
        start = source.tell()
        end = source.seek(0, os.SEEK_END)
        source.seek(start)
        size = plaintext_size(end - start)
    elif expected_size < 0:
        raise ValueError("expected_size must be >= 0")
    else:
        size = expected_size

    plaintext = bytearray(size)
    decrypt_into(key, associated_data, source, plaintext, digest=digest, progress=progress)
    return plaintext


def decrypt_into(
    key: bytes,
    associated_data: bytes,
    source: BinaryIO | memoryview,
    out: bytearray | memoryview,
    *,
    digest: Digest | None = None,
    progress: Progress | None = None,
) -> None:
    """Decrypt `source` into `out`, whose length must be the plaintext size.

    `source` is a file, or the whole ciphertext as a buffer (e.g. a memory map of the file,
    which spares the copy that reading makes). For a caller that owns the memory (a reused
    buffer, a prefaulted mmap, a tensor's storage): fresh memory costs page faults that can
    exceed the decryption itself. Raises StreamingAeadError as decrypt_to_bytearray does;
    `out` then holds the plaintext of the authentic segments before the failure (the
    failing one is zeroed), which the caller must discard as it is incomplete.
    """
    output = memoryview(out).cast("B")
    if output.readonly:
        raise ValueError("out must be writable")
    size = len(output)
    take = _taker(source)
    header = take(HEADER_SIZE)
    if len(header) != HEADER_SIZE:
        raise _fail()
    cipher = _SegmentCipher.from_header(key, associated_data, bytes(header))
    segments = _segment_count(size)
    position = 0
    for index in range(segments):
        last = index == segments - 1
        capacity = FIRST_PLAINTEXT_SEGMENT_SIZE if index == 0 else PLAINTEXT_SEGMENT_SIZE
        length = size - position if last else capacity
        ciphertext = take(length + TAG_SIZE)
        if len(ciphertext) != length + TAG_SIZE:
            raise _fail()
        segment = output[position : position + length]
        cipher.decrypt_into(index, last, ciphertext, segment)
        if digest is not None:
            digest.update(segment)
        if progress is not None:
            progress(length)
        position += length
    if len(take(1)):
        raise _fail()


def _taker(source: BinaryIO | memoryview) -> Callable[[int], memoryview]:
    """A function returning the next `count` bytes of `source` (fewer at its end): views
    of a buffer, or of one reused buffer filled from a file."""
    if isinstance(source, memoryview):
        data = source.cast("B")
        offset = 0

        def view(count: int) -> memoryview:
            nonlocal offset
            piece = data[offset : offset + count]
            offset += len(piece)
            return piece

        return view
    fill = _reader(source)
    buffer = memoryview(bytearray(SEGMENT_SIZE))

    def read(count: int) -> memoryview:
        piece = buffer[:count]
        return piece[: fill(piece)]

    return read


def decrypt_segments(key: bytes, associated_data: bytes, source: BinaryIO) -> Iterator[memoryview]:
    """Yield the plaintext of each segment of `source` in order, each checked before it is yielded.

    Each view is valid only until the next one is asked for (the buffer is reused). The
    stream's end is authenticated only when iteration finishes: a consumer that must know the
    file is complete (not truncated) must run the iterator to its end, where a truncated or
    extended file raises StreamingAeadError.
    """
    fill = _reader(source)
    header = bytearray(HEADER_SIZE)
    if fill(memoryview(header)) != HEADER_SIZE:
        raise _fail()
    cipher = _SegmentCipher.from_header(key, associated_data, bytes(header))
    # Read ahead one segment, as a segment is the last exactly when nothing follows it.
    current = memoryview(bytearray(SEGMENT_SIZE))
    following = memoryview(bytearray(SEGMENT_SIZE))
    plaintext = memoryview(bytearray(PLAINTEXT_SEGMENT_SIZE))
    capacity = SEGMENT_SIZE - HEADER_SIZE
    length = fill(current[:capacity])
    index = 0
    while True:
        next_length = 0 if length < capacity else fill(following)
        last = next_length == 0
        if length < TAG_SIZE:
            raise _fail()
        out = plaintext[: length - TAG_SIZE]
        cipher.decrypt_into(index, last, current[:length], out)
        yield out
        if last:
            return
        current, following = following, current
        length, capacity, index = next_length, SEGMENT_SIZE, index + 1
