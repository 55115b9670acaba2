"""Signed notes (c2sp.org/signed-note) with Ed25519 keys, as Go's sumdb/note writes them.

A signed note is a UTF-8 text ending in a newline, a blank line, then one signature line
per key: an em dash (U+2014), a space, the key name, a space, and the base64 of the 4-byte
key ID followed by the signature of the text. The audit log publishes its checkpoints in
this form, so that witnesses and monitors built for other transparency logs can check
them, and so that several keys (the log's, then witnesses') can sign one text.

A key is named and identified by its key ID, the first four bytes of SHA-256(name || "\\n"
|| 0x01 || public key). Keys travel as the strings Go's note package uses::

    <name>+<8 hex key ID>+<base64(0x01 || 32-byte public key)>              verifier key
    PRIVATE+KEY+<name>+<8 hex key ID>+<base64(0x01 || 32-byte seed)>        signer key

:func:`open_note` accepts a note only when at least one signature is by a known key and
every signature by a known key verifies; signatures by keys it does not know are ignored,
as the specification requires (they may be a witness's). Base64 must be canonical
(RFC 4648 §4, as Go's encoder writes it), which also rules out two spellings of one note.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ALG_ED25519 = 0x01
ED25519_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
# The specification asks verifiers to accept at least 16; Go's Open stops at 100.
MAX_SIGNATURES = 100

_SIGNATURE_PREFIX = "\u2014 "
_KEY_ID_HEX = re.compile(r"[0-9a-fA-F]{8}")


class NoteError(ValueError):
    """A note was not accepted."""


class MalformedNoteError(NoteError):
    """The bytes are not a well-formed signed note."""


class UnverifiedNoteError(NoteError):
    """No signature in the note is by a known key."""


class InvalidSignatureError(NoteError):
    """A signature by a known key does not verify."""

    def __init__(self, name: str, key_id: int) -> None:
        super().__init__(f"invalid signature for key {name}+{key_id:08x}")
        self.name = name
        self.key_id = key_id


class MalformedKeyError(ValueError):
    """A verifier or signer key string is not well-formed, or its key ID does not match."""


def is_valid_key_name(name: str) -> bool:
    """Non-empty, encodable as UTF-8, without Unicode spaces, pluses or control characters."""
    return (
        bool(name)
        and _is_utf8(name)
        and "+" not in name
        and not any(ch.isspace() or ch < " " for ch in name)
    )


def key_id(name: str, public_key: bytes) -> int:
    """The key ID of an Ed25519 public key: SHA-256(name || "\\n" || 0x01 || key)[:4]."""
    if not is_valid_key_name(name):
        raise MalformedKeyError(f"invalid key name {name!r}")
    if len(public_key) != ED25519_KEY_SIZE:
        raise MalformedKeyError(f"an Ed25519 public key is {ED25519_KEY_SIZE} bytes")
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True, slots=True)
class Verifier:
    """A named Ed25519 public key that checks note signatures."""

    name: str
    key_id: int
    public_key: bytes

    def __post_init__(self) -> None:
        if key_id(self.name, self.public_key) != self.key_id:
            raise MalformedKeyError(f"key ID {self.key_id:08x} does not match key {self.name}")

    @classmethod
    def from_public_key(cls, name: str, public_key: bytes) -> Verifier:
        return cls(name, key_id(name, public_key), public_key)

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """A verifier from its key string `<name>+<hex key ID>+<base64 key>`."""
        name, sep1, rest = vkey.partition("+")
        hex_id, sep2, key64 = rest.partition("+")
        public_key = _parse_key(name, hex_id, key64, complete=bool(sep1 and sep2))
        return cls(name, int(hex_id, 16), public_key)

    def encode(self) -> str:
        key64 = b64encode(bytes([ALG_ED25519]) + self.public_key)
        return f"{self.name}+{self.key_id:08x}+{key64}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != ED25519_SIGNATURE_SIZE:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class Signer:
    """A named Ed25519 private key that signs notes. Its repr never shows the key."""

    __slots__ = ("_private_key", "key_id", "name")

    def __init__(self, name: str, seed: bytes) -> None:
        if len(seed) != ED25519_KEY_SIZE:
            raise MalformedKeyError(f"an Ed25519 seed is {ED25519_KEY_SIZE} bytes")
        self._private_key = Ed25519PrivateKey.from_private_bytes(seed)
        self.name = name
        self.key_id = key_id(name, self._private_key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls, name: str) -> Signer:
        return cls(name, Ed25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def parse(cls, skey: str) -> Signer:
        """A signer from its key string `PRIVATE+KEY+<name>+<hex key ID>+<base64 seed>`.

        The key ID is checked against the public key the seed derives.
        """
        prefix, sep, rest = skey.partition("+")
        word, sep0, rest = rest.partition("+")
        name, sep1, rest = rest.partition("+")
        hex_id, sep2, key64 = rest.partition("+")
        complete = prefix == "PRIVATE" and word == "KEY" and bool(sep and sep0 and sep1 and sep2)
        signer = cls(name, _parse_key(name, hex_id, key64, complete=complete))
        if signer.key_id != int(hex_id, 16):
            raise MalformedKeyError(f"key ID {hex_id} does not match key {name}")
        return signer

    def encode(self) -> str:
        """The signer key string: a secret, to be stored as one."""
        seed64 = b64encode(bytes([ALG_ED25519]) + self._private_key.private_bytes_raw())
        return f"PRIVATE+KEY+{self.name}+{self.key_id:08x}+{seed64}"

    def verifier(self) -> Verifier:
        return Verifier(self.name, self.key_id, self._private_key.public_key().public_bytes_raw())

    def sign_message(self, message: bytes) -> bytes:
        return self._private_key.sign(message)

    def __repr__(self) -> str:
        return f"Signer({self.name!r}, key_id={self.key_id:08x})"


def generate_key(name: str) -> tuple[str, str]:
    """A fresh key pair as (signer key string, verifier key string), like Go's GenerateKey."""
    signer = Signer.generate(name)
    return signer.encode(), signer.verifier().encode()


def sign(text: str, *signers: Signer) -> bytes:
    """The signed note: `text`, a blank line, and one signature line per signer."""
    if not signers:
        raise ValueError("a note needs at least one signer")
    _check_text(text)
    message = text.encode()
    lines = []
    for signer in signers:
        signature = signer.key_id.to_bytes(4, "big") + signer.sign_message(message)
        lines.append(f"{_SIGNATURE_PREFIX}{signer.name} {b64encode(signature)}\n")
    return message + b"\n" + "".join(lines).encode()


def open_note(note: bytes, verifiers: Iterable[Verifier]) -> tuple[str, list[str]]:
    """The text of `note` and the names of the known keys whose signatures verified.

    Raises MalformedNoteError, UnverifiedNoteError (no signature by a known key) or
    InvalidSignatureError (a signature by a known key fails); ValueError if two different
    verifiers share a name and key ID.
    """
    known = _index(verifiers)
    text, signatures = _split_note(note)
    message = text.encode()
    verified: list[str] = []
    for name, signer_id, signature in signatures:
        verifier = known.get((name, signer_id))
        if verifier is None:
            continue
        if not verifier.verify(message, signature):
            raise InvalidSignatureError(name, signer_id)
        if name not in verified:
            verified.append(name)
    if not verified:
        raise UnverifiedNoteError("the note has no signature by a known key")
    return text, verified


def has_control_characters(text: str) -> bool:
    """Whether `text` holds an ASCII control character other than newline."""
    return any(ch < " " and ch != "\n" for ch in text)


def decode_base64(value: str) -> bytes:
    """Standard base64 (RFC 4648 §4), padded and canonical, or ValueError."""
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64") from exc
    if b64encode(decoded) != value:
        raise ValueError("not canonical base64")
    return decoded


def _parse_key(name: str, hex_id: str, key64: str, *, complete: bool) -> bytes:
    """The 32 key bytes of a key string's parts, checked for shape (not the key ID)."""
    if not complete or not is_valid_key_name(name) or not _KEY_ID_HEX.fullmatch(hex_id):
        raise MalformedKeyError("malformed key string")
    try:
        key = decode_base64(key64)
    except ValueError as exc:
        raise MalformedKeyError("malformed key string") from exc
    if not key or key[0] != ALG_ED25519:
        raise MalformedKeyError("unknown key algorithm")
    if len(key) != 1 + ED25519_KEY_SIZE:
        raise MalformedKeyError("malformed key string")
    return key[1:]


def _index(verifiers: Iterable[Verifier]) -> dict[tuple[str, int], Verifier]:
    known: dict[tuple[str, int], Verifier] = {}
    for verifier in verifiers:
        slot = (verifier.name, verifier.key_id)
        if known.setdefault(slot, verifier) != verifier:
            raise ValueError(f"two verifiers share the key {verifier.name}+{verifier.key_id:08x}")
    return known


def _split_note(note: bytes) -> tuple[str, list[tuple[str, int, bytes]]]:
    """The text and the (name, key ID, signature) of each signature line."""
    try:
        decoded = note.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedNoteError("the note is not UTF-8") from exc
    if has_control_characters(decoded):
        raise MalformedNoteError("the note holds a control character")
    split = decoded.rfind("\n\n")
    if split < 0:
        raise MalformedNoteError("the note has no blank line before its signatures")
    text, block = decoded[: split + 1], decoded[split + 2 :]
    if not block.endswith("\n"):
        raise MalformedNoteError("the note does not end with a signature line")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNoteError(f"the note has over {MAX_SIGNATURES} signatures")
    return text, [_parse_signature_line(line) for line in lines]


def _parse_signature_line(line: str) -> tuple[str, int, bytes]:
    if not line.startswith(_SIGNATURE_PREFIX):
        raise MalformedNoteError("a signature line does not start with an em dash and a space")
    name, _, sig64 = line[len(_SIGNATURE_PREFIX) :].partition(" ")
    if not is_valid_key_name(name):
        raise MalformedNoteError("a signature line has an invalid key name")
    try:
        raw = decode_base64(sig64)
    except ValueError as exc:
        raise MalformedNoteError("a signature is not base64") from exc
    if len(raw) < 5:
        raise MalformedNoteError("a signature is too short")
    return name, int.from_bytes(raw[:4], "big"), raw[4:]


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise MalformedNoteError("a note's text must end with a newline")
    if not _is_utf8(text):
        raise MalformedNoteError("a note's text must be valid Unicode")
    if has_control_characters(text):
        raise MalformedNoteError("a note's text must not hold control characters")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def b64encode(data: bytes) -> str:
    """Standard, padded base64 (RFC 4648 §4), as text: the one spelling notes use."""
    return base64.b64encode(data).decode("ascii")
