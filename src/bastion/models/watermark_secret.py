"""The master secret that every model's watermark key is derived from.

One 32-byte secret per home, created on first use, stored only sealed by the key ring
(``<home>/watermark.sealed``, mode 0600: the KEK, local or Transit, must open it). A
model's key is derived from it and the model's name (HKDF,
:func:`bastion.protection.textmark.derive_key`), handed to the model's worker in its
LoadModel message, and used by ``bastion protect detect`` to test a text.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from bastion.crypto.keyring import KeyRing
from bastion.protection.textmark import derive_key

SEALED_FILE = "watermark.sealed"
CONTEXT = "bastion-watermark-master-v1"


class WatermarkSecret:
    """Loads (or creates) the sealed master secret of a home and derives model keys."""

    def __init__(self, home: Path, keyring: KeyRing) -> None:
        self._path = home / SEALED_FILE
        self._keyring = keyring
        self._secret: bytes | None = None

    def master(self) -> bytes:
        if self._secret is None:
            self._secret = self._load_or_create()
        return self._secret

    def model_key(self, model: str) -> bytes:
        """The watermark key of `model` (the same on every gateway of this home)."""
        return derive_key(self.master(), model)

    def _load_or_create(self) -> bytes:
        try:
            return self._keyring.open(self._path.read_bytes(), CONTEXT)
        except FileNotFoundError:
            pass
        secret = secrets.token_bytes(32)
        staging = self._path.with_name(f".{SEALED_FILE}.{os.getpid()}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self._keyring.seal(secret, CONTEXT))
        try:
            # Another process may have created it meanwhile: the first one wins.
            os.link(staging, self._path)
        except FileExistsError:
            return self._keyring.open(self._path.read_bytes(), CONTEXT)
        finally:
            with contextlib.suppress(OSError):
                staging.unlink()
        return secret
