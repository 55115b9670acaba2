"""Writing bundles: import (scan, encrypt, sign) and export (the one operation that
writes plaintext, on the operator's explicit request)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from bastion.crypto.keyring import KeyRing, KeyRingError
from bastion.crypto.streaming_aead import encrypt_file
from bastion.errors import ConfigurationError
from bastion.models.signing import Manifest, SignatureError, SigningKey, sign_digests

if TYPE_CHECKING:
    from bastion.models.scan import ScanLimits
from bastion.models.bundle.reader import (
    BUNDLE_FORMAT,
    IDENTITY_ENTRY,
    LOAD_SIGNATURE_NAME,
    MANIFEST_NAME,
    PUBLISHER_SIGNATURE_NAME,
    SIGNATURE_ENTRY,
    SIGNATURE_NAME,
    Bundle,
    BundleFile,
    Digests,
    Plaintext,
    Progress,
    check_publisher,
    envelope_context,
    file_aad,
    identity_digest,
    open_bundle,
    read_bundle,
)

_SIGNING_KEY_CONTEXT = "model-signing-key/1"


def load_or_create_signing_key(path: Path, keyring: KeyRing) -> SigningKey:
    """Bastion's model signing key (ECDSA P-256), kept sealed by the key ring in `path`."""
    try:
        sealed = path.read_bytes()
    except FileNotFoundError:
        key = SigningKey.generate()
        envelope = keyring.seal(key.to_pem(), _SIGNING_KEY_CONTEXT)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(envelope)
        return key
    try:
        return SigningKey.from_pem(keyring.open(sealed, _SIGNING_KEY_CONTEXT))
    except (KeyRingError, SignatureError) as exc:
        raise ConfigurationError(f"The model signing key in {path} cannot be opened.") from exc


def create_bundle(
    source: Path,
    destination: Path,
    *,
    name: str,
    version: str,
    keyring: KeyRing,
    signing_key: SigningKey,
    limits: ScanLimits | None = None,
    progress: Progress | None = None,
    publisher_signature: bytes | None = None,
    publisher_keys: Sequence[bytes] = (),
) -> Bundle:
    """Scan `source`, then encrypt and sign it into the new directory `destination`.

    Raises UnsafeModel (nothing is written) if the source is refused. The bundle appears
    at `destination` only once complete.
    """
    # Imported here: workers open bundles, and need none of the scanner (nor ONNX).
    from bastion.models.scan import open_scanned, scan_model

    report = scan_model(source, limits)
    if destination.exists():
        raise FileExistsError(destination)
    # A hidden name, which no version can have: never taken for a version while written.
    partial = destination.with_name(f".partial-{destination.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700)
    (partial / "blobs").mkdir(mode=0o700)
    try:
        data_key = os.urandom(32)
        digests: dict[str, bytes] = {}
        files: list[BundleFile] = []
        fast_digests: dict[str, bytes] = {}
        for index, scanned in enumerate(report.files):
            blob = f"blobs/{index:05d}.enc"
            digest = Digests(sha256=True, blake3=True)
            with open_scanned(report, scanned) as plain, _create(partial / blob) as sealed:
                encrypt_file(
                    data_key,
                    file_aad(name, version, scanned.path),
                    plain,
                    sealed,
                    digest=digest,
                    progress=progress,
                )
                sealed.flush()
                os.fsync(sealed.fileno())
            digests[scanned.path] = digest.sha256_digest()
            fast_digests[scanned.path] = digest.blake3_digest()
            files.append(BundleFile(scanned.path, scanned.size, blob))
        if publisher_signature is not None:
            check_publisher(
                publisher_signature,
                publisher_keys,
                {"sha256": digests, "blake3": dict(fast_digests)},
            )
            _write(partial / PUBLISHER_SIGNATURE_NAME, publisher_signature)
        signature = sign_digests(digests, signing_key, model_name=name, signature_name=None)
        fast_digests[SIGNATURE_ENTRY] = blake3.blake3(signature).digest()
        fast_digests[IDENTITY_ENTRY] = identity_digest(name, version)
        load_signature = sign_digests(
            fast_digests, signing_key, model_name=name, signature_name=None, algorithm="blake3"
        )
        envelope = keyring.seal(data_key, envelope_context(name, version))
        manifest = {
            "format": BUNDLE_FORMAT,
            "name": name,
            "version": version,
            "files": [{"path": f.path, "size": f.size, "blob": f.blob} for f in files],
            "data_key": base64.b64encode(envelope).decode(),
            "signer": signing_key.key_id,
        }
        _write(partial / SIGNATURE_NAME, signature)
        _write(partial / LOAD_SIGNATURE_NAME, load_signature)
        _write(partial / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        os.replace(partial, destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return read_bundle(destination)


def export_bundle(
    bundle: Bundle,
    keyring: KeyRing,
    trusted_keys: Sequence[bytes],
    out: Path,
    *,
    progress: Progress | None = None,
) -> Manifest:
    """Write the verified plaintext files and the signature to the new directory `out`, so
    that `model_signing verify key OUT --signature OUT/model.sig --public_key ...` accepts it."""
    manifest, files = open_bundle(bundle, keyring, trusted_keys, full=True, progress=progress)
    out.mkdir(parents=True, mode=0o700, exist_ok=False)
    for path, data in files.items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(target, data)
    _write(out / SIGNATURE_NAME, (bundle.directory / SIGNATURE_NAME).read_bytes())
    return manifest


def _create(path: Path) -> Any:
    """A new file readable by its owner only."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _write(path: Path, data: bytes | Plaintext) -> None:
    with _create(path) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
