"""OMS model signatures: round trip, interop with `model_signing` (API and CLI), refusals."""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bastion.models.signing import (
    PAYLOAD_TYPE,
    BadSignature,
    InvalidKey,
    MalformedSignature,
    ManifestMismatch,
    SigningKey,
    UnknownSigner,
    UnsupportedSignature,
    check_file,
    check_files,
    public_key_id,
    require_publisher,
    sign_digests,
    verify_signature,
)

MODEL_FILES = {
    "config.json": b'{"hidden_size": 8}\n',
    "model.safetensors": bytes(range(256)) * 4,
    "tokenizer/vocab.txt": b"hello\nworld\n",
}


def _digests(files: dict[str, bytes]) -> dict[str, bytes]:
    return {path: hashlib.sha256(data).digest() for path, data in files.items()}


def _write_model(root: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def signature(key: SigningKey) -> bytes:
    return sign_digests(_digests(MODEL_FILES), key, model_name="acme-llm")


def _model_signing_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_signing", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- helpers that forge bundles the way an attacker or another signer would -----------------


def _bundle(signature: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(signature)
    return parsed


def _statement(signature: bytes) -> dict[str, Any]:
    payload = base64.b64decode(_bundle(signature)["dsseEnvelope"]["payload"])
    parsed: dict[str, Any] = json.loads(payload)
    return parsed


def _with_payload(
    signature: bytes,
    statement: dict[str, Any],
    *,
    resign_with: SigningKey | None = None,
    payload_type: str = PAYLOAD_TYPE,
) -> bytes:
    """Replace the signed statement; re-sign (DSSE PAE) only if a key is given."""
    bundle = _bundle(signature)
    payload = json.dumps(statement, indent=2).encode()
    envelope = bundle["dsseEnvelope"]
    envelope["payload"] = base64.b64encode(payload).decode()
    envelope["payloadType"] = payload_type
    if resign_with is not None:
        type_bytes = payload_type.encode()
        pae = b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)
        der = resign_with.private_key.sign(pae, ec.ECDSA(hashes.SHA256()))
        envelope["signatures"] = [{"sig": base64.b64encode(der).decode(), "keyid": ""}]
        bundle["verificationMaterial"]["publicKey"]["hint"] = resign_with.key_id
    return json.dumps(bundle).encode()


def _recompute_root(statement: dict[str, Any]) -> None:
    root = hashlib.sha256()
    for resource in statement["predicate"]["resources"]:
        root.update(bytes.fromhex(resource["digest"]))
    statement["subject"][0]["digest"]["sha256"] = root.hexdigest()


# --- keys -------------------------------------------------------------------------------------


def test_signing_key_pem_round_trip(key: SigningKey) -> None:
    restored = SigningKey.from_pem(key.to_pem())
    assert restored.public_pem() == key.public_pem()
    assert restored.key_id == key.key_id == public_key_id(key.public_pem())
    assert b"BEGIN PRIVATE KEY" in key.to_pem()  # PKCS#8, unencrypted


def test_signing_key_refuses_other_curves_and_garbage() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(InvalidKey, match="P-256"):
        SigningKey.from_pem(p384)
    with pytest.raises(InvalidKey, match="unreadable"):
        SigningKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


# --- round trip and the manifest ------------------------------------------------------------


def test_round_trip_returns_the_signed_digests(key: SigningKey, signature: bytes) -> None:
    manifest = verify_signature(signature, [key.public_pem()])
    assert dict(manifest.files) == _digests(MODEL_FILES)
    assert manifest.model_name == "acme-llm"
    assert manifest.signer_key_id == key.key_id
    assert manifest.signer_public_pem == key.public_pem()
    assert "model.sig" in manifest.ignore_paths and ".git" in manifest.ignore_paths


def test_statement_has_the_oms_shape(signature: bytes) -> None:
    bundle = _bundle(signature)
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["dsseEnvelope"]["payloadType"] == "application/vnd.in-toto+json"
    statement = _statement(signature)
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    serialization_args = statement["predicate"]["serialization"]
    assert serialization_args["method"] == "files"
    assert serialization_args["hash_type"] == "sha256"
    assert serialization_args["allow_symlinks"] is False
    names = [r["name"] for r in statement["predicate"]["resources"]]
    assert names == sorted(MODEL_FILES)


def test_verifies_with_any_of_several_trusted_keys(key: SigningKey, signature: bytes) -> None:
    other = SigningKey.generate()
    manifest = verify_signature(signature, [other.public_pem(), key.public_pem()])
    assert manifest.signer_key_id == key.key_id


def test_check_file_and_check_files(key: SigningKey, signature: bytes) -> None:
    manifest = verify_signature(signature, [key.public_pem()])
    digests = _digests(MODEL_FILES)
    check_files(manifest, digests)
    check_file(manifest, "config.json", digests["config.json"])

    with pytest.raises(ManifestMismatch, match="does not match"):
        check_file(manifest, "config.json", hashlib.sha256(b"swapped").digest())
    with pytest.raises(ManifestMismatch, match="not in the signed manifest"):
        check_file(manifest, "extra.json", digests["config.json"])
    with pytest.raises(ManifestMismatch, match=r"missing: .tokenizer/vocab\.txt"):
        check_files(manifest, {k: v for k, v in digests.items() if k != "tokenizer/vocab.txt"})
    with pytest.raises(ManifestMismatch, match="not in the signed manifest"):
        check_files(manifest, {**digests, "added.bin": digests["config.json"]})


def test_sign_digests_refuses_paths_model_signing_would_not_see(key: SigningKey) -> None:
    digest = hashlib.sha256(b"x").digest()
    for bad in ("../escape", "/abs", "a//b", "./a", "a\\b", ".git/config", "model.sig"):
        with pytest.raises(ValueError):
            sign_digests({bad: digest}, key, model_name="m")
    with pytest.raises(ValueError, match="SHA-256"):
        sign_digests({"a": b"short"}, key, model_name="m")
    with pytest.raises(ValueError, match="at least one"):
        sign_digests({}, key, model_name="m")
    # Stored outside the directory, the signature's own name is an ordinary file name.
    outside = sign_digests({"model.sig": digest}, key, model_name="m", signature_name=None)
    assert "model.sig" in verify_signature(outside, [key.public_pem()]).files


# --- interop with model_signing ---------------------------------------------------------------


def test_model_signing_api_and_cli_accept_our_signature(
    tmp_path: pathlib.Path, key: SigningKey, signature: bytes
) -> None:
    import model_signing

    model = _write_model(tmp_path / "acme-llm", MODEL_FILES)
    # A .git folder is ignored by model_signing by default; our ignore_paths must agree.
    _write_model(model, {".git/HEAD": b"ref: refs/heads/main\n"})
    (model / "model.sig").write_bytes(signature)
    public = tmp_path / "bastion.pub"
    public.write_bytes(key.public_pem())

    verifier = model_signing.verifying.Config()  # type: ignore[no-untyped-call]
    verifier.use_elliptic_key_verifier(public_key=public).verify(model, model / "model.sig")
    result = _model_signing_cli(
        "verify", "key", str(model), "--signature", str(model / "model.sig"),
        "--public_key", str(public),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Verification succeeded" in result.stdout

    # The official verifier also refuses a tampered file, so the manifest really binds them.
    (model / "config.json").write_bytes(b"{}")
    result = _model_signing_cli(
        "verify", "key", str(model), "--signature", str(model / "model.sig"),
        "--public_key", str(public),
    )  # fmt: skip
    assert result.returncode != 0


def test_signature_stored_outside_the_directory(tmp_path: pathlib.Path, key: SigningKey) -> None:
    import model_signing

    model = _write_model(tmp_path / "m", MODEL_FILES)
    outside = tmp_path / "m.sig"
    outside.write_bytes(
        sign_digests(_digests(MODEL_FILES), key, model_name="m", signature_name=None)
    )
    public = tmp_path / "k.pub"
    public.write_bytes(key.public_pem())
    verifier = model_signing.verifying.Config()  # type: ignore[no-untyped-call]
    verifier.use_elliptic_key_verifier(public_key=public).verify(model, outside)


def _publisher_key_files(tmp_path: pathlib.Path) -> tuple[SigningKey, pathlib.Path]:
    publisher = SigningKey.generate()
    # model_signing's own signer only reads key files: this test plays the publisher.
    private = tmp_path / "publisher.pem"
    private.write_bytes(publisher.to_pem())
    private.chmod(0o600)
    return publisher, private


def test_we_accept_model_signing_api_signature(tmp_path: pathlib.Path) -> None:
    import model_signing

    publisher, private = _publisher_key_files(tmp_path)
    model = _write_model(tmp_path / "pub-model", MODEL_FILES)
    signature_path = tmp_path / "pub-model.sig"
    signer = model_signing.signing.Config()  # type: ignore[no-untyped-call]
    signer.use_elliptic_key_signer(private_key=private).sign(model, signature_path)

    manifest = verify_signature(signature_path.read_bytes(), [publisher.public_pem()])
    assert manifest.model_name == "pub-model"
    check_files(manifest, _digests(MODEL_FILES))
    require_publisher(manifest, [publisher.public_pem()])
    with pytest.raises(UnknownSigner, match="trusted publisher"):
        require_publisher(manifest, [SigningKey.generate().public_pem()])


def test_we_accept_model_signing_cli_signature(tmp_path: pathlib.Path) -> None:
    publisher, private = _publisher_key_files(tmp_path)
    model = _write_model(tmp_path / "cli-model", MODEL_FILES)
    _write_model(model, {".gitignore": b"*.tmp\n"})
    result = _model_signing_cli(
        "sign", "key", str(model), "--private_key", str(private),
        "--signature", str(model / "model.sig"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    manifest = verify_signature((model / "model.sig").read_bytes(), [publisher.public_pem()])
    assert set(manifest.ignore_paths) >= {".gitignore", "model.sig"}
    check_files(manifest, _digests(MODEL_FILES))  # .gitignore and model.sig are not signed


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("edit", ["digest changed", "file added", "file removed"])
def test_manifest_edited_after_signing_is_refused(
    key: SigningKey, signature: bytes, edit: str
) -> None:
    statement = _statement(signature)
    resources = statement["predicate"]["resources"]
    if edit == "digest changed":
        resources[0]["digest"] = hashlib.sha256(b"evil").hexdigest()
    elif edit == "file added":
        resources.append(
            {"name": "evil.py", "algorithm": "sha256", "digest": hashlib.sha256(b"").hexdigest()}
        )
    else:
        resources.pop()
    _recompute_root(statement)  # a careful attacker keeps the root digest consistent
    with pytest.raises(BadSignature):
        verify_signature(_with_payload(signature, statement), [key.public_pem()])


def test_signature_from_untrusted_key_is_refused(key: SigningKey) -> None:
    intruder = SigningKey.generate()
    forged = sign_digests(_digests(MODEL_FILES), intruder, model_name="acme-llm")
    with pytest.raises(UnknownSigner, match="not trusted"):
        verify_signature(forged, [key.public_pem()])
    # Dropping the key hint does not help: no trusted key verifies the signature.
    bundle = _bundle(forged)
    del bundle["verificationMaterial"]["publicKey"]["hint"]
    with pytest.raises(BadSignature):
        verify_signature(json.dumps(bundle).encode(), [key.public_pem()])
    with pytest.raises(UnknownSigner):
        verify_signature(forged, [])


def test_hint_naming_our_key_on_a_foreign_signature_is_refused(key: SigningKey) -> None:
    forged = _bundle(sign_digests(_digests(MODEL_FILES), SigningKey.generate(), model_name="x"))
    forged["verificationMaterial"]["publicKey"]["hint"] = key.key_id
    with pytest.raises(BadSignature):
        verify_signature(json.dumps(forged).encode(), [key.public_pem()])


@pytest.mark.parametrize(
    "garbled",
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b"\xff\xfe not json",
        b"[" * 100_000,
    ],
)
def test_garbled_json_is_refused(key: SigningKey, garbled: bytes) -> None:
    with pytest.raises(MalformedSignature):
        verify_signature(garbled, [key.public_pem()])


def test_truncated_signature_is_refused(key: SigningKey, signature: bytes) -> None:
    for cut in (1, len(signature) // 2, len(signature) - 1):
        with pytest.raises(MalformedSignature):
            verify_signature(signature[:cut], [key.public_pem()])


def test_broken_fields_are_refused(key: SigningKey, signature: bytes) -> None:
    def mutated(change: Any) -> bytes:
        bundle = _bundle(signature)
        change(bundle)
        return json.dumps(bundle).encode()

    cases = {
        "no envelope": lambda b: b.pop("dsseEnvelope"),
        "payload not base64": lambda b: b["dsseEnvelope"].update(payload="***"),
        "sig not base64": lambda b: b["dsseEnvelope"]["signatures"][0].update(sig="!"),
        "two signatures": lambda b: b["dsseEnvelope"]["signatures"].append({"sig": ""}),
        "no signatures": lambda b: b["dsseEnvelope"].update(signatures=[]),
        "hint not a string": lambda b: b["verificationMaterial"]["publicKey"].update(hint=7),
    }
    for name, change in cases.items():
        with pytest.raises(MalformedSignature):
            verify_signature(mutated(change), [key.public_pem()])
        assert name  # each case is named for the reader of a failure

    with pytest.raises(UnsupportedSignature, match="media type"):
        verify_signature(mutated(lambda b: b.update(mediaType="x")), [key.public_pem()])
    with pytest.raises(UnsupportedSignature, match="public key"):
        verify_signature(
            mutated(lambda b: b["verificationMaterial"].pop("publicKey")), [key.public_pem()]
        )
    # A bit flipped in the DER signature.
    bundle = _bundle(signature)
    der = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    der[-1] ^= 1
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(der).decode()
    with pytest.raises(BadSignature):
        verify_signature(json.dumps(bundle).encode(), [key.public_pem()])


def test_wrong_payload_type_is_refused(key: SigningKey, signature: bytes) -> None:
    statement = _statement(signature)
    forged = _with_payload(
        signature, statement, resign_with=key, payload_type="application/vnd.example+json"
    )
    with pytest.raises(UnsupportedSignature, match="payload type"):
        verify_signature(forged, [key.public_pem()])


def test_signed_but_unsupported_or_inconsistent_statements_are_refused(
    key: SigningKey, signature: bytes
) -> None:
    """Even correctly signed by a trusted key, these statements must not yield a manifest."""

    def resigned(change: Any) -> bytes:
        statement = _statement(signature)
        change(statement)
        return _with_payload(signature, statement, resign_with=key)

    # The helper's re-signing itself is sound: an unchanged statement verifies.
    assert verify_signature(resigned(lambda s: None), [key.public_pem()]).files

    def set_serialization(**values: Any) -> Any:
        return lambda s: s["predicate"]["serialization"].update(values)

    unsupported = {
        "hash": set_serialization(hash_type="blake2"),
        "shards": set_serialization(method="shards", shard_size=1000),
        "predicate": lambda s: s.update(predicateType="https://model_signing/Digests/v0.1"),
        "statement": lambda s: s.update(_type="https://in-toto.io/Statement/v0.1"),
        "resource algorithm": lambda s: s["predicate"]["resources"][0].update(algorithm="md5"),
    }
    for change in unsupported.values():
        with pytest.raises(UnsupportedSignature):
            verify_signature(resigned(change), [key.public_pem()])

    def add_resource(name: str, digest: str) -> Any:
        return lambda s: s["predicate"]["resources"].append(
            {"name": name, "algorithm": "sha256", "digest": digest}
        )

    good_hex = hashlib.sha256(b"").hexdigest()
    malformed = {
        "root digest": lambda s: s["subject"][0]["digest"].update(sha256=good_hex),
        "traversal": add_resource("../../etc/passwd", good_hex),
        "absolute": add_resource("/etc/passwd", good_hex),
        "duplicate": add_resource("config.json", good_hex),
        "short digest": add_resource("x", "abcd"),
        "hex digest": add_resource("x", "zz" * 32),
        "no files": lambda s: s["predicate"].update(resources=[]),
        "two subjects": lambda s: s["subject"].append(s["subject"][0]),
    }
    for change in malformed.values():
        with pytest.raises(MalformedSignature):
            verify_signature(resigned(change), [key.public_pem()])


def test_unusable_public_keys_are_refused(signature: bytes) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed_pem = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(InvalidKey, match="elliptic-curve"):
        verify_signature(signature, [ed_pem])
    with pytest.raises(InvalidKey, match="unreadable"):
        verify_signature(signature, [b"not a pem"])
