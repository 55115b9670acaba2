"""Envelope encryption of secrets at rest: a :class:`KeyRing` and its key-encryption keys.

Every secret Bastion stores (an OHTTP private key today, model data keys later) is sealed
in an *envelope*: a fresh random data key (DEK) encrypts the secret with AES-256-GCM, and a
key-encryption key (KEK) from a provider wraps the DEK. Only the provider can unwrap, so
rotating or moving the KEK (to a KMS) never touches the secrets themselves.

The envelope is versioned and self-describing::

    "BKR" 0x01                       magic and format version
    u8 len | provider name           e.g. "local"
    u8 len | KEK id                  which KEK of that provider wrapped the DEK
    u16 len | wrapped DEK            provider-specific
    12 bytes nonce | ciphertext+tag  AES-256-GCM of the secret under the DEK

Both the DEK wrapping and the secret's encryption are bound to a *context* string (what
the secret is, e.g. ``"ohttp-key/3"``) and to the envelope header, so an envelope copied
to another row, or with an edited header, does not open.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.crypto.master_key import derive_key

MAGIC = b"BKR\x01"
_NONCE_BYTES = 12
_DEK_BYTES = 32


class KeyRingError(Exception):
    """An envelope could not be made or opened (the message never contains key material)."""


class KekProvider(Protocol):
    """Wraps and unwraps data keys with a key-encryption key it holds."""

    @property
    def name(self) -> str: ...

    @property
    def kek_id(self) -> str:
        """The id of the KEK new envelopes are wrapped with."""
        ...

    def generate_data_key(self, aad: bytes) -> tuple[bytes, bytes]:
        """A fresh 256-bit data key and its wrapped form, bound to `aad`."""
        ...

    def unwrap(self, wrapped: bytes, kek_id: str, aad: bytes) -> bytes:
        """Unwrap `wrapped`; raises KeyRingError if it was not wrapped by `kek_id` for `aad`."""
        ...

    def rewrap(self, wrapped: bytes, kek_id: str, aad: bytes) -> bytes:
        """`wrapped` wrapped again under the newest KEK version (the data key is unchanged)."""
        ...


class LocalKek:
    """The KEK derived from the home's master key (HKDF, purpose ``keyring-kek-v1``)."""

    name = "local"
    kek_id = "master-v1"

    def __init__(self, master_key: bytes) -> None:
        self._aead = AESGCM(derive_key(master_key, "keyring-kek-v1"))

    def wrap(self, dek: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, dek, aad)

    def generate_data_key(self, aad: bytes) -> tuple[bytes, bytes]:
        dek = AESGCM.generate_key(bit_length=8 * _DEK_BYTES)
        return dek, self.wrap(dek, aad)

    def rewrap(self, wrapped: bytes, kek_id: str, aad: bytes) -> bytes:
        # One KEK version per master key: wrapping again only renews the nonce.
        return self.wrap(self.unwrap(wrapped, kek_id, aad), aad)

    def unwrap(self, wrapped: bytes, kek_id: str, aad: bytes) -> bytes:
        if kek_id != self.kek_id or len(wrapped) <= _NONCE_BYTES:
            raise KeyRingError("The data key was not wrapped by this key-encryption key.")
        try:
            return self._aead.decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], aad)
        except InvalidTag:
            raise KeyRingError("The data key does not unwrap (wrong key or altered).") from None


class KeyRing:
    """Seals secrets in versioned envelopes under one KEK provider; opens envelopes of that
    provider and of `also_opens` (e.g. the local KEK after moving to a KMS)."""

    def __init__(self, provider: KekProvider, *, also_opens: Sequence[KekProvider] = ()) -> None:
        self._provider = provider
        self._providers = {p.name: p for p in also_opens}
        self._providers[provider.name] = provider

    @property
    def provider(self) -> KekProvider:
        return self._provider

    def rotate_kek(self) -> str:
        """Make a new version of the KEK, if the provider has versions; says what it did."""
        rotate = getattr(self._provider, "rotate", None)
        if rotate is None:
            return f"the {self._provider.name} key provider has one KEK version; nothing to rotate"
        return f"{self._provider.name} KEK {self._provider.kek_id} is now at version {rotate()}"

    def seal(self, secret: bytes, context: str) -> bytes:
        """An envelope holding `secret`, bound to `context`."""
        provider = self._provider
        name = provider.name.encode()
        kek_id = provider.kek_id.encode()
        prefix = MAGIC + _short(name) + _short(kek_id)
        dek, wrapped = provider.generate_data_key(_aad(prefix, context))
        if len(dek) != _DEK_BYTES:
            raise KeyRingError("The key provider returned a data key of the wrong size.")
        if len(wrapped) > 0xFFFF:
            raise KeyRingError("The wrapped data key is too long for the envelope format.")
        header = prefix + struct.pack(">H", len(wrapped)) + wrapped
        nonce = os.urandom(_NONCE_BYTES)
        return header + nonce + AESGCM(dek).encrypt(nonce, secret, _aad(header, context))

    def rewrap(self, envelope: bytes, context: str) -> bytes:
        """The envelope with its data key wrapped under the provider's newest KEK version
        (the data key stays the same). An envelope of another provider this ring opens is
        sealed again under this ring's provider (a migration, e.g. local to transit)."""
        parsed = _parse(envelope, self._providers)
        if parsed.provider != self._provider.name:
            return self.seal(self.open(envelope, context), context)
        wrapped = self._provider.rewrap(parsed.wrapped, parsed.kek_id, _aad(parsed.prefix, context))
        header = parsed.prefix + struct.pack(">H", len(wrapped)) + wrapped
        # The secret's AEAD binds the old header: open with it, seal again under the same
        # data key with the new header (one small re-encryption of the secret itself).
        dek = self._provider.unwrap(wrapped, parsed.kek_id, _aad(parsed.prefix, context))
        secret = _open_body(dek, parsed, context)
        nonce = os.urandom(_NONCE_BYTES)
        return header + nonce + AESGCM(dek).encrypt(nonce, secret, _aad(header, context))

    def open(self, envelope: bytes, context: str) -> bytes:
        """The secret in `envelope`; raises KeyRingError if it is malformed, altered,
        bound to another context, or wrapped by a KEK this ring does not hold."""
        parsed = _parse(envelope, self._providers)
        provider = self._providers[parsed.provider]
        dek = provider.unwrap(parsed.wrapped, parsed.kek_id, _aad(parsed.prefix, context))
        return _open_body(dek, parsed, context)


@dataclass(frozen=True, slots=True)
class _Envelope:
    prefix: bytes  # magic, provider name, KEK id
    provider: str
    kek_id: str
    wrapped: bytes
    header: bytes  # prefix + wrapped data key
    nonce: bytes
    ciphertext: bytes


def _parse(envelope: bytes, providers: Mapping[str, KekProvider]) -> _Envelope:
    view = memoryview(envelope)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise KeyRingError("Not a key ring envelope, or an unknown format version.")
    offset = len(MAGIC)
    name, offset = _read_short(view, offset)
    kek_id, offset = _read_short(view, offset)
    prefix = bytes(view[:offset])
    if offset + 2 > len(view):
        raise KeyRingError("The envelope is truncated.")
    (wrapped_length,) = struct.unpack_from(">H", view, offset)
    offset += 2
    wrapped = bytes(view[offset : offset + wrapped_length])
    offset += wrapped_length
    if len(wrapped) != wrapped_length or offset + _NONCE_BYTES + 16 > len(view):
        raise KeyRingError("The envelope is truncated.")
    provider = name.decode(errors="replace")
    if provider not in providers:
        raise KeyRingError("The envelope was sealed by another key provider.")
    return _Envelope(
        prefix=prefix,
        provider=provider,
        kek_id=kek_id.decode(errors="replace"),
        wrapped=wrapped,
        header=bytes(view[:offset]),
        nonce=bytes(view[offset : offset + _NONCE_BYTES]),
        ciphertext=bytes(view[offset + _NONCE_BYTES :]),
    )


def _open_body(dek: bytes, parsed: _Envelope, context: str) -> bytes:
    try:
        return AESGCM(dek).decrypt(parsed.nonce, parsed.ciphertext, _aad(parsed.header, context))
    except InvalidTag:
        raise KeyRingError("The envelope does not open (altered or another context).") from None


def _aad(header: bytes, context: str) -> bytes:
    return header + b"\x00" + context.encode()


def _short(value: bytes) -> bytes:
    if not value or len(value) > 0xFF:
        raise KeyRingError("Provider names and KEK ids must be 1 to 255 bytes.")
    return bytes([len(value)]) + value


def _read_short(view: memoryview, offset: int) -> tuple[bytes, int]:
    if offset >= len(view):
        raise KeyRingError("The envelope is truncated.")
    length = view[offset]
    end = offset + 1 + length
    if length == 0 or end > len(view):
        raise KeyRingError("The envelope is truncated.")
    return bytes(view[offset + 1 : end]), end
