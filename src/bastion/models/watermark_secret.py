"""The secrets of the ownership watermarks: the master secret every model's watermark
key is derived from, and the key that opens the records of watermarked answers.

One 32-byte secret per home, created on first use, stored only sealed by the key ring
(``<home>/watermark.sealed``, mode 0600: the KEK, local or Transit, must open it). A
model's key is derived from it and the model's name (HKDF,
:func:`bastion.protection.textmark.derive_key`), handed to the model's worker in its
LoadModel message, and used by ``bastion protect detect`` to test a text. The marks key
(``<home>/watermark-marks.sealed``) is an X25519 key pair: workers seal their records of
watermarked classifier answers to its public half; only ``bastion protect verify`` opens
them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bastion.crypto.keyring import KeyRing
from bastion.protection.textmark import derive_key
from bastion.protection.watermark import generate_marks_keypair

SEALED_FILE = "watermark.sealed"
CONTEXT = "bastion-watermark-master-v1"
MARKS_FILE = "watermark-marks.sealed"
MARKS_CONTEXT = "bastion-watermark-marks-v1"


class WatermarkSecret:
    """Loads (or creates) the sealed master secret of a home and derives model keys."""

    def __init__(self, home: Path, keyring: KeyRing) -> None:
        self._home = home
        self._keyring = keyring
        self._secret: bytes | None = None
        self._marks: bytes | None = None

    def master(self) -> bytes:
        if self._secret is None:
            self._secret = self._load_or_create(SEALED_FILE, CONTEXT, os.urandom)
        return self._secret

    def marks_private_key(self) -> bytes:
        """The X25519 private key that opens the sealed records of watermarked answers."""
        if self._marks is None:
            self._marks = self._load_or_create(
                MARKS_FILE, MARKS_CONTEXT, lambda _: generate_marks_keypair()[0]
            )
        return self._marks

    def marks_public_key(self) -> bytes:
        """What workers seal their records to."""
        private = X25519PrivateKey.from_private_bytes(self.marks_private_key())
        return private.public_key().public_bytes_raw()

    def model_key(self, model: str) -> bytes:
        """The watermark key of `model` (the same on every gateway of this home)."""
        return derive_key(self.master(), model)

    def _load_or_create(self, name: str, context: str, make: Callable[[int], bytes]) -> bytes:
        path = self._home / name
        try:
            return self._keyring.open(path.read_bytes(), context)
        except FileNotFoundError:
            pass
        secret = make(32)
        staging = path.with_name(f".{name}.{os.getpid()}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self._keyring.seal(secret, context))
        try:
            # Another process may have created it meanwhile: the first one wins.
            os.link(staging, path)
        except FileExistsError:
            return self._keyring.open(path.read_bytes(), context)
        finally:
            with contextlib.suppress(OSError):
                staging.unlink()
        return secret
