"""Bundles: import a clean model, then every attack on the stored bundle is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from safetensors.numpy import save_file

from bastion.crypto.keyring import KeyRing, LocalKek
from bastion.models.bundle.reader import (
    Bundle,
    IntegrityError,
    PublisherSignatureError,
    expect_identity,
    open_bundle,
    open_bundle_with_key,
    read_bundle,
    unseal_data_key,
)
from bastion.models.bundle.writer import create_bundle, export_bundle, load_or_create_signing_key
from bastion.models.scan import UnsafeModel
from bastion.models.signing import SigningKey, sign_digests, verify_signature


def _model(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file(
        {"w": rng.standard_normal((300, 1000)).astype(np.float32)}, directory / "model.safetensors"
    )
    (directory / "config.json").write_text(json.dumps({"hidden_size": 1000}))
    return directory


def _create(
    source: Path, destination: Path, ring: KeyRing, key: SigningKey, version: str = "1", **more: Any
) -> Bundle:
    """A bundle of the model "m" made from `source` (publisher arguments in `more`)."""
    return create_bundle(
        source, destination, name="m", version=version, keyring=ring, signing_key=key, **more
    )


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing(LocalKek(os.urandom(32)))


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def stored(tmp_path: Path, ring: KeyRing, key: SigningKey) -> Path:
    _create(
        _model(tmp_path / "src"),
        tmp_path / "b",
        ring,
        key,
    )
    return tmp_path / "b"


def test_a_bundle_opens_to_the_original_files(
    tmp_path: Path, stored: Path, ring: KeyRing, key: SigningKey
) -> None:
    bundle = read_bundle(stored)
    manifest, files = open_bundle(bundle, ring, [key.public_pem()])
    assert set(files) == {"model.safetensors", "config.json"}
    assert bytes(files["model.safetensors"]) == (tmp_path / "src/model.safetensors").read_bytes()
    assert manifest.model_name == "m"
    # At rest, no plaintext: the weights' bytes appear in no stored file.
    weights = (tmp_path / "src/model.safetensors").read_bytes()[-4096:]
    for path in stored.rglob("*"):
        if path.is_file():
            assert weights not in path.read_bytes()
            assert path.stat().st_mode & 0o077 == 0


def test_export_is_accepted_by_the_official_verifier(
    tmp_path: Path, stored: Path, ring: KeyRing, key: SigningKey
) -> None:
    out = tmp_path / "export"
    export_bundle(read_bundle(stored), ring, [key.public_pem()], out)
    public = tmp_path / "pub.pem"
    public.write_bytes(key.public_pem())
    cli = Path(sys.executable).parent / "model_signing"
    verified = subprocess.run(
        [
            str(cli),
            "verify",
            "key",
            str(out),
            "--signature",
            str(out / "model.sig"),
            "--public_key",
            str(public),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _blob(stored: Path, path: str) -> Path:
    manifest = json.loads((stored / "bundle.json").read_text())
    return stored / next(f["blob"] for f in manifest["files"] if f["path"] == path)


def _refused(stored: Path, ring: KeyRing, keys: list[bytes], match: str) -> None:
    with pytest.raises(IntegrityError, match=match):
        open_bundle(read_bundle(stored), ring, keys)


def test_one_flipped_byte_is_refused(stored: Path, ring: KeyRing, key: SigningKey) -> None:
    blob = _blob(stored, "model.safetensors")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(data)
    _refused(stored, ring, [key.public_pem()], "does not decrypt")


def test_a_truncated_file_is_refused(stored: Path, ring: KeyRing, key: SigningKey) -> None:
    blob = _blob(stored, "model.safetensors")
    blob.write_bytes(blob.read_bytes()[: 1 << 20])
    _refused(stored, ring, [key.public_pem()], "does not decrypt")


def test_a_file_swapped_from_another_bundle_is_refused(
    tmp_path: Path, stored: Path, ring: KeyRing, key: SigningKey
) -> None:
    _create(
        _model(tmp_path / "src2", seed=1),
        tmp_path / "b2",
        ring,
        key,
        "2",
    )
    shutil.copy(_blob(tmp_path / "b2", "model.safetensors"), _blob(stored, "model.safetensors"))
    _refused(stored, ring, [key.public_pem()], "does not decrypt")


def test_files_swapped_within_the_bundle_are_refused(
    stored: Path, ring: KeyRing, key: SigningKey
) -> None:
    manifest = json.loads((stored / "bundle.json").read_text())
    first, second = manifest["files"]
    first["blob"], second["blob"] = second["blob"], first["blob"]
    first["size"], second["size"] = second["size"], first["size"]
    (stored / "bundle.json").write_text(json.dumps(manifest))
    _refused(stored, ring, [key.public_pem()], "does not decrypt")


def test_a_manifest_edited_after_signing_is_refused(
    stored: Path, ring: KeyRing, key: SigningKey
) -> None:
    manifest = json.loads((stored / "bundle.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "config.json"]
    (stored / "bundle.json").write_text(json.dumps(manifest))
    _refused(stored, ring, [key.public_pem()], "config.json")
    signature = json.loads((stored / "model.sig").read_text())
    signature["dsseEnvelope"]["payload"] = signature["dsseEnvelope"]["payload"][:-8] + "AAAAAAA="
    (stored / "model.sig").write_text(json.dumps(signature))
    _refused(stored, ring, [key.public_pem()], "signature")


def test_the_load_signature_is_bound_to_the_bundle_signature(
    tmp_path: Path, stored: Path, ring: KeyRing, key: SigningKey
) -> None:
    """load.sig (BLAKE3, checked at load) vouches for model.sig: neither can be swapped
    for another version's, even one signed by the same key."""
    trusted = [key.public_pem()]
    load = verify_signature((stored / "load.sig").read_bytes(), trusted)
    assert load.algorithm == "blake3"
    assert set(load.files) == {"model.safetensors", "config.json", ".model.sig", ".bundle"}
    _create(
        _model(tmp_path / "src2", seed=1),
        tmp_path / "b2",
        ring,
        key,
        "2",
    )
    original = {name: (stored / name).read_bytes() for name in ("model.sig", "load.sig")}
    for name in ("model.sig", "load.sig"):
        shutil.copy(tmp_path / "b2" / name, stored / name)
        _refused(stored, ring, trusted, "load signature does not match")
        (stored / name).write_bytes(original[name])
    # Both from version 2: the signatures agree with each other, not with this bundle.
    shutil.copy(tmp_path / "b2/model.sig", stored / "model.sig")
    shutil.copy(tmp_path / "b2/load.sig", stored / "load.sig")
    _refused(stored, ring, trusted, "for another model or version")
    # A load signature by another key, or a link in its place, is refused too.
    (stored / "load.sig").write_bytes(
        sign_digests(dict(load.files), SigningKey.generate(), model_name="m", algorithm="blake3")
    )
    (stored / "model.sig").write_bytes(original["model.sig"])
    _refused(stored, ring, trusted, "load signature is not valid")
    (stored / "load.sig").unlink()
    (stored / "load.sig").symlink_to(tmp_path / "b2/load.sig")
    _refused(stored, ring, trusted, "load signature is missing")


def test_a_whole_bundle_swapped_for_another_version_is_refused(
    tmp_path: Path, stored: Path, ring: KeyRing, key: SigningKey
) -> None:
    """Consistent in itself, so only the registry's name and version give it away."""
    expect_identity(read_bundle(stored), "m", "1")
    with pytest.raises(IntegrityError, match="is not m version 2"):
        expect_identity(read_bundle(stored), "m", "2")
    with pytest.raises(IntegrityError, match="is not other version 1"):
        expect_identity(read_bundle(stored), "other", "1")
    # bundle.json relabelled: the data key no longer opens (bound to name and version).
    manifest = json.loads((stored / "bundle.json").read_text())
    manifest["version"] = "2"
    (stored / "bundle.json").write_text(json.dumps(manifest))
    _refused(stored, ring, [key.public_pem()], "data key")


def test_without_a_load_signature_sha256_is_checked(
    stored: Path, ring: KeyRing, key: SigningKey
) -> None:
    (stored / "load.sig").unlink()
    manifest, files = open_bundle(read_bundle(stored), ring, [key.public_pem()])
    assert set(files) == set(manifest.files)
    blob = _blob(stored, "config.json")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(data)
    _refused(stored, ring, [key.public_pem()], "does not decrypt")


def test_a_full_verify_also_checks_the_sha256_signature(
    stored: Path, ring: KeyRing, key: SigningKey
) -> None:
    """A signer that vouched for wrong SHA-256 digests (and bound load.sig to them) is
    caught by a full check, such as `bastion models verify` and export, not by a load."""
    trusted = [key.public_pem()]
    sha = verify_signature((stored / "model.sig").read_bytes(), trusted)
    load = verify_signature((stored / "load.sig").read_bytes(), trusted)
    lying = sign_digests(
        {**sha.files, "config.json": b"\x00" * 32}, key, model_name="m", signature_name=None
    )
    rebound = dict(load.files) | {".model.sig": blake3.blake3(lying).digest()}
    (stored / "model.sig").write_bytes(lying)
    (stored / "load.sig").write_bytes(
        sign_digests(rebound, key, model_name="m", signature_name=None, algorithm="blake3")
    )
    bundle = read_bundle(stored)
    assert set(open_bundle(bundle, ring, trusted)[1]) == {"model.safetensors", "config.json"}
    with pytest.raises(IntegrityError, match="does not match its signed SHA-256 digest"):
        open_bundle(bundle, ring, trusted, full=True)


def test_a_signature_from_an_untrusted_key_is_refused(stored: Path, ring: KeyRing) -> None:
    _refused(stored, ring, [SigningKey.generate().public_pem()], "signature")


def test_the_wrong_kek_is_refused(stored: Path, key: SigningKey) -> None:
    _refused(stored, KeyRing(LocalKek(os.urandom(32))), [key.public_pem()], "data key")


def test_unsafe_sources_leave_nothing_behind(
    tmp_path: Path, ring: KeyRing, key: SigningKey
) -> None:
    source = _model(tmp_path / "bad")
    (source / "pytorch_model.bin").write_bytes(b"\x80\x04\x95")
    with pytest.raises(UnsafeModel, match="pickle"):
        create_bundle(
            source, tmp_path / "out", name="x", version="1", keyring=ring, signing_key=key
        )
    # Nothing at all beside the source: no bundle, no half-written one.
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_the_signing_key_is_kept_sealed(tmp_path: Path, ring: KeyRing) -> None:
    path = tmp_path / "signing.key"
    key = load_or_create_signing_key(path, ring)
    assert load_or_create_signing_key(path, ring).key_id == key.key_id
    assert b"PRIVATE KEY" not in path.read_bytes()
    assert path.stat().st_mode & 0o077 == 0


def _publisher_signature(source: Path, publisher: SigningKey) -> bytes:
    """What a publisher ships: an OMS signature of its model directory."""
    import hashlib

    digests = {
        p.relative_to(source).as_posix(): hashlib.sha256(p.read_bytes()).digest()
        for p in source.rglob("*")
        if p.is_file()
    }
    return sign_digests(digests, publisher, model_name="acme", signature_name=None)


def test_a_publisher_signature_is_checked_and_kept(
    tmp_path: Path, ring: KeyRing, key: SigningKey
) -> None:
    source = _model(tmp_path / "src")
    publisher = SigningKey.generate()
    signature = _publisher_signature(source, publisher)
    bundle = _create(
        source,
        tmp_path / "b",
        ring,
        key,
        publisher_signature=signature,
        publisher_keys=[publisher.public_pem()],
    )
    assert (tmp_path / "b/publisher.sig").read_bytes() == signature
    data_key = unseal_data_key(bundle, ring)
    _, files = open_bundle_with_key(
        bundle, data_key, [key.public_pem()], publisher_keys=[publisher.public_pem()]
    )
    assert set(files) == {"model.safetensors", "config.json"}
    # A policy naming another publisher refuses it.
    with pytest.raises(IntegrityError, match="publisher"):
        open_bundle_with_key(
            bundle,
            data_key,
            [key.public_pem()],
            publisher_keys=[SigningKey.generate().public_pem()],
        )


def test_a_publisher_signature_that_does_not_fit_is_refused_at_import(
    tmp_path: Path, ring: KeyRing, key: SigningKey
) -> None:
    source = _model(tmp_path / "src")
    publisher = SigningKey.generate()
    signature = _publisher_signature(source, publisher)
    with pytest.raises(PublisherSignatureError):
        _create(
            source,
            tmp_path / "b1",
            ring,
            key,
            publisher_signature=signature,
            publisher_keys=[SigningKey.generate().public_pem()],
        )
    (source / "config.json").write_text(json.dumps({"hidden_size": 1001}))  # changed after signing
    with pytest.raises(PublisherSignatureError):
        _create(
            source,
            tmp_path / "b2",
            ring,
            key,
            publisher_signature=signature,
            publisher_keys=[publisher.public_pem()],
        )
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_the_trust_policy_refuses_a_bundle_without_a_publisher(
    stored: Path, ring: KeyRing, key: SigningKey
) -> None:
    bundle = read_bundle(stored)
    with pytest.raises(IntegrityError, match="requires a publisher"):
        open_bundle_with_key(
            bundle,
            unseal_data_key(bundle, ring),
            [key.public_pem()],
            publisher_keys=[SigningKey.generate().public_pem()],
        )
