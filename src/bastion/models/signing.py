"""Model signatures in the OpenSSF Model Signing (OMS) format, made and checked in memory.

A signature is what ``model_signing sign key DIR`` writes: a Sigstore bundle (v0.3 JSON)
holding a DSSE envelope whose payload is an in-toto statement. Its predicate
(``https://model_signing/signature/v1.0``) lists every file of the model with its SHA-256
(``"method": "files"`` serialization; BLAKE3, which the format also defines, for the
signatures Bastion checks when loading, as it hashes twice as fast) and its subject
carries a root digest: SHA-256 over the file digests in the order listed. The envelope is
signed with ECDSA.

Bastion signs from digests, so the plaintext of a model never has to sit on disk, and it
verifies with ``cryptography`` alone, so a worker checks a manifest without importing
``model_signing`` (and its Sigstore dependencies). The official verifier accepts our
signatures and ours accepts its own; the tests check both ways, through the CLI too.

Verification raises a :class:`SignatureError` subclass, never returns a flag:
:class:`MalformedSignature`, :class:`UnsupportedSignature`, :class:`UnknownSigner`,
:class:`BadSignature`, :class:`InvalidKey`, and :class:`ManifestMismatch` when files do
not match a verified manifest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
DEFAULT_SIGNATURE_NAME = "model.sig"
# What `model_signing` leaves out of a directory's manifest by default; written into the
# signature so the official verifier skips them too.
GIT_IGNORE_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
# A signature lists one small JSON object per file; this bounds hostile input, not models.
MAX_SIGNATURE_BYTES = 16 * 1024 * 1024

#: The file digest algorithms (OMS ``hash_type``) Bastion signs and accepts.
DIGEST_ALGORITHMS = ("sha256", "blake3")
_ALGORITHM_NAMES = {"sha256": "SHA-256", "blake3": "BLAKE3"}

_T = TypeVar("_T")
_DIGEST_BYTES = 32
_PATH_IN_MESSAGE_CHARS = 120
_SIGNING_CURVE = ec.SECP256R1
# The curves `model_signing` accepts, each with the hash its ECDSA signatures use.
_CURVE_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


class SignatureError(Exception):
    """A signature or manifest was refused; the message says why (never any key material)."""


class MalformedSignature(SignatureError):
    """The signature is not a well-formed OMS bundle (bad JSON, fields, encoding, paths)."""


class UnsupportedSignature(SignatureError):
    """A well-formed signature using a variant Bastion does not accept (payload type, hash)."""


class UnknownSigner(SignatureError):
    """The signature names (or was made by) a key that is not among the trusted ones."""


class BadSignature(SignatureError):
    """The ECDSA signature does not verify: the bundle was altered after signing."""


class InvalidKey(SignatureError):
    """A key PEM is unreadable, or not an EC key on a supported curve."""


class ManifestMismatch(SignatureError):
    """A file is missing from, extra to, or different from the signed manifest."""


def public_key_id(public_pem: bytes) -> str:
    """The key's id: SHA-256 hex of its SubjectPublicKeyInfo PEM, as OMS uses for its hint."""
    return _key_id(_load_public_key(public_pem))


class SigningKey:
    """Bastion's ECDSA P-256 signing key (the private half stays in memory)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, _SIGNING_CURVE):
            raise InvalidKey("The signing key must be an ECDSA P-256 key.")
        self._private_key = private_key

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random P-256 key."""
        return cls(ec.generate_private_key(_SIGNING_CURVE()))

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        """Load an unencrypted PKCS#8 PEM written by :meth:`to_pem`."""
        try:
            private_key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise InvalidKey("The signing key PEM is unreadable or encrypted.") from exc
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise InvalidKey("The signing key must be an ECDSA P-256 key.")
        return cls(private_key)

    def to_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM: seal it (KeyRing) before it touches a disk."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (what ``--public_key`` takes)."""
        return _public_pem(self._private_key.public_key())

    @property
    def key_id(self) -> str:
        """See :func:`public_key_id`."""
        return _key_id(self._private_key.public_key())

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The `cryptography` key object, for signers that take one."""
        return self._private_key


@dataclass(frozen=True)
class Manifest:
    """What a verified signature vouches for: relative path -> digest of the plaintext
    (SHA-256, or BLAKE3 where `algorithm` says so)."""

    model_name: str
    files: Mapping[str, bytes]
    signer_key_id: str
    signer_public_pem: bytes = field(repr=False)
    ignore_paths: tuple[str, ...] = ()
    algorithm: str = "sha256"


def sign_digests(
    files: Mapping[str, bytes],
    key: SigningKey,
    *,
    model_name: str,
    signature_name: str | None = DEFAULT_SIGNATURE_NAME,
    algorithm: str = "sha256",
) -> bytes:
    """Sign a model given as ``relative path -> digest``; returns the OMS JSON.

    The result is what ``model_signing sign key`` writes for a directory holding those
    files: file serialization, `algorithm` (sha256 or blake3), the git paths ignored, and
    ``signature_name`` ignored too when the signature will be stored inside the directory
    (``None`` if not).
    """
    if algorithm not in DIGEST_ALGORITHMS:
        raise ValueError(f"Unsupported digest algorithm {algorithm!r}.")
    ignore_paths = set(GIT_IGNORE_PATHS)
    if signature_name is not None:
        _check_relative_path(signature_name, ValueError)
        ignore_paths.add(signature_name)
    if not files:
        raise ValueError("A model signature needs at least one file.")
    for path, digest in files.items():
        _check_relative_path(path, ValueError)
        if len(digest) != _DIGEST_BYTES:
            raise ValueError(
                f"The digest of {_quote(path)} is not a {_ALGORITHM_NAMES[algorithm]} digest."
            )
        if _is_ignored(path, ignore_paths):
            raise ValueError(
                f"{_quote(path)} would be skipped by model_signing (ignored path); rename it."
            )
    return _sign_with_model_signing(files, key, model_name, sorted(ignore_paths), algorithm)


def verify_signature(signature: bytes, public_keys: Sequence[bytes]) -> Manifest:
    """Verify an OMS signature against trusted public key PEMs; return its manifest.

    Checks the bundle's media type, the DSSE payload type, the ECDSA signature with the key
    the bundle names (or, for bundles naming none, any trusted key), the statement and
    predicate types, the serialization (files, SHA-256 or BLAKE3) and the root digest.
    """
    trusted = [_load_public_key(pem) for pem in public_keys]
    if not trusted:
        raise UnknownSigner("No trusted public key was given to verify the signature with.")
    bundle = _parse_json_object(signature, "signature")
    envelope = _envelope(bundle)
    hint = _key_hint(bundle)
    payload_type = _field(envelope, "payloadType", str)
    if payload_type != PAYLOAD_TYPE:
        raise UnsupportedSignature(f"Unsupported DSSE payload type (expected {PAYLOAD_TYPE}).")
    payload = _b64decode(_field(envelope, "payload", str), "payload")
    signatures = _field(envelope, "signatures", list)
    if len(signatures) != 1 or not isinstance(signatures[0], dict):
        raise MalformedSignature("The DSSE envelope must hold exactly one signature.")
    der_signature = _b64decode(_field(signatures[0], "sig", str), "sig")

    candidates = trusted if hint is None else [k for k in trusted if _key_id(k) == hint]
    if not candidates:
        raise UnknownSigner("The signature was made by a key that is not trusted.")
    signer = _verify_dsse(candidates, payload_type, payload, der_signature)
    return _manifest_from_statement(payload, signer)


def require_publisher(manifest: Manifest, trusted_keys: Iterable[bytes]) -> None:
    """Raise :class:`UnknownSigner` unless the manifest was signed by one of `trusted_keys`."""
    trusted_ids = {public_key_id(pem) for pem in trusted_keys}
    if not any(hmac.compare_digest(manifest.signer_key_id, kid) for kid in trusted_ids):
        raise UnknownSigner("The model is not signed by a trusted publisher.")


def check_file(manifest: Manifest, path: str, digest: bytes) -> None:
    """Raise :class:`ManifestMismatch` unless `path` is in the manifest with `digest`."""
    expected = manifest.files.get(path)
    if expected is None:
        raise ManifestMismatch(f"{_quote(path)} is not in the signed manifest.")
    if not hmac.compare_digest(expected, digest):
        algorithm = _ALGORITHM_NAMES[manifest.algorithm]
        raise ManifestMismatch(f"{_quote(path)} does not match its signed {algorithm} digest.")


def check_files(manifest: Manifest, files: Mapping[str, bytes]) -> None:
    """Raise :class:`ManifestMismatch` unless `files` are exactly the manifest's files."""
    missing = sorted(set(manifest.files) - set(files))
    if missing:
        raise ManifestMismatch(f"Signed file missing: {_quote(missing[0])}.")
    for path, digest in sorted(files.items()):
        check_file(manifest, path, digest)


def _sign_with_model_signing(
    files: Mapping[str, bytes],
    key: SigningKey,
    model_name: str,
    ignore_paths: list[str],
    algorithm: str,
) -> bytes:
    # model_signing's own Payload and EC signer build the statement and bundle, so the
    # JSON is byte-for-byte what its CLI writes (but for the random ECDSA signature). Its
    # signer only reads a key file; we hand it the key object instead, so no private key
    # is ever written. Imported here: it pulls in Sigstore (~1 s), which verifiers skip.
    from model_signing import manifest as oms_manifest
    from model_signing._hashing import hashing as oms_hashing
    from model_signing._signing import sign_ec_key, signing

    class _InMemoryEcSigner(sign_ec_key.Signer):
        def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
            self._private_key = private_key

    serialization_type = oms_manifest.SerializationType.from_args(
        {
            "method": "files",
            "hash_type": algorithm,
            "allow_symlinks": False,
            "ignore_paths": ignore_paths,
        }
    )
    items = [
        oms_manifest.FileManifestItem(
            path=pathlib.PurePosixPath(path),
            digest=oms_hashing.Digest(algorithm, bytes(digest)),
        )
        for path, digest in files.items()
    ]
    payload = signing.Payload(oms_manifest.Manifest(model_name, items, serialization_type))
    bundle = _InMemoryEcSigner(key.private_key).sign(payload)
    text: str = bundle.bundle.to_json()  # type: ignore[attr-defined]
    return text.encode("utf-8")


def _verify_dsse(
    candidates: Sequence[ec.EllipticCurvePublicKey],
    payload_type: str,
    payload: bytes,
    der_signature: bytes,
) -> ec.EllipticCurvePublicKey:
    # DSSE v1 pre-authentication encoding: lengths are byte counts in decimal ASCII.
    type_bytes = payload_type.encode("utf-8")
    pae = b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)
    for public_key in candidates:
        algorithm = _CURVE_HASHES[public_key.curve.name]()
        try:
            public_key.verify(der_signature, pae, ec.ECDSA(algorithm))
        except InvalidSignature:
            continue
        return public_key
    raise BadSignature("The signature does not verify: the manifest was altered or re-signed.")


def _manifest_from_statement(payload: bytes, signer: ec.EllipticCurvePublicKey) -> Manifest:
    statement = _parse_json_object(payload, "signed statement")
    if statement.get("_type") != STATEMENT_TYPE:
        raise UnsupportedSignature(f"The signed statement is not an in-toto {STATEMENT_TYPE}.")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise UnsupportedSignature(f"Unsupported predicate type (expected {PREDICATE_TYPE}).")
    subjects = _field(statement, "subject", list)
    if len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise MalformedSignature("The signed statement must have exactly one subject.")
    model_name = _field(subjects[0], "name", str)
    root_hex = _field(_field(subjects[0], "digest", dict), "sha256", str)

    predicate = _field(statement, "predicate", dict)
    serialization_args = _field(predicate, "serialization", dict)
    if serialization_args.get("method") != "files":
        raise UnsupportedSignature("Only per-file serialization ('files') is supported.")
    algorithm = serialization_args.get("hash_type")
    if algorithm not in DIGEST_ALGORITHMS:
        raise UnsupportedSignature("Only SHA-256 and BLAKE3 file digests are supported.")
    ignore_paths = serialization_args.get("ignore_paths", [])
    if not isinstance(ignore_paths, list) or not all(isinstance(p, str) for p in ignore_paths):
        raise MalformedSignature("The signature's ignore_paths is not a list of paths.")

    files: dict[str, bytes] = {}
    root = hashlib.sha256()
    for resource in _field(predicate, "resources", list):
        if not isinstance(resource, dict):
            raise MalformedSignature("A manifest resource is not a JSON object.")
        if resource.get("algorithm") not in DIGEST_ALGORITHMS:
            raise UnsupportedSignature("Only SHA-256 and BLAKE3 file digests are supported.")
        if resource.get("algorithm") != algorithm:
            raise MalformedSignature("A file digest is not of the manifest's algorithm.")
        path = _field(resource, "name", str)
        _check_relative_path(path, MalformedSignature)
        if path in files:
            raise MalformedSignature(f"{_quote(path)} is listed twice in the manifest.")
        digest = _hex_digest(_field(resource, "digest", str))
        files[path] = digest
        root.update(digest)
    if not files:
        raise MalformedSignature("The signed manifest lists no files.")
    if not hmac.compare_digest(root.digest(), _hex_digest(root_hex)):
        raise MalformedSignature("The manifest's root digest does not match its files.")
    return Manifest(
        model_name=model_name,
        files=MappingProxyType(files),
        signer_key_id=_key_id(signer),
        signer_public_pem=_public_pem(signer),
        ignore_paths=tuple(ignore_paths),
        algorithm=algorithm,
    )


def _envelope(bundle: dict[str, Any]) -> dict[str, Any]:
    if bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise UnsupportedSignature(f"Unsupported bundle media type (expected {BUNDLE_MEDIA_TYPE}).")
    return _field(bundle, "dsseEnvelope", dict)


def _key_hint(bundle: dict[str, Any]) -> str | None:
    material = _field(bundle, "verificationMaterial", dict)
    public_key = material.get("publicKey")
    if not isinstance(public_key, dict):
        # Certificate and Sigstore (keyless) bundles carry no public key identifier.
        raise UnsupportedSignature("Only signatures made with a public key are supported.")
    hint = public_key.get("hint")
    if hint is None:
        return None
    if not isinstance(hint, str):
        raise MalformedSignature("The bundle's public key hint is not a string.")
    return hint


def _parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_SIGNATURE_BYTES:
        raise MalformedSignature(f"The {what} is larger than {MAX_SIGNATURE_BYTES} bytes.")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedSignature(f"The {what} is not valid JSON.") from exc
    if not isinstance(parsed, dict):
        raise MalformedSignature(f"The {what} is not a JSON object.")
    return parsed


def _field(container: dict[str, Any], name: str, kind: type[_T]) -> _T:
    value = container.get(name)
    if not isinstance(value, kind):
        raise MalformedSignature(f"The signature's field {name!r} is missing or mistyped.")
    return value


def _b64decode(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedSignature(f"The signature's field {name!r} is not base64.") from exc


def _hex_digest(text: str) -> bytes:
    if len(text) != 2 * _DIGEST_BYTES:
        raise MalformedSignature("A manifest digest is not a SHA-256 hex digest.")
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise MalformedSignature("A manifest digest is not a SHA-256 hex digest.") from exc


def _check_relative_path(path: str, error: type[Exception]) -> None:
    # Manifest names are normalised POSIX paths inside the model (model_signing writes
    # them so); anything else could point outside the bundle or alias another file.
    parts = path.split("/")
    if not path or "\\" in path or "\x00" in path or any(part in ("", ".", "..") for part in parts):
        raise error(f"{_quote(path)} is not a normalised relative path inside the model.")


def _is_ignored(path: str, ignore_paths: Iterable[str]) -> bool:
    return any(path == ignored or path.startswith(ignored + "/") for ignored in ignore_paths)


def _load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        public_key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise InvalidKey("A public key PEM is unreadable.") from exc
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InvalidKey("A public key is not an elliptic-curve (ECDSA) key.")
    if public_key.curve.name not in _CURVE_HASHES:
        raise InvalidKey("A public key is on a curve OMS does not support (P-256/384/521).")
    return public_key


def _public_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    return hashlib.sha256(_public_pem(public_key)).hexdigest()


def _quote(path: str) -> str:
    # Paths come from untrusted bundles: bound their length and escape control characters.
    shown = path if len(path) <= _PATH_IN_MESSAGE_CHARS else path[:_PATH_IN_MESSAGE_CHARS] + "…"
    return repr(shown)
