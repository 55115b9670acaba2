"""The master key file and HKDF key derivation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest

from bastion.crypto.master_key import derive_key, load_or_create_master_key
from bastion.errors import ConfigurationError

pytestmark = pytest.mark.unit


def test_creates_a_private_versioned_key_file_once(tmp_path: Path) -> None:
    path = tmp_path / "home" / "master.key"
    key, created = load_or_create_master_key(path)
    assert created is True
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header, body = path.read_text().splitlines()
    assert header == "bastion-master-key-v1"
    assert base64.b64decode(body) == key
    again, created_again = load_or_create_master_key(path)
    assert (again, created_again) == (key, False)
    # No temporary files are left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["master.key"]


def test_two_homes_get_different_keys(tmp_path: Path) -> None:
    first, _ = load_or_create_master_key(tmp_path / "a" / "master.key")
    second, _ = load_or_create_master_key(tmp_path / "b" / "master.key")
    assert first != second


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_refuses_a_key_file_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    load_or_create_master_key(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigurationError, match="readable by other users"):
        load_or_create_master_key(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"bastion-master-key-v1\n",
        b"bastion-master-key-v2\n" + base64.b64encode(b"x" * 32) + b"\n",
        b"bastion-master-key-v1\n" + base64.b64encode(b"x" * 31) + b"\n",
        b"bastion-master-key-v1\n" + b"!!!notbase64!!!\n",
        b"bastion-master-key-v1\n" + base64.b64encode(b"x" * 32) + b"\nextra\n",
        b"\xff\xfe",
        b"a" * 5000,
    ],
)
def test_refuses_a_malformed_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "master.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(ConfigurationError, match="malformed"):
        load_or_create_master_key(path)
    # The bad file is left for the operator to inspect, never silently replaced.
    assert path.read_bytes() == content


def test_refuses_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    load_or_create_master_key(real)
    link = tmp_path / "master.key"
    link.symlink_to(real)
    with pytest.raises(ConfigurationError):
        load_or_create_master_key(link)


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    # RFC 5869 written out with hmac, independent of the implementation under test.
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def test_derive_key_is_hkdf_sha256_bound_to_the_purpose() -> None:
    master = bytes(range(32))
    derived = derive_key(master, "api-key-hmac-v1")
    expected = _hkdf_sha256(master, b"bastion/master-key/v1", b"api-key-hmac-v1", 32)
    assert derived == expected
    assert derive_key(master, "api-key-hmac-v1") == derived
    assert derive_key(master, "other-purpose-v1") != derived
    assert derive_key(bytes(32), "api-key-hmac-v1") != derived


def test_derive_key_refuses_bad_inputs() -> None:
    with pytest.raises(ConfigurationError):
        derive_key(b"short", "api-key-hmac-v1")
    with pytest.raises(ValueError):
        derive_key(bytes(32), "")
