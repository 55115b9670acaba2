"""A key-encryption key held by HashiCorp Vault / OpenBao Transit, reached through `hvac`.

The KEK never leaves the KMS: Bastion asks Transit for a data key (``datakey``), unwraps
data keys with ``decrypt``, and after a ``rotate`` of the Transit key re-wraps them with
``rewrap`` (the data keys, and so what they encrypt, stay the same).

The Transit key is created by Bastion as a *derived* key (``derived=true``): every call
passes a context, here the SHA-256 of the envelope's associated data, so a wrapped data
key only unwraps for the envelope it was made for (Transit has no associated data for
``datakey`` and ``rewrap``; key derivation binds just as well).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import hvac
import hvac.exceptions
import requests

from bastion.crypto.keyring import KeyRingError

DATA_KEY_BITS = 256


class TransitKek:
    """The `transit` key provider for a :class:`~bastion.crypto.keyring.KeyRing`."""

    name = "transit"

    def __init__(self, client: hvac.Client, key_name: str, *, mount: str = "transit") -> None:
        self._client = client
        self._key = key_name
        self._mount = mount

    @classmethod
    def connect(
        cls,
        url: str,
        token: str,
        key_name: str,
        *,
        mount: str = "transit",
        verify: bool | str = True,
        timeout_s: float = 10.0,
    ) -> TransitKek:
        """A provider talking to the Transit engine at `url` with `token`."""
        client = hvac.Client(url=url, token=token, verify=verify, timeout=timeout_s)
        return cls(client, key_name, mount=mount)

    @property
    def kek_id(self) -> str:
        # The key version travels inside each ciphertext ("vault:vN:..."), so rotation
        # keeps this id.
        return f"{self._mount}/{self._key}"

    def ensure_key(self) -> None:
        """Create the Transit key (derived, AES-256-GCM) unless it exists."""
        try:
            self._client.secrets.transit.read_key(name=self._key, mount_point=self._mount)
            return
        except hvac.exceptions.InvalidPath:
            pass
        except Exception as exc:
            raise _failure("reach", exc) from None
        try:
            self._client.secrets.transit.create_key(
                name=self._key, derived=True, key_type="aes256-gcm96", mount_point=self._mount
            )
        except Exception as exc:
            raise _failure("create the key in", exc) from None

    def generate_data_key(self, aad: bytes) -> tuple[bytes, bytes]:
        answer = self._call(
            "generate a data key with",
            self._client.secrets.transit.generate_data_key,
            name=self._key,
            key_type="plaintext",
            bits=DATA_KEY_BITS,
            context=_context(aad),
            mount_point=self._mount,
        )
        data = answer["data"]
        return base64.b64decode(data["plaintext"]), data["ciphertext"].encode()

    def unwrap(self, wrapped: bytes, kek_id: str, aad: bytes) -> bytes:
        data = self._on_wrapped("unwrap a data key with", "decrypt_data", wrapped, kek_id, aad)
        return base64.b64decode(data["plaintext"])

    def rewrap(self, wrapped: bytes, kek_id: str, aad: bytes) -> bytes:
        data = self._on_wrapped("rewrap a data key with", "rewrap_data", wrapped, kek_id, aad)
        ciphertext: str = data["ciphertext"]
        return ciphertext.encode()

    def _on_wrapped(
        self, what: str, operation: str, wrapped: bytes, kek_id: str, aad: bytes
    ) -> Any:
        """Call the Transit `operation` on a wrapped data key; returns the answer's data."""
        self._check_kek(kek_id)
        answer = self._call(
            what,
            getattr(self._client.secrets.transit, operation),
            name=self._key,
            ciphertext=wrapped.decode(errors="replace"),
            context=_context(aad),
            mount_point=self._mount,
        )
        return answer["data"]

    def rotate(self) -> int:
        """Make a new version of the Transit key; returns the latest version."""
        self._call(
            "rotate the key in",
            self._client.secrets.transit.rotate_key,
            name=self._key,
            mount_point=self._mount,
        )
        info = self._call(
            "read the key in",
            self._client.secrets.transit.read_key,
            name=self._key,
            mount_point=self._mount,
        )
        return int(info["data"]["latest_version"])

    def _check_kek(self, kek_id: str) -> None:
        if kek_id != self.kek_id:
            raise KeyRingError("The data key was wrapped by another Transit key.")

    def _call(self, what: str, method: Any, **arguments: Any) -> Any:
        try:
            return method(**arguments)
        except Exception as exc:
            raise _failure(what, exc) from None


def _context(aad: bytes) -> str:
    return base64.b64encode(hashlib.sha256(aad).digest()).decode()


def _failure(what: str, exc: Exception) -> KeyRingError:
    """A clear error that names the kind of failure, never a token or key material."""
    if isinstance(exc, hvac.exceptions.Forbidden):
        reason = "permission denied (check the token and its policy)"
    elif isinstance(exc, hvac.exceptions.InvalidPath):
        reason = "no such Transit key or mount"
    elif isinstance(exc, hvac.exceptions.InvalidRequest):
        reason = "the KMS refused the request (altered data, or another context)"
    elif isinstance(exc, requests.exceptions.RequestException):
        reason = "the KMS is unreachable"
    else:
        reason = f"unexpected {type(exc).__name__}"
    return KeyRingError(f"Could not {what} the Transit KMS: {reason}.")
