"""Oblivious HTTP encapsulation (RFC 9458) and its chunked variant (draft-ietf-ohai-chunked-ohttp).

This layer works on opaque byte strings: the caller encodes and decodes the Binary HTTP
messages inside. Formats, in the RFCs' notation::

    Key Config       = key_id(8) kem_id(16) public_key(Npk*8) length(16) {kdf_id(16) aead_id(16)}...
    Request          = key_id(8) kem_id(16) kdf_id(16) aead_id(16) enc(Nenc*8) ct(..)
    Response         = response_nonce(max(Nn, Nk)*8) ct(..)
    Chunked request  = header enc {len(i) ct}... 0(i) final_ct(..)      final AAD = "final"
    Chunked response = response_nonce {len(i) ct}... 0(i) final_ct(..)

A gateway reads the header with `parse_request_header` (to route, check the key id and detect
replays by `enc`) and then calls `decapsulate_request` or `decapsulate_chunked_request`.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag

from bastion.crypto import hpke
from bastion.crypto.entropy import random_bytes
from bastion.wire import varint

KEYS_MEDIA_TYPE = "application/ohttp-keys"
REQUEST_MEDIA_TYPE = "message/ohttp-req"
RESPONSE_MEDIA_TYPE = "message/ohttp-res"
CHUNKED_REQUEST_MEDIA_TYPE = "message/ohttp-chunked-req"
CHUNKED_RESPONSE_MEDIA_TYPE = "message/ohttp-chunked-res"

REQUEST_LABEL = b"message/bhttp request"
RESPONSE_LABEL = b"message/bhttp response"
CHUNKED_REQUEST_LABEL = b"message/bhttp chunked request"
CHUNKED_RESPONSE_LABEL = b"message/bhttp chunked response"
FINAL_CHUNK_AAD = b"final"

DEFAULT_SUITES: tuple[tuple[int, int], ...] = (
    (hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),
    (hpke.KDF_HKDF_SHA256, hpke.AEAD_CHACHA20_POLY1305),
)
# A receiver must accept chunks of 2**14 bytes (draft section 3); the default leaves room for
# much larger ones while bounding what a hostile length prefix can make us buffer.
# RFC 9457 problem types of RFC 9458: an unusable key configuration (§5.3), and an inner
# Date outside the gateway's window (§6.5.2).
KEY_PROBLEM_TYPE = "https://iana.org/assignments/http-problem-types#ohttp-key"
DATE_PROBLEM_TYPE = "https://iana.org/assignments/http-problem-types#date"

DEFAULT_MAX_CHUNK_SIZE = 1 << 24
# Most chunks a server opens in one chunked request.
DEFAULT_MAX_REQUEST_CHUNKS = 1024

_HEADER = struct.Struct(">BHHH")
_SUITE = struct.Struct(">HH")
_TAG = hpke.AEAD_TAG_SIZE


class OhttpError(Exception):
    """Base of the errors this module raises. Messages never contain payload or keys."""


class MalformedMessage(OhttpError):
    """The message cannot be parsed: truncated, or a length that does not fit."""


class UnknownKey(OhttpError):
    """The key identifier names no configured key."""


class UnsupportedSuite(OhttpError):
    """The KEM, KDF or AEAD is not supported (by this code or by the chosen key)."""


class DecryptionFailed(OhttpError):
    """Authentication failed, a chunk is empty or misplaced, or the final chunk is missing."""


class MalformedKeyConfig(OhttpError):
    """A key configuration, or a list of them, is wrongly encoded or unusable."""


def _check_u16(value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFF:
        raise MalformedKeyConfig(f"{what} out of range")


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One key configuration (RFC 9458 section 3.1): what a client needs to encrypt."""

    key_id: int
    kem_id: int
    public_key: bytes
    suites: tuple[tuple[int, int], ...]  # (kdf_id, aead_id) pairs

    def __post_init__(self) -> None:
        if not 0 <= self.key_id <= 0xFF:
            raise MalformedKeyConfig("key id out of range")
        _check_u16(self.kem_id, "KEM id")
        suites = tuple((int(kdf_id), int(aead_id)) for kdf_id, aead_id in self.suites)
        if not 0 < len(suites) <= 0xFFFF // _SUITE.size:
            raise MalformedKeyConfig("a key configuration needs 1 to 16383 algorithm pairs")
        for kdf_id, aead_id in suites:
            _check_u16(kdf_id, "KDF id")
            _check_u16(aead_id, "AEAD id")
        object.__setattr__(self, "suites", suites)
        object.__setattr__(self, "public_key", bytes(self.public_key))
        try:
            npk = hpke.public_key_size(self.kem_id)
        except hpke.UnsupportedSuite:
            return  # Encoding still works; decoding needs Npk, so only known KEMs come back.
        if len(self.public_key) != npk:
            raise MalformedKeyConfig("the public key has the wrong length for its KEM")

    def encode(self) -> bytes:
        """The binary encoding of RFC 9458 section 3.1."""
        algorithms = b"".join(_SUITE.pack(kdf_id, aead_id) for kdf_id, aead_id in self.suites)
        return b"".join(
            (
                struct.pack(">BH", self.key_id, self.kem_id),
                self.public_key,
                struct.pack(">H", len(algorithms)),
                algorithms,
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> KeyConfig:
        """Parse one encoded configuration; raises MalformedKeyConfig or UnsupportedSuite."""
        if len(data) < 3:
            raise MalformedKeyConfig("truncated key configuration")
        key_id = data[0]
        kem_id = int.from_bytes(data[1:3], "big")
        try:
            npk = hpke.public_key_size(kem_id)
        except hpke.UnsupportedSuite:
            raise UnsupportedSuite(f"unsupported KEM 0x{kem_id:04x}") from None
        pos = 3 + npk
        if len(data) < pos + 2:
            raise MalformedKeyConfig("truncated key configuration")
        algorithms_length = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        if algorithms_length < _SUITE.size or algorithms_length % _SUITE.size:
            raise MalformedKeyConfig("bad algorithms length in key configuration")
        if len(data) != pos + algorithms_length:
            raise MalformedKeyConfig("key configuration length mismatch")
        suites = tuple(_SUITE.iter_unpack(data[pos:]))
        return cls(key_id, kem_id, bytes(data[3 : 3 + npk]), suites)

    def fingerprint(self) -> str:
        """The text "sha256:" then the hex SHA-256 of the encoding; stable across processes."""
        return "sha256:" + hashlib.sha256(self.encode()).hexdigest()

    def select_suite(self, preferred_aead_ids: Sequence[int] | None = None) -> hpke.Suite:
        """The suite a client should use: the first supported pair whose AEAD comes first in
        `preferred_aead_ids`, else the first supported pair in the configuration's order."""
        candidates = [
            suite
            for suite in (hpke.Suite(self.kem_id, kdf, aead) for kdf, aead in self.suites)
            if suite.is_supported()
        ]
        for aead_id in preferred_aead_ids or ():
            for suite in candidates:
                if suite.aead_id == aead_id:
                    return suite
        if not candidates:
            raise UnsupportedSuite("the key configuration offers no supported suite")
        return candidates[0]


def encode_key_configs(configs: Iterable[KeyConfig]) -> bytes:
    """An application/ohttp-keys body: each encoding prefixed by its 2-byte length."""
    parts: list[bytes] = []
    for config in configs:
        encoded = config.encode()
        if len(encoded) > 0xFFFF:
            raise MalformedKeyConfig("key configuration too long")
        parts += (len(encoded).to_bytes(2, "big"), encoded)
    if not parts:
        raise MalformedKeyConfig("application/ohttp-keys needs at least one configuration")
    return b"".join(parts)


def decode_key_configs(data: bytes) -> list[KeyConfig]:
    """Parse an application/ohttp-keys body.

    Any encoding error rejects the whole list (RFC 9458 section 3.2: clients MUST discard it).
    Well-framed configurations whose KEM is not supported are skipped, so the result may be
    empty when none is usable.
    """
    if not data:
        raise MalformedKeyConfig("empty key configuration list")
    configs = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 2:
            raise MalformedKeyConfig("truncated key configuration list")
        length = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        if length == 0 or pos + length > len(data):
            raise MalformedKeyConfig("bad length in key configuration list")
        with contextlib.suppress(UnsupportedSuite):
            configs.append(KeyConfig.decode(data[pos : pos + length]))
        pos += length
    return configs


@dataclass(frozen=True, slots=True)
class GatewayKey:
    """A gateway's private key with its id and the (kdf_id, aead_id) pairs it accepts."""

    key_id: int
    private_key: hpke.PrivateKey
    suites: tuple[tuple[int, int], ...] = DEFAULT_SUITES

    def __post_init__(self) -> None:
        if not 0 <= self.key_id <= 0xFF:
            raise ValueError("key id out of range")
        suites = tuple((int(kdf_id), int(aead_id)) for kdf_id, aead_id in self.suites)
        if not suites:
            raise ValueError("a gateway key needs at least one suite")
        for kdf_id, aead_id in suites:
            if not hpke.Suite(self.private_key.kem_id, kdf_id, aead_id).is_supported():
                raise ValueError("a gateway key may only offer supported suites")
        object.__setattr__(self, "suites", suites)

    @classmethod
    def generate(
        cls,
        key_id: int,
        suites: Sequence[tuple[int, int]] = DEFAULT_SUITES,
        kem_id: int = hpke.KEM_X25519_SHA256,
    ) -> GatewayKey:
        """A new random key for `kem_id` (X25519 unless told otherwise)."""
        return cls(key_id, hpke.PrivateKey.generate(kem_id), tuple(suites))

    def config(self) -> KeyConfig:
        """The public key configuration to publish for this key."""
        return KeyConfig(
            self.key_id, self.private_key.kem_id, self.private_key.public_bytes(), self.suites
        )


@dataclass(frozen=True, slots=True)
class RequestHeader:
    """The cleartext start of an encapsulated request (plain or chunked)."""

    key_id: int
    kem_id: int
    kdf_id: int
    aead_id: int
    enc: bytes

    @property
    def suite(self) -> hpke.Suite:
        return hpke.Suite(self.kem_id, self.kdf_id, self.aead_id)

    @property
    def size(self) -> int:
        """Bytes taken by the header and enc; the ciphertext starts here."""
        return _HEADER.size + len(self.enc)


def parse_request_header(data: bytes) -> RequestHeader:
    """Read the header and enc without decrypting; raises MalformedMessage or UnsupportedSuite."""
    if len(data) < _HEADER.size:
        raise MalformedMessage("truncated request header")
    key_id, kem_id, kdf_id, aead_id = _HEADER.unpack_from(data)
    try:
        nenc = hpke.enc_size(kem_id)
    except hpke.UnsupportedSuite:
        raise UnsupportedSuite(f"unsupported KEM 0x{kem_id:04x}") from None
    end = _HEADER.size + nenc
    if len(data) < end:
        raise MalformedMessage("truncated request header")
    return RequestHeader(key_id, kem_id, kdf_id, aead_id, bytes(data[_HEADER.size : end]))


# --- shared steps ---------------------------------------------------------------------------


def _seal_context(
    config: KeyConfig,
    suite: hpke.Suite | None,
    label: bytes,
    ikm_e: bytes | None,
    ephemeral_key: hpke.PrivateKey | None,
) -> tuple[hpke.Suite, bytes, bytes, hpke.SenderContext]:
    if suite is None:
        suite = config.select_suite()
    elif (
        suite.kem_id != config.kem_id
        or (suite.kdf_id, suite.aead_id) not in config.suites
        or not suite.is_supported()
    ):
        raise UnsupportedSuite("the suite is not offered by the key configuration")
    hdr = _HEADER.pack(config.key_id, suite.kem_id, suite.kdf_id, suite.aead_id)
    try:
        enc, context = hpke.setup_sender(
            suite,
            config.public_key,
            label + b"\x00" + hdr,
            ikm_e=ikm_e,
            ephemeral_key=ephemeral_key,
        )
    except hpke.UnsupportedSuite as exc:
        raise UnsupportedSuite(str(exc)) from exc
    except hpke.HpkeError as exc:
        raise MalformedKeyConfig("the public key in the key configuration is unusable") from exc
    return suite, hdr, enc, context


def _open_context(
    keys: Mapping[int, GatewayKey], data: bytes, label: bytes
) -> tuple[RequestHeader, hpke.RecipientContext]:
    header = parse_request_header(data)
    key = keys.get(header.key_id)
    if key is None or key.key_id != header.key_id:
        raise UnknownKey(f"unknown key id {header.key_id}")
    if header.kem_id != key.private_key.kem_id or (header.kdf_id, header.aead_id) not in key.suites:
        raise UnsupportedSuite(f"suite not accepted by key {header.key_id} ({header.suite})")
    info = label + b"\x00" + data[: _HEADER.size]
    try:
        context = hpke.setup_recipient(header.suite, key.private_key, header.enc, info)
    except hpke.OpenError:
        raise DecryptionFailed("cannot decapsulate the request") from None
    return header, context


class _Exporter(Protocol):
    def export(self, exporter_context: bytes, length: int) -> bytes: ...


def _response_nonce_size(suite: hpke.Suite) -> int:
    return max(hpke.aead_nonce_size(suite.aead_id), hpke.aead_key_size(suite.aead_id))


def _response_key(
    context: _Exporter, suite: hpke.Suite, label: bytes, enc: bytes, response_nonce: bytes
) -> tuple[bytes, bytes]:
    """RFC 9458 section 4.4 (and the chunked draft's 6.2): the response AEAD key and nonce."""
    nk = hpke.aead_key_size(suite.aead_id)
    nn = hpke.aead_nonce_size(suite.aead_id)
    secret = context.export(label, max(nn, nk))
    prk = hpke.kdf_extract(suite.kdf_id, enc + response_nonce, secret)
    key = hpke.kdf_expand(suite.kdf_id, prk, b"key", nk)
    nonce = hpke.kdf_expand(suite.kdf_id, prk, b"nonce", nn)
    return key, nonce


def _new_response_nonce(suite: hpke.Suite, response_nonce: bytes | None) -> bytes:
    size = _response_nonce_size(suite)
    if response_nonce is None:
        return random_bytes(size)
    if len(response_nonce) != size:
        raise ValueError("the response nonce has the wrong length")
    return bytes(response_nonce)


def _decode_varint(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    """Read a varint at `pos`; returns (value, next position). Longer forms are accepted."""
    read = varint.read(data, pos, len(data))
    if read is None:
        raise MalformedMessage("truncated length")
    return read


# --- RFC 9458: one request, one response ----------------------------------------------------


class ClientResponseContext:
    """What a client keeps after sending a request, to open the response."""

    __slots__ = ("_context", "_enc", "_suite")

    def __init__(self, context: hpke.SenderContext, suite: hpke.Suite, enc: bytes) -> None:
        self._context = context
        self._suite = suite
        self._enc = enc

    def open(self, encapsulated_response: bytes) -> bytes:
        """Decrypt a message/ohttp-res body; raises MalformedMessage or DecryptionFailed."""
        size = _response_nonce_size(self._suite)
        if len(encapsulated_response) < size + _TAG:
            raise MalformedMessage("truncated response")
        response_nonce = encapsulated_response[:size]
        key, nonce = _response_key(
            self._context, self._suite, RESPONSE_LABEL, self._enc, response_nonce
        )
        try:
            return hpke.aead_open(self._suite.aead_id, key, nonce, encapsulated_response[size:])
        except hpke.OpenError:
            raise DecryptionFailed("cannot decrypt the response") from None


class ServerResponseContext:
    """What a gateway keeps after opening a request, to seal the one response."""

    __slots__ = ("_context", "_enc", "_sealed", "_suite")

    def __init__(self, context: hpke.RecipientContext, suite: hpke.Suite, enc: bytes) -> None:
        self._context = context
        self._suite = suite
        self._enc = enc
        self._sealed = False

    def seal(self, plaintext: bytes, *, response_nonce: bytes | None = None) -> bytes:
        """Encrypt the response (once). `response_nonce` is for known-answer tests only."""
        if self._sealed:
            raise OhttpError("the response was already sealed")
        response_nonce = _new_response_nonce(self._suite, response_nonce)
        key, nonce = _response_key(
            self._context, self._suite, RESPONSE_LABEL, self._enc, response_nonce
        )
        self._sealed = True
        return response_nonce + hpke.aead_seal(self._suite.aead_id, key, nonce, plaintext)


def encapsulate_request(
    config: KeyConfig,
    plaintext: bytes,
    *,
    suite: hpke.Suite | None = None,
    ikm_e: bytes | None = None,
    ephemeral_key: hpke.PrivateKey | None = None,
) -> tuple[bytes, ClientResponseContext]:
    """Build a message/ohttp-req body. `ikm_e`/`ephemeral_key` are for known-answer tests."""
    suite, hdr, enc, context = _seal_context(config, suite, REQUEST_LABEL, ikm_e, ephemeral_key)
    return hdr + enc + context.seal(plaintext), ClientResponseContext(context, suite, enc)


def decapsulate_request(
    keys: Mapping[int, GatewayKey], data: bytes
) -> tuple[bytes, ServerResponseContext]:
    """Open a message/ohttp-req body.

    Raises UnknownKey, UnsupportedSuite, MalformedMessage or DecryptionFailed.
    """
    header, context = _open_context(keys, data, REQUEST_LABEL)
    ciphertext = data[header.size :]
    if len(ciphertext) < _TAG:
        raise MalformedMessage("truncated request")
    try:
        plaintext = context.open(ciphertext)
    except hpke.OpenError:
        raise DecryptionFailed("cannot decrypt the request") from None
    return plaintext, ServerResponseContext(context, header.suite, header.enc)


# --- draft-ietf-ohai-chunked-ohttp ----------------------------------------------------------


class _ChunkNonces:
    """The response AEAD and its per-chunk nonces: aead_nonce XOR encode(Nn, counter)."""

    __slots__ = ("_base", "_cipher", "_counter", "_limit", "_size")

    def __init__(self, suite: hpke.Suite, key: bytes, nonce: bytes) -> None:
        self._cipher = hpke.aead_cipher(suite.aead_id, key)
        self._base = int.from_bytes(nonce, "big")
        self._size = len(nonce)
        self._counter = 0
        self._limit = 1 << (8 * len(nonce))

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return self._cipher.encrypt(self._next(), plaintext, aad)

    def open(self, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            plaintext = self._cipher.decrypt(self._next(), ciphertext, aad)
        except InvalidTag:
            raise DecryptionFailed("cannot decrypt a response chunk") from None
        return plaintext

    def _next(self) -> bytes:
        if self._counter >= self._limit:
            raise OhttpError("too many chunks")  # The nonce would repeat (draft section 6.2).
        nonce = (self._base ^ self._counter).to_bytes(self._size, "big")
        self._counter += 1
        return nonce


class ChunkedServerResponseContext:
    """Seals a chunked response: `start()`, then `seal_chunk()`..., then `seal_final()`."""

    __slots__ = ("_chunks", "_context", "_enc", "_finished", "_suite")

    def __init__(self, context: hpke.RecipientContext, suite: hpke.Suite, enc: bytes) -> None:
        self._context = context
        self._suite = suite
        self._enc = enc
        self._chunks: _ChunkNonces | None = None
        self._finished = False

    def start(self, *, response_nonce: bytes | None = None) -> bytes:
        """Return the response nonce, the first bytes to send. `response_nonce` is for tests."""
        if self._chunks is not None:
            raise OhttpError("the response was already started")
        response_nonce = _new_response_nonce(self._suite, response_nonce)
        key, nonce = _response_key(
            self._context, self._suite, CHUNKED_RESPONSE_LABEL, self._enc, response_nonce
        )
        self._chunks = _ChunkNonces(self._suite, key, nonce)
        return response_nonce

    def seal_chunk(self, plaintext: bytes) -> bytes:
        """A non-final chunk, length-prefixed. Empty plaintext is refused (draft section 6)."""
        if not plaintext:
            raise ValueError("a non-final chunk must not be empty")
        sealed = self._require_open().seal(plaintext, b"")
        return varint.encode(len(sealed)) + sealed

    def seal_final(self, plaintext: bytes = b"") -> bytes:
        """The final chunk (zero length prefix, AAD "final"); nothing may follow it."""
        sealed = self._require_open().seal(plaintext, FINAL_CHUNK_AAD)
        self._finished = True
        return b"\x00" + sealed

    def _require_open(self) -> _ChunkNonces:
        if self._chunks is None:
            raise OhttpError("call start() before sealing chunks")
        if self._finished:
            raise OhttpError("the final chunk was already sealed")
        return self._chunks


_NONCE, _LENGTH, _CHUNK, _FINAL, _DONE, _FAILED = range(6)


class ChunkedResponseOpener:
    """Incrementally opens a chunked response; bytes may arrive split anywhere."""

    __slots__ = (
        "_buffer",
        "_chunk_length",
        "_chunks",
        "_context",
        "_enc",
        "_max_chunk_size",
        "_state",
        "_suite",
    )

    def __init__(
        self, context: hpke.SenderContext, suite: hpke.Suite, enc: bytes, max_chunk_size: int
    ) -> None:
        self._context = context
        self._suite = suite
        self._enc = enc
        self._max_chunk_size = max_chunk_size
        self._buffer = bytearray()
        self._chunks: _ChunkNonces | None = None
        self._chunk_length = 0
        self._state = _NONCE

    @property
    def done(self) -> bool:
        """Whether the final chunk arrived and was authenticated."""
        return self._state == _DONE

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the plaintext of each non-final chunk completed."""
        if self._state == _DONE:
            raise OhttpError("the response is already finished")
        if self._state == _FAILED:
            raise DecryptionFailed("the response already failed")
        self._buffer += data
        try:
            return self._drain()
        except OhttpError:
            self._state = _FAILED
            raise

    def finish(self) -> bytes:
        """End of stream: authenticate and return the final chunk's plaintext.

        Raises DecryptionFailed if the stream ended before the final chunk (truncation).
        """
        if self._state == _DONE:
            raise OhttpError("the response is already finished")
        if self._state != _FINAL or self._chunks is None:
            self._state = _FAILED
            raise DecryptionFailed("the response ended before its final chunk")
        try:
            plaintext = self._chunks.open(bytes(self._buffer), FINAL_CHUNK_AAD)
        except OhttpError:
            self._state = _FAILED
            raise
        self._buffer.clear()
        self._state = _DONE
        return plaintext

    def _drain(self) -> list[bytes]:
        buffer = self._buffer
        pos = 0
        out: list[bytes] = []
        try:
            while True:
                available = len(buffer) - pos
                if self._state == _NONCE:
                    size = _response_nonce_size(self._suite)
                    if available < size:
                        break
                    response_nonce = bytes(buffer[pos : pos + size])
                    pos += size
                    key, nonce = _response_key(
                        self._context,
                        self._suite,
                        CHUNKED_RESPONSE_LABEL,
                        self._enc,
                        response_nonce,
                    )
                    self._chunks = _ChunkNonces(self._suite, key, nonce)
                    self._state = _LENGTH
                elif self._state == _LENGTH:
                    if available < 1 or available < 1 << (buffer[pos] >> 6):
                        break
                    length, pos = _decode_varint(buffer, pos)
                    if length > self._max_chunk_size + _TAG:
                        raise MalformedMessage("response chunk too large")
                    self._chunk_length = length
                    self._state = _FINAL if length == 0 else _CHUNK
                elif self._state == _CHUNK:
                    if available < self._chunk_length:
                        break
                    assert self._chunks is not None
                    end = pos + self._chunk_length
                    plaintext = self._chunks.open(bytes(buffer[pos:end]), b"")
                    pos = end
                    if not plaintext:
                        raise DecryptionFailed("empty non-final response chunk")
                    out.append(plaintext)
                    self._state = _LENGTH
                else:  # _FINAL: the last chunk runs to the end of the stream; see finish().
                    if available > self._max_chunk_size + _TAG:
                        raise MalformedMessage("final response chunk too large")
                    break
        finally:
            del buffer[:pos]
        return out


class ChunkedClientResponseContext:
    """What a client keeps after sending a chunked request, to open the chunked response."""

    __slots__ = ("_context", "_enc", "_suite")

    def __init__(self, context: hpke.SenderContext, suite: hpke.Suite, enc: bytes) -> None:
        self._context = context
        self._suite = suite
        self._enc = enc

    def opener(self, *, max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE) -> ChunkedResponseOpener:
        """A fresh incremental decoder for the response stream."""
        return ChunkedResponseOpener(self._context, self._suite, self._enc, max_chunk_size)


def encapsulate_chunked_request(
    config: KeyConfig,
    chunks: Sequence[bytes],
    *,
    suite: hpke.Suite | None = None,
    ikm_e: bytes | None = None,
    ephemeral_key: hpke.PrivateKey | None = None,
) -> tuple[bytes, ChunkedClientResponseContext]:
    """Build a message/ohttp-chunked-req body; the last element becomes the final chunk.

    Non-final chunks must not be empty; an empty sequence sends one empty final chunk.
    """
    suite, hdr, enc, context = _seal_context(
        config, suite, CHUNKED_REQUEST_LABEL, ikm_e, ephemeral_key
    )
    body = list(chunks) or [b""]
    parts = [hdr, enc]
    for chunk in body[:-1]:
        if not chunk:
            raise ValueError("a non-final chunk must not be empty")
        sealed = context.seal(chunk)
        parts += (varint.encode(len(sealed)), sealed)
    parts += (b"\x00", context.seal(body[-1], FINAL_CHUNK_AAD))
    return b"".join(parts), ChunkedClientResponseContext(context, suite, enc)


def decapsulate_chunked_request(
    keys: Mapping[int, GatewayKey],
    data: bytes,
    *,
    max_chunks: int = DEFAULT_MAX_REQUEST_CHUNKS,
) -> tuple[bytes, ChunkedServerResponseContext]:
    """Open a whole message/ohttp-chunked-req body; returns the concatenated plaintext.

    Raises UnknownKey, UnsupportedSuite, MalformedMessage or DecryptionFailed; a message
    without an authentic final chunk is refused, and so is one of more than `max_chunks`
    chunks (each costs an AEAD operation: tiny chunks would multiply the work).
    """
    header, context = _open_context(keys, data, CHUNKED_REQUEST_LABEL)
    plaintexts: list[bytes] = []
    pos = header.size
    try:
        while True:
            if pos >= len(data):
                raise DecryptionFailed("the request ended before its final chunk")
            if len(plaintexts) >= max_chunks:
                raise MalformedMessage("too many request chunks")
            length, pos = _decode_varint(data, pos)
            if length == 0:
                plaintexts.append(context.open(data[pos:], FINAL_CHUNK_AAD))
                break
            end = pos + length
            if end > len(data):
                raise MalformedMessage("truncated request chunk")
            plaintext = context.open(data[pos:end])
            if not plaintext:
                raise DecryptionFailed("empty non-final request chunk")
            plaintexts.append(plaintext)
            pos = end
    except hpke.OpenError:
        raise DecryptionFailed("cannot decrypt a request chunk") from None
    response = ChunkedServerResponseContext(context, header.suite, header.enc)
    return b"".join(plaintexts), response
