"""The master key of a Bastion home, and the purpose-bound keys derived from it.

The master key is 32 random bytes in a file readable by its owner only::

    bastion-master-key-v1
    <base64 of the 32 bytes>

It is never used directly: each use derives its own key with HKDF-SHA256 and a purpose
label (for example ``"api-key-hmac-v1"``), so one use can never be confused with another.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.errors import ConfigurationError

MASTER_KEY_BYTES = 32
FORMAT_HEADER = "bastion-master-key-v1"
# Domain separation: keys derived here can never equal keys derived by other software.
_HKDF_SALT = b"bastion/master-key/v1"
_MAX_FILE_BYTES = 1024


def load_or_create_master_key(path: Path) -> tuple[bytes, bool]:
    """Read the master key at `path`, creating it first if there is none.

    Returns the key and whether this call created it. Raises ConfigurationError if the file
    is readable by group or others, is not a regular file, or is malformed.
    """
    try:
        return _read_master_key(path), False
    except FileNotFoundError:
        pass
    try:
        _create_master_key(path)
    except FileExistsError:
        # Another process created it between our read and our create: use theirs.
        return _read_master_key(path), False
    return _read_master_key(path), True


def derive_key(master: bytes, purpose: str, length: int = 32) -> bytes:
    """Derive the key for one purpose (e.g. ``"api-key-hmac-v1"``) with HKDF-SHA256."""
    if len(master) != MASTER_KEY_BYTES:
        raise ConfigurationError("The master key has the wrong length.")
    if not purpose or not purpose.isascii():
        raise ValueError("the purpose must be a non-empty ASCII label")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=length,
        salt=_HKDF_SALT,
        info=purpose.encode("ascii"),
    )
    return hkdf.derive(master)


def _read_master_key(path: Path) -> bytes:
    # O_NOFOLLOW: a symlink planted in the home directory must not redirect us.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigurationError(f"Cannot open the master key file {path}.") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"The master key file {path} is not a regular file.")
        if info.st_mode & 0o077:
            raise ConfigurationError(
                f"The master key file {path} is readable by other users; "
                "run `chmod 600` on it (and consider the key exposed)."
            )
        raw = os.read(fd, _MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    return _parse(raw, path)


def _parse(raw: bytes, path: Path) -> bytes:
    malformed = ConfigurationError(f"The master key file {path} is malformed.")
    if len(raw) > _MAX_FILE_BYTES:
        raise malformed
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise malformed from None
    lines = text.splitlines()
    if len(lines) != 2 or lines[0] != FORMAT_HEADER:
        raise malformed
    try:
        key = base64.b64decode(lines[1].strip(), validate=True)
    except (binascii.Error, ValueError):
        raise malformed from None
    if len(key) != MASTER_KEY_BYTES:
        raise malformed
    return key


def _create_master_key(path: Path) -> None:
    """Write a new key so that `path` appears complete or not at all, never half-written.

    The key goes to a temporary file (O_CREAT|O_EXCL, mode 0600) that is then hard-linked
    to `path`; linking fails if `path` exists, so a concurrent creator cannot be overwritten.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(MASTER_KEY_BYTES)
    content = f"{FORMAT_HEADER}\n{base64.b64encode(key).decode('ascii')}\n".encode("ascii")
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(temp, flags, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"Cannot create the master key file {path}.") from exc
    try:
        try:
            # The umask may only remove bits; make the mode exact anyway.
            os.fchmod(fd, 0o600)
            if os.write(fd, content) != len(content):
                raise OSError("short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        raise ConfigurationError(f"Cannot create the master key file {path}.") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Make the new directory entry durable; not every platform allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
