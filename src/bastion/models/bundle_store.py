"""Where a home keeps its model bundles, and the operations on them by name.

``$BASTION_HOME/bundles/<name>/<version>/`` holds each bundle; ``$BASTION_HOME/signing.key``
holds Bastion's model signing key, sealed by the key ring.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bastion.crypto.keyring import KeyRing
from bastion.errors import Conflict, InvalidRequest, NotFound
from bastion.models.bundle.reader import (
    BUNDLE_OPTION,
    Bundle,
    IntegrityError,
    Progress,
    open_bundle,
    read_bundle,
)
from bastion.models.bundle.writer import create_bundle, export_bundle, load_or_create_signing_key
from bastion.models.registry import MODEL_NAME_PATTERN, validate_model_name
from bastion.models.signing import Manifest, SigningKey

if TYPE_CHECKING:
    # Type only: the scanner (and ONNX) load where models are imported, not in servers.
    from bastion.models.scan import ScanLimits

_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,31}")


@dataclass(frozen=True, slots=True)
class Verified:
    bundle: Bundle
    manifest: Manifest


class BundleStore:
    """The bundles of one home."""

    def __init__(self, home: Path, keyring: KeyRing) -> None:
        self._home = home
        self._root = home / "bundles"
        self._key_path = home / "signing.key"
        self._keyring = keyring

    @property
    def keyring(self) -> KeyRing:
        return self._keyring

    def relative_path(self, bundle: Bundle) -> str:
        """Where the registry records a bundle: relative to the home."""
        return str(bundle.directory.relative_to(self._home))

    def signing_key(self) -> SigningKey:
        return load_or_create_signing_key(self._key_path, self._keyring)

    def trusted_keys(self) -> list[bytes]:
        return [self.signing_key().public_pem()]

    def versions(self, name: str) -> list[str]:
        validate_model_name(name)
        directory = self._root / name
        if not directory.is_dir():
            return []
        found = [p.name for p in directory.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)]
        return sorted(found, key=_version_key)

    def names(self) -> list[str]:
        """The models with at least one stored bundle."""
        if not self._root.is_dir():
            return []
        return sorted(
            p.name
            for p in self._root.iterdir()
            if p.is_dir() and MODEL_NAME_PATTERN.fullmatch(p.name) and self.versions(p.name)
        )

    def remove(self, name: str, version: str | None = None) -> list[str]:
        """Delete one stored version of `name`, or all of them; returns those deleted."""
        versions = self.versions(name)
        doomed = versions if version is None else [v for v in versions if v == version]
        if not doomed:
            raise NotFound(
                f"No bundle of the model '{name}'" + (f" version {version}." if version else ".")
            )
        try:
            for each in doomed:
                shutil.rmtree(self._root / name / each)
        except OSError as exc:
            raise Conflict(
                f"A bundle of the model '{name}' could not be deleted ({exc.strerror})."
            ) from None
        if version is None or doomed == versions:
            shutil.rmtree(self._root / name, ignore_errors=True)
        return doomed

    def import_model(
        self,
        source: Path,
        name: str,
        version: str | None = None,
        *,
        limits: ScanLimits | None = None,
        progress: Progress | None = None,
        publisher_signature: bytes | None = None,
        publisher_keys: Sequence[bytes] = (),
    ) -> Bundle:
        """Scan, encrypt and sign `source` as a new version of `name`; with a publisher's
        signature, check it covers exactly these files and keep it in the bundle."""
        validate_model_name(name)
        if version is None:
            existing = [int(v) for v in self.versions(name) if v.isdigit()]
            version = str(max(existing, default=0) + 1)
        elif _VERSION.fullmatch(version) is None:
            raise InvalidRequest("A version is 1-32 letters, digits, '.', '_' or '-'.")
        destination = self._root / name / version
        if destination.exists():
            raise Conflict(f"The model '{name}' already has a version {version}.")
        destination.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        self._root.chmod(0o700)
        try:
            return create_bundle(
                source,
                destination,
                name=name,
                version=version,
                keyring=self._keyring,
                signing_key=self.signing_key(),
                limits=limits,
                progress=progress,
                publisher_signature=publisher_signature,
                publisher_keys=publisher_keys,
            )
        except BaseException:
            # A refused import leaves nothing behind, not even the model's empty directory.
            with contextlib.suppress(OSError):
                destination.parent.rmdir()
            raise

    def get(self, name: str, version: str | None = None) -> Bundle:
        versions = self.versions(name)
        if version is None and versions:
            version = versions[-1]
        if version is None or version not in versions:
            raise NotFound(
                f"No bundle of the model '{name}'" + (f" version {version}." if version else ".")
            )
        return read_bundle(self._root / name / version)

    def verify(self, bundle: Bundle, *, progress: Progress | None = None) -> Verified:
        """Decrypt and check every file in memory against both signatures (SHA-256 and
        BLAKE3); raises IntegrityError."""
        manifest, _ = open_bundle(
            bundle, self._keyring, self.trusted_keys(), progress=progress, full=True
        )
        return Verified(bundle, manifest)

    def export(self, bundle: Bundle, out: Path, *, progress: Progress | None = None) -> Manifest:
        if out.exists():
            raise Conflict(f"{out} already exists.")
        manifest = export_bundle(bundle, self._keyring, self.trusted_keys(), out, progress=progress)
        (out.parent / f"{out.name}.public.pem").write_bytes(self.signing_key().public_pem())
        return manifest


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


__all__ = ["BUNDLE_OPTION", "BundleStore", "IntegrityError", "Verified"]
