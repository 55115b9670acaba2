"""Reading a bundle: what the worker needs to verify and decrypt one, and the gateway
to unseal its data key. Nothing here writes a file."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import mmap
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import blake3

from bastion.crypto.keyring import KeyRing, KeyRingError
from bastion.crypto.streaming_aead import StreamingAeadError, ciphertext_size, decrypt_into
from bastion.errors import InvalidRequest
from bastion.models.signing import (
    Manifest,
    ManifestMismatch,
    SignatureError,
    check_file,
    check_files,
    verify_signature,
)

BUNDLE_FORMAT = "bastion-model-bundle/1"


# The registry option that marks a model served from a bundle (its value: the version).
BUNDLE_OPTION = "bundle"


MANIFEST_NAME = "bundle.json"


SIGNATURE_NAME = "model.sig"


LOAD_SIGNATURE_NAME = "load.sig"


# load.sig's entries for model.sig and for the bundle's name and version: hidden names,
# which the scanner never lets a model file have.
SIGNATURE_ENTRY = ".model.sig"


IDENTITY_ENTRY = ".bundle"


_PSEUDO_ENTRIES = frozenset({SIGNATURE_ENTRY, IDENTITY_ENTRY})


# The model's publisher's own signature, when one was given at import.
PUBLISHER_SIGNATURE_NAME = "publisher.sig"


_MAX_MANIFEST_BYTES = 16 * 1024 * 1024


# Decrypted files: a bytearray, or anonymous memory for big ones (see _buffer).
Plaintext = bytearray | mmap.mmap


_MAPPED_MIN_BYTES = 1 << 20


# Called with the number of plaintext bytes just processed.
Progress = Callable[[int], None]


class IntegrityError(Exception):
    """A stored bundle failed a check; the message says which, never any content."""


class PublisherSignatureError(InvalidRequest):
    """The publisher's signature given at import does not verify or does not cover the files."""

    code = "publisher_signature_invalid"


@dataclass(frozen=True, slots=True)
class BundleFile:
    path: str
    size: int
    blob: str


@dataclass(frozen=True, slots=True)
class Bundle:
    """What `bundle.json` says (not yet verified)."""

    directory: Path
    name: str
    version: str
    files: tuple[BundleFile, ...]
    envelope: bytes
    signer: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def file_aad(name: str, version: str, path: str) -> bytes:
    """The associated data of one file's ciphertext: which bundle and which file it is."""
    return b"\x00".join((b"bastion-model-file/1", name.encode(), version.encode(), path.encode()))


def envelope_context(name: str, version: str) -> str:
    return f"model-bundle/{name}/{version}"


def read_bundle(directory: Path) -> Bundle:
    """Parse `bundle.json`; raises IntegrityError if it is missing or malformed."""
    try:
        raw = _read_regular(directory / MANIFEST_NAME, _MAX_MANIFEST_BYTES)
        data = json.loads(raw)
        files = tuple(
            BundleFile(str(f["path"]), int(f["size"]), str(f["blob"])) for f in data["files"]
        )
        bundle = Bundle(
            directory=directory,
            name=str(data["name"]),
            version=str(data["version"]),
            files=files,
            envelope=base64.b64decode(data["data_key"], validate=True),
            signer=str(data["signer"]),
        )
        if data["format"] != BUNDLE_FORMAT:
            raise IntegrityError("The bundle has an unknown format.")
    except IntegrityError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError("The bundle's manifest is missing or malformed.") from exc
    for f in bundle.files:
        if not _is_blob_name(f.blob) or f.size < 0:
            raise IntegrityError("The bundle's manifest names an invalid blob.")
    return bundle


def open_bundle(
    bundle: Bundle,
    keyring: KeyRing,
    trusted_keys: Sequence[bytes],
    *,
    progress: Progress | None = None,
    full: bool = False,
) -> tuple[Manifest, dict[str, Plaintext]]:
    """Verify the signatures, unseal the data key, and decrypt and check every file in
    memory; returns the signed (SHA-256) manifest and the plaintext files. With `full`,
    every file is checked against both signatures, not only the fast one. Raises
    IntegrityError."""
    data_key = unseal_data_key(bundle, keyring)
    return open_bundle_with_key(bundle, data_key, trusted_keys, progress=progress, full=full)


def unseal_data_key(bundle: Bundle, keyring: KeyRing) -> bytes:
    """The bundle's data key (for the worker that will load it); raises IntegrityError."""
    try:
        return keyring.open(bundle.envelope, envelope_context(bundle.name, bundle.version))
    except KeyRingError as exc:
        raise IntegrityError(f"The bundle's data key cannot be opened: {exc}") from exc


def open_bundle_with_key(
    bundle: Bundle,
    data_key: bytes,
    trusted_keys: Sequence[bytes],
    *,
    publisher_keys: Sequence[bytes] = (),
    progress: Progress | None = None,
    full: bool = False,
) -> tuple[Manifest, dict[str, Plaintext]]:
    """:func:`open_bundle` with the data key already unsealed (inside a worker).

    Each file is checked against load.sig (BLAKE3), which also vouches for model.sig; a
    bundle without load.sig is checked against model.sig (SHA-256); `full` checks both.
    With `publisher_keys` (a trust policy), the bundle must also carry a signature by one
    of those publishers over exactly these files."""
    signature, manifest = _verified(bundle, SIGNATURE_NAME, trusted_keys, "signature")
    fast = _load_manifest(bundle, signature, manifest, trusted_keys)
    checks = ([manifest] if fast is None or full else []) + ([fast] if fast is not None else [])
    files: dict[str, Plaintext] = {}
    computed: dict[str, Digests] = {}
    for f in bundle.files:
        digest = Digests(
            sha256=any(m.algorithm == "sha256" for m in checks),
            blake3=any(m.algorithm == "blake3" for m in checks),
        )
        try:
            with _ciphertext(bundle.directory / f.blob, ciphertext_size(f.size)) as sealed:
                plaintext = _buffer(f.size)
                decrypt_into(
                    data_key,
                    file_aad(bundle.name, bundle.version, f.path),
                    sealed,
                    memoryview(plaintext),
                    digest=digest,
                    progress=progress,
                )
            for checked in checks:
                check_file(checked, f.path, digest.of(checked.algorithm))
        except OSError as exc:
            raise IntegrityError(f"{f.path}: its encrypted file is missing.") from exc
        except StreamingAeadError as exc:
            raise IntegrityError(f"{f.path}: does not decrypt (altered, cut or moved).") from exc
        except SignatureError as exc:
            raise IntegrityError(f"{f.path}: {exc}") from exc
        files[f.path] = plaintext
        computed[f.path] = digest
    try:
        for checked in checks:
            expected = {path: digest.of(checked.algorithm) for path, digest in computed.items()}
            if checked is fast:
                for entry in _PSEUDO_ENTRIES:
                    expected[entry] = fast.files[entry]
            check_files(checked, expected)
    except SignatureError as exc:
        raise IntegrityError(str(exc)) from exc
    if publisher_keys:
        try:
            published = _read_regular(
                bundle.directory / PUBLISHER_SIGNATURE_NAME, _MAX_MANIFEST_BYTES
            )
        except OSError:
            raise IntegrityError(
                "The trust policy requires a publisher's signature; this bundle has none."
            ) from None
        try:
            # The signed digests: checked above, model.sig's vouched for by load.sig.
            known = {"sha256": manifest.files}
            if fast is not None:
                known["blake3"] = {p: d for p, d in fast.files.items() if p not in _PSEUDO_ENTRIES}
            check_publisher(published, publisher_keys, known)
        except PublisherSignatureError as exc:
            raise IntegrityError(exc.message) from None
    return manifest, files


def _load_manifest(
    bundle: Bundle, signature: bytes, manifest: Manifest, trusted_keys: Sequence[bytes]
) -> Manifest | None:
    """load.sig's verified manifest, bound to model.sig and to this bundle's name and
    version; None for a bundle made before load signatures (a link in its place is not)."""
    if not os.path.lexists(bundle.directory / LOAD_SIGNATURE_NAME):
        return None
    _, fast = _verified(bundle, LOAD_SIGNATURE_NAME, trusted_keys, "load signature")
    bound = fast.files.get(SIGNATURE_ENTRY)
    if (
        fast.algorithm != "blake3"
        or bound is None
        or not hmac.compare_digest(bound, blake3.blake3(signature).digest())
        or set(fast.files) - _PSEUDO_ENTRIES != set(manifest.files)
    ):
        raise IntegrityError("The load signature does not match the bundle's signature.")
    identity = fast.files.get(IDENTITY_ENTRY)
    if identity is None or not hmac.compare_digest(
        identity, identity_digest(bundle.name, bundle.version)
    ):
        raise IntegrityError("The load signature is for another model or version.")
    return fast


def expect_identity(bundle: Bundle, name: str, version: object) -> None:
    """Raise IntegrityError unless the bundle is `name` version `version`, as the registry
    says: a whole bundle directory swapped for another version's (a rollback) or another
    model's is consistent in itself, and only this comparison sees it."""
    if bundle.name != name or bundle.version != str(version):
        raise IntegrityError(
            f"The bundle is not {name} version {version}: it was replaced by another."
        )


def identity_digest(name: str, version: str) -> bytes:
    digest: bytes = blake3.blake3(
        b"\x00".join((b"bastion-bundle/1", name.encode(), version.encode()))
    ).digest()
    return digest


def _verified(
    bundle: Bundle, name: str, trusted_keys: Sequence[bytes], what: str
) -> tuple[bytes, Manifest]:
    try:
        signature = _read_regular(bundle.directory / name, _MAX_MANIFEST_BYTES)
        manifest = verify_signature(signature, trusted_keys)
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"The bundle's {what} is missing.") from exc
    except SignatureError as exc:
        raise IntegrityError(f"The bundle's {what} is not valid: {exc}") from exc
    if manifest.model_name != bundle.name:
        raise IntegrityError(f"The {what} is for another model.")
    return signature, manifest


class Digests:
    """SHA-256 and/or BLAKE3 of one file, fed segment by segment."""

    __slots__ = ("_blake3", "_sha256")

    def __init__(self, *, sha256: bool, blake3: bool) -> None:
        self._sha256 = hashlib.sha256() if sha256 else None
        self._blake3 = _blake3_hasher() if blake3 else None

    def update(self, data: bytes | memoryview) -> None:
        if self._sha256 is not None:
            self._sha256.update(data)
        if self._blake3 is not None:
            self._blake3.update(data)

    def sha256_digest(self) -> bytes:
        assert self._sha256 is not None
        return self._sha256.digest()

    def blake3_digest(self) -> bytes:
        assert self._blake3 is not None
        digest: bytes = self._blake3.digest()
        return digest

    def of(self, algorithm: str) -> bytes:
        return self.sha256_digest() if algorithm == "sha256" else self.blake3_digest()


def _blake3_hasher() -> blake3.blake3:
    # One thread: the figure that matters is per core, and a worker's cores are its own.
    return blake3.blake3(max_threads=1)


def check_publisher(
    signature: bytes,
    publisher_keys: Sequence[bytes],
    digests: Mapping[str, Mapping[str, bytes]],
) -> None:
    """The publisher's signature must come from one of `publisher_keys` and cover exactly
    the files with these digests (by algorithm: SHA-256, or BLAKE3 where known)."""
    try:
        manifest = verify_signature(signature, publisher_keys)
        if manifest.algorithm not in digests:
            raise ManifestMismatch(f"Its {manifest.algorithm} digests cannot be checked here.")
        check_files(manifest, digests[manifest.algorithm])
    except SignatureError as exc:
        raise PublisherSignatureError(
            f"The publisher's signature is not accepted: {exc}", param="signature"
        ) from None


def _buffer(size: int) -> Plaintext:
    """Memory for one decrypted file. Big files get anonymous memory mapped with its pages
    populated up front, which is much cheaper than a zero-filled bytearray faulting page by
    page while it is written; it is never backed by a file."""
    if size < _MAPPED_MIN_BYTES:
        return bytearray(size)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, size, flags=flags)


@contextlib.contextmanager
def _ciphertext(path: Path, expected_size: int) -> Iterator[BinaryIO | memoryview]:
    """A blob to decrypt, which must have the size its plaintext implies: big ones
    memory-mapped, which spares copying them out of the page cache. Pages changed under
    the map while it is read cannot slip through: the digest is taken over the plaintext
    written, and checked against the signed one."""
    with _open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != expected_size:
            raise StreamingAeadError("the blob does not have its ciphertext's size")
        if size < _MAPPED_MIN_BYTES:
            yield handle
            return
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        try:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            yield view
        finally:
            # Once decryption is over no view of it is left, but after a failure the
            # traceback may hold some: then it is unmapped when they go.
            with contextlib.suppress(BufferError):
                view.release()
                mapped.close()


def _is_blob_name(blob: str) -> bool:
    parts = blob.split("/")
    return (
        len(parts) == 2
        and parts[0] == "blobs"
        and parts[1].endswith(".enc")
        and parts[1][:-4].isdigit()
    )


def _open_regular(path: Path) -> Any:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError("not a regular file")
    return os.fdopen(fd, "rb")


def _read_regular(path: Path, limit: int) -> bytes:
    with _open_regular(path) as handle:
        data: bytes = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError("file too large")
    return data
