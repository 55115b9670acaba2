"""API key tokens: their format, generation, parsing, and the digest that is stored.

A token is ``bsk_<public id>_<secret>``:

- the public id is 16 lowercase hex characters (64 random bits); it names the key in the
  database, in logs and in audit events;
- the secret is 52 lowercase base32 characters (32 random bytes, 256 bits) and is shown once.

Only an HMAC-SHA-256 digest of (public id, secret) is stored, under a key derived from the
master key, so a copy of the database alone cannot be used to check guessed secrets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from bastion.errors import AuthenticationError

TOKEN_PREFIX = "bsk_"  # noqa: S105 (the public token prefix)
PUBLIC_ID_BYTES = 8
SECRET_BYTES = 32
PUBLIC_ID_LENGTH = PUBLIC_ID_BYTES * 2
SECRET_LENGTH = 52  # base32 of 32 bytes without padding
TOKEN_LENGTH = len(TOKEN_PREFIX) + PUBLIC_ID_LENGTH + 1 + SECRET_LENGTH
DIGEST_LENGTH = 32

PUBLIC_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
_TOKEN_PATTERN = re.compile(r"bsk_([0-9a-f]{16})_([a-z2-7]{52})")
# Binds each digest to this format version, so a later format cannot collide with it.
_DIGEST_CONTEXT = b"bastion-api-key-v1\x00"


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A newly generated key. `token` is what the client sends; show it once."""

    public_id: str
    secret: str
    token: str

    def __repr__(self) -> str:
        # Keep the secret out of tracebacks and debug logs.
        return f"IssuedKey(public_id={self.public_id!r}, secret=<hidden>)"


def generate_api_key() -> IssuedKey:
    """A new random key from the operating system's CSPRNG."""
    public_id = secrets.token_hex(PUBLIC_ID_BYTES)
    raw = secrets.token_bytes(SECRET_BYTES)
    secret = base64.b32encode(raw).decode("ascii").rstrip("=").lower()
    return IssuedKey(public_id, secret, f"{TOKEN_PREFIX}{public_id}_{secret}")


def parse_api_key(token: str) -> tuple[str, str]:
    """Split a token into (public id, secret); AuthenticationError if it is malformed.

    The length is checked before the pattern, so oversized input costs nothing.
    """
    if len(token) != TOKEN_LENGTH:
        raise AuthenticationError()
    match = _TOKEN_PATTERN.fullmatch(token)
    if match is None:
        raise AuthenticationError()
    return match.group(1), match.group(2)


def is_public_id(value: str) -> bool:
    """Whether `value` has the shape of a public key id (not whether such a key exists)."""
    return len(value) == PUBLIC_ID_LENGTH and PUBLIC_ID_PATTERN.fullmatch(value) is not None


class KeyHasher:
    """Computes and checks the stored digest of a key with a dedicated HMAC key."""

    __slots__ = ("_key",)

    def __init__(self, hmac_key: bytes) -> None:
        if len(hmac_key) < 32:
            raise ValueError("the HMAC key must be at least 32 bytes")
        self._key = hmac_key

    def __repr__(self) -> str:
        return "KeyHasher(<hidden>)"

    def digest(self, public_id: str, secret: str) -> bytes:
        """The HMAC-SHA-256 digest to store for this key."""
        message = b"%s%s\x00%s" % (
            _DIGEST_CONTEXT,
            public_id.encode("ascii"),
            secret.encode("ascii"),
        )
        # hmac.new, not hmac.digest: the latter releases the GIL (see crypto/entropy.py).
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def verify(self, public_id: str, secret: str, digest: bytes) -> None:
        """Raise AuthenticationError unless `secret` matches `digest` (constant time)."""
        if not hmac.compare_digest(self.digest(public_id, secret), digest):
            raise AuthenticationError()
