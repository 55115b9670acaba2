"""`bastion models import|verify|export|list|remove` on a real home, with the official
verifier, and bundles served by a real server."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from bastion_testing import BASTION, BastionServer, clean_env, cli_json, run_cli


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("open('UNPICKLED', 'w').write('x')",))


def test_import_verify_export_and_refusals(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    source = tmp_path / "my-model"
    source.mkdir()
    weights = np.arange(600_000, dtype=np.float32).reshape(600, 1000)
    save_file({"w": weights}, source / "model.safetensors")
    (source / "config.json").write_text(json.dumps({"hidden_size": 1000}))

    imported = cli_json(home, "models", "import", str(source), "--name", "acme-llm")
    assert imported["version"] == "1" and sorted(imported["files"]) == [
        "config.json",
        "model.safetensors",
    ]
    assert cli_json(home, "models", "import", str(source), "--name", "acme-llm")["version"] == "2"
    verified = cli_json(home, "models", "verify", "acme-llm", "--version", "1")
    assert verified["ok"] is True and verified["files"] == 2

    # No plaintext weight anywhere in the home.
    needle = weights[-1].tobytes()[-64:]
    for path in home.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path

    out = tmp_path / "exported"
    exported = cli_json(home, "models", "export", "acme-llm", "--out", str(out))
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    official = subprocess.run(
        [
            str(Path(sys.executable).parent / "model_signing"),
            "verify",
            "key",
            str(out),
            "--signature",
            exported["signature"],
            "--public_key",
            exported["public_key"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert official.returncode == 0, official.stdout + official.stderr

    # A flipped byte in a stored file: a clear refusal, exit 1, no traceback.
    blob = next((home / "bundles/acme-llm/2/blobs").iterdir())
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(data)
    broken = run_cli(home, "models", "verify", "acme-llm", "--version", "2", check=False)
    assert broken.returncode == 1
    assert "integrity check failed" in broken.stderr and "Traceback" not in broken.stderr

    # A pickle is refused with the reason, and never unpickled.
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode()))
    refused = run_cli(home, "models", "import", str(hostile), "--name", "evil", check=False)
    assert refused.returncode == 1
    assert "pickle" in refused.stderr and "safetensors" in refused.stderr
    assert not (tmp_path / "UNPICKLED").exists() and not Path("UNPICKLED").exists()
    assert not (home / "bundles/evil").exists() or not any((home / "bundles/evil").iterdir())


def _doubling_onnx(path: Path, factor: float) -> Path:
    """A tiny ONNX model: output = input * factor."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "factor"], ["output"])],
        "scale",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor("factor", TensorProto.FLOAT, [1], [factor])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.mkdir()
    onnx.save(model, str(path / "model.onnx"))
    return path


def test_a_bundle_is_served_and_a_tampered_one_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    source = _doubling_onnx(tmp_path / "scale", 3.0)
    cli_json(home, "models", "import", str(source), "--name", "scale", "--runtime", "onnx")
    cli_json(home, "models", "import", str(source), "--name", "broken", "--runtime", "onnx")
    blob = next((home / "bundles/broken/1/blobs").iterdir())
    data = bytearray(blob.read_bytes())
    data[-3] ^= 1
    blob.write_bytes(data)

    srv = BastionServer(home)
    try:
        srv.wait_ready(["scale"], timeout=120)
        body = {
            "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
        }
        with srv.client() as client:
            answer = client.post("/v2/models/scale/infer", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["outputs"][0]["data"] == [3.0, 6.0, 9.0, 12.0]
            status = srv.wait_model("broken", "integrity_failed", timeout=60)
            assert "does not decrypt" in status["detail"]
            refused = client.post("/v2/models/broken/infer", json=body)
            assert refused.status_code == 503
            assert "integrity" in refused.json()["error"]
            # The other model keeps serving.
            assert client.post("/v2/models/scale/infer", json=body).status_code == 200
        time.sleep(0.5)
        assert "model.integrity_failed" in srv.logs()
        # The CLI shows the live states the server publishes, with the reason.
        listed = _listed_when(home, lambda rows: rows["broken"]["state"] == "integrity_failed")
        assert "does not decrypt" in listed["broken"]["detail"]
        assert listed["scale"]["state"] == "ready"
        assert listed["scale"]["version"] == "1" and listed["scale"]["bundle_versions"] == ["1"]
        table = run_cli(home, "models", "list").stdout
        assert "integrity_failed" in table and "broken" in table
        # The worker held the weights only in memory: no plaintext model file anywhere.
        plain = (source / "model.onnx").read_bytes()
        for path in home.rglob("*"):
            if path.is_file():
                assert plain not in path.read_bytes(), path
        # Removing the broken model unregisters it, deletes its bundle, stops its worker.
        removed = cli_json(home, "models", "remove", "broken")
        assert removed == {"name": "broken", "unregistered": True, "deleted_versions": ["1"]}
        assert not (home / "bundles/broken").exists()
        listed = _listed_when(home, lambda rows: "broken" not in rows)
        assert listed["scale"]["state"] == "ready"
    finally:
        srv.stop()
    # A server that stopped cleanly leaves no live state behind.
    assert all(row["state"] is None for row in cli_json(home, "models", "list"))


def _listed_when(
    home: Path, condition: Callable[[dict[str, dict[str, Any]]], bool], timeout: float = 30
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = {row["name"]: row for row in cli_json(home, "models", "list")}
        if condition(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def test_models_remove_keeps_or_deletes_bundle_versions(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    source = _doubling_onnx(tmp_path / "scale", 2.0)
    for _ in range(3):
        cli_json(home, "models", "import", str(source), "--name", "scale")
    cli_json(home, "models", "import", str(source), "--name", "scale", "--runtime", "onnx")
    rows = {row["name"]: row for row in cli_json(home, "models", "list")}
    assert rows["scale"]["bundle_versions"] == ["1", "2", "3", "4"]
    assert rows["scale"]["version"] == "4" and rows["scale"]["registered"]
    # The version served cannot be deleted alone.
    refused = run_cli(home, "models", "remove", "scale", "--version", "4", check=False)
    assert refused.returncode == 1 and "served" in refused.stderr
    assert cli_json(home, "models", "remove", "scale", "--version", "2")["deleted_versions"] == [
        "2"
    ]
    assert not (home / "bundles/scale/2").exists() and (home / "bundles/scale/4").exists()
    # Unregister but keep the bundles: still listed, as stored but not served.
    kept = cli_json(home, "models", "remove", "scale", "--keep-bundles")
    assert kept == {"name": "scale", "unregistered": True, "deleted_versions": []}
    rows = {row["name"]: row for row in cli_json(home, "models", "list")}
    assert rows["scale"]["registered"] is False
    assert rows["scale"]["bundle_versions"] == ["1", "3", "4"]
    # Then everything goes; a third remove is a clear error.
    gone = cli_json(home, "models", "remove", "scale")
    assert gone == {"name": "scale", "unregistered": False, "deleted_versions": ["1", "3", "4"]}
    assert not (home / "bundles/scale").exists()
    again = run_cli(home, "models", "remove", "scale", check=False)
    assert again.returncode == 1 and "does not exist" in again.stderr
    # Names are checked before any path is built from them.
    escape = run_cli(home, "models", "remove", "../keys", check=False)
    assert escape.returncode == 1 and (home / "master.key").exists()


def test_a_trust_policy_serves_only_bundles_from_a_listed_publisher(tmp_path: Path) -> None:
    import hashlib

    from bastion.models.signing import SigningKey, sign_digests

    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    source = _doubling_onnx(tmp_path / "scale", 2.0)
    publisher = SigningKey.generate()
    digests = {"model.onnx": hashlib.sha256((source / "model.onnx").read_bytes()).digest()}
    (tmp_path / "model.sig").write_bytes(
        sign_digests(digests, publisher, model_name="scale", signature_name=None)
    )
    (tmp_path / "publisher.pem").write_bytes(publisher.public_pem())
    signed = [
        "--signature",
        str(tmp_path / "model.sig"),
        "--publisher-key",
        str(tmp_path / "publisher.pem"),
    ]
    run_cli(home, "models", "import", str(source), "--name", "signed", "--runtime", "onnx", *signed)
    run_cli(home, "models", "import", str(source), "--name", "unsigned", "--runtime", "onnx")
    # A wrong publisher key is refused at import, with the reason.
    other = tmp_path / "other.pem"
    other.write_bytes(SigningKey.generate().public_pem())
    wrong = run_cli(
        home,
        "models",
        "import",
        str(source),
        "--name",
        "x",
        "--signature",
        str(tmp_path / "model.sig"),
        "--publisher-key",
        str(other),
        check=False,
    )
    assert wrong.returncode == 1 and "publisher" in wrong.stderr

    policy = {
        "BASTION_REQUIRE_PUBLISHER": "true",
        "BASTION_TRUSTED_PUBLISHER_KEYS": str(tmp_path / "publisher.pem"),
    }
    srv = BastionServer(home, env=policy)
    try:
        srv.wait_ready(["signed"], timeout=120)
        status = srv.wait_model("unsigned", "integrity_failed", timeout=60)
        assert "publisher" in status["detail"]
    finally:
        srv.stop()


def test_import_limits_come_from_the_configuration(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    source = _doubling_onnx(tmp_path / "scale", 2.0)
    size = (source / "model.onnx").stat().st_size

    def import_with(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*BASTION, "models", "import", str(source), "--name", "m", "--home", str(home)],
            capture_output=True,
            text=True,
            timeout=120,
            env=clean_env(**env),
        )

    small = import_with(BASTION_IMPORT_MAX_FILE_BYTES=str(size - 1))
    assert small.returncode == 1
    assert f"over the limit of {size - 1} bytes" in small.stderr
    assert not (home / "bundles/m").exists()
    assert import_with(BASTION_IMPORT_MAX_FILES="0").returncode == 1
    assert "must be a positive number" in import_with(BASTION_IMPORT_MAX_FILES="0").stderr
    assert import_with(BASTION_IMPORT_MAX_FILE_BYTES=str(size)).returncode == 0


def test_every_attack_on_a_stored_bundle_is_refused_and_the_server_stays_healthy(
    tmp_path: Path,
) -> None:
    """Each tampering of a served bundle: the model goes integrity_failed with its own
    reason, nothing of it is loaded, and the untouched model keeps serving."""
    import hashlib

    import blake3

    from bastion.models.signing import SigningKey, sign_digests

    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    source = _doubling_onnx(tmp_path / "scale", 3.0)
    attacks = ["flipped", "truncated", "swapped", "edited", "resigned", "forged", "wrong-kek"]
    for name in ["scale", *attacks, "imposter"]:
        cli_json(home, "models", "import", str(source), "--name", name, "--runtime", "onnx")
    # A rollback: version 2 is served, and version 1's whole directory is put in its place.
    cli_json(home, "models", "import", str(source), "--name", "rolled")
    cli_json(home, "models", "import", str(source), "--name", "rolled", "--runtime", "onnx")

    def bundle(name: str) -> Path:
        return home / "bundles" / name / "1"

    def blob(name: str) -> Path:
        return next((bundle(name) / "blobs").iterdir())

    data = bytearray(blob("flipped").read_bytes())
    data[len(data) // 2] ^= 0x01
    blob("flipped").write_bytes(data)
    blob("truncated").write_bytes(blob("truncated").read_bytes()[:-10])
    blob("swapped").write_bytes(blob("scale").read_bytes())
    manifest = json.loads((bundle("edited") / "bundle.json").read_text())
    manifest["files"] = []
    (bundle("edited") / "bundle.json").write_text(json.dumps(manifest))
    # Signatures over the right digests, by a key the server does not trust.
    plain = (source / "model.onnx").read_bytes()
    stranger = SigningKey.generate()
    model_sig = sign_digests(
        {"model.onnx": hashlib.sha256(plain).digest()},
        stranger,
        model_name="resigned",
        signature_name=None,
    )
    (bundle("resigned") / "model.sig").write_bytes(model_sig)
    (bundle("resigned") / "load.sig").write_bytes(
        sign_digests(
            {
                "model.onnx": blake3.blake3(plain).digest(),
                ".model.sig": blake3.blake3(model_sig).digest(),
            },
            stranger,
            model_name="resigned",
            signature_name=None,
            algorithm="blake3",
        )
    )
    # The signed statement edited after signing.
    signature = json.loads((bundle("forged") / "load.sig").read_text())
    payload = signature["dsseEnvelope"]["payload"]
    signature["dsseEnvelope"]["payload"] = (
        payload[:40] + ("A" if payload[40] != "A" else "B") + payload[41:]
    )
    (bundle("forged") / "load.sig").write_text(json.dumps(signature))
    # The data key wrapped by another home's KEK, for the same model name and version.
    other = tmp_path / "other"
    run_cli(other, "init", "--no-demo-models")
    cli_json(other, "models", "import", str(source), "--name", "wrong-kek")
    theirs = json.loads((other / "bundles/wrong-kek/1/bundle.json").read_text())
    ours = json.loads((bundle("wrong-kek") / "bundle.json").read_text())
    ours["data_key"] = theirs["data_key"]
    (bundle("wrong-kek") / "bundle.json").write_text(json.dumps(ours))

    shutil.rmtree(home / "bundles/rolled/2")
    shutil.copytree(home / "bundles/rolled/1", home / "bundles/rolled/2")
    # Another model's whole bundle under this model's name.
    shutil.rmtree(home / "bundles/imposter/1")
    shutil.copytree(home / "bundles/scale/1", home / "bundles/imposter/1")

    reasons = {
        "rolled": "is not rolled version 2",
        "imposter": "is not imposter version 1",
        "flipped": "does not decrypt",
        "truncated": "does not decrypt",
        "swapped": "does not decrypt",
        "edited": "Signed file missing",
        "resigned": "not trusted",
        "forged": "load signature is not valid",
        "wrong-kek": "data key cannot be opened",
    }
    body = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
    }
    srv = BastionServer(home)
    try:
        srv.wait_ready(["scale"], timeout=120)
        with srv.client() as client:
            for name, reason in reasons.items():
                status = srv.wait_model(name, "integrity_failed", timeout=60)
                assert reason in status["detail"], (name, status["detail"])
                refused = client.post(f"/v2/models/{name}/infer", json=body)
                assert refused.status_code == 503, (name, refused.text)
            answer = client.post("/v2/models/scale/infer", json=body)
            assert answer.status_code == 200
            assert answer.json()["outputs"][0]["data"] == [3.0, 6.0, 9.0, 12.0]
            assert client.get("/healthz").status_code == 200
        # Each reason is distinct enough to act on, and none quotes the model's bytes.
        assert len({srv.wait_model(n, "integrity_failed")["detail"] for n in reasons}) >= 5
        logs = srv.logs()
        assert logs.count("model.integrity_failed") >= len(reasons)
        assert plain[-64:].hex() not in logs
    finally:
        srv.stop()
