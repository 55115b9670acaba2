"""The import scanner on a hostile corpus built here, and on clean models it must accept."""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import save_file

from bastion.errors import InvalidRequest
from bastion.models.scan import (
    FileKind,
    ScanLimits,
    UnsafeModel,
    open_scanned,
    scan_model,
)


class _CreatesMarker:
    """Unpickling this object would create the marker file (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _hf_dir(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 4}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {}}}))
    (root / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"})
    )
    (root / "README.md").write_text("# tiny\n")
    save_file(
        {"a": np.ones((2, 3), np.float32), "b": np.arange(5, dtype=np.int64)},
        str(root / "model.safetensors"),
    )
    return root


def _onnx_model(domain: str = "", external: str | None = None) -> onnx.ModelProto:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    if external is not None:
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "8")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
    node = helper.make_node("Add", ["x", "w"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [weight],
    )
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets)


def _refusal(source: Path, limits: ScanLimits | None = None) -> UnsafeModel:
    with pytest.raises(UnsafeModel) as caught:
        scan_model(source, limits)
    return caught.value


def _write_safetensors(path: Path, header: dict[str, object], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# --- acceptance ----------------------------------------------------------------------------------


def test_clean_hf_directory_is_accepted(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    report = scan_model(model)
    kinds = {f.path: f.kind for f in report.files}
    assert kinds == {
        "README.md": FileKind.TEXT,
        "config.json": FileKind.JSON,
        "model.safetensors": FileKind.SAFETENSORS,
        "tokenizer.json": FileKind.TOKENIZER,
        "tokenizer_config.json": FileKind.TOKENIZER,
    }
    assert report.skipped == (".gitattributes",)
    assert report.total_bytes == sum(p.stat().st_size for p in model.iterdir()) - len(
        "*.safetensors filter=lfs\n"
    )


def test_clean_onnx_file_and_directory_with_external_data_are_accepted(tmp_path: Path) -> None:
    single = tmp_path / "tiny.onnx"
    onnx.save(_onnx_model(), str(single))
    report = scan_model(single)
    assert [(f.path, f.kind) for f in report.files] == [("tiny.onnx", FileKind.ONNX)]
    assert report.root == tmp_path.resolve()

    directory = tmp_path / "ext"
    (directory / "weights").mkdir(parents=True)
    onnx.save(_onnx_model(external="weights/w.bin"), str(directory / "model.onnx"))
    (directory / "weights" / "w.bin").write_bytes(struct.pack("<2f", 1.0, 2.0))
    kinds = {f.path: f.kind for f in scan_model(directory).files}
    assert kinds == {"model.onnx": FileKind.ONNX, "weights/w.bin": FileKind.ONNX_DATA}


def test_com_microsoft_domain_is_allowed_by_default_but_configurable(tmp_path: Path) -> None:
    path = tmp_path / "ms.onnx"
    onnx.save(_onnx_model(domain="com.microsoft"), str(path))
    assert scan_model(path).files[0].kind is FileKind.ONNX
    strict = ScanLimits(onnx_allowed_domains=frozenset({"", "ai.onnx"}))
    assert "`com.microsoft` is not allowed" in _refusal(path, strict).reason


def test_open_scanned_refuses_a_file_replaced_after_the_scan(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    report = scan_model(model)
    config = next(f for f in report.files if f.path == "config.json")
    with open_scanned(report, config) as handle:
        assert json.loads(handle.read())["model_type"] == "bert"
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(model / "README.md")
    with pytest.raises(UnsafeModel, match="cannot be opened as a regular file"):
        open_scanned(report, config).__enter__()


# --- pickles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "vocab.txt", "model.onnx"])
def test_pickle_under_an_innocent_name_is_refused_and_never_unpickled(
    tmp_path: Path, name: str
) -> None:
    marker = tmp_path / "marker"
    model = tmp_path / "m"
    model.mkdir()
    (model / name).write_bytes(pickle.dumps(_CreatesMarker(marker), protocol=4))
    failure = _refusal(model)
    assert failure.path == name
    assert failure.reason.startswith("pickle content")
    assert "safetensors" in failure.reason
    assert not marker.exists()


def test_protocol_zero_pickle_is_recognised(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    model = tmp_path / "m"
    model.mkdir()
    (model / "notes.txt").write_bytes(pickle.dumps(_CreatesMarker(marker), protocol=0))
    assert _refusal(model).reason.startswith("pickle content")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt", ".joblib", ".npz"])
def test_pickle_extensions_are_refused_with_conversion_advice(tmp_path: Path, suffix: str) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / f"weights{suffix}").write_bytes(b"\x00" * 16)
    failure = _refusal(model)
    assert failure.reason.startswith(f"pickle-based format ({suffix})")
    assert "save_pretrained(safe_serialization=True)" in failure.reason


def test_npy_object_array_and_numeric_array_get_distinct_reasons(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    np.save(model / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "(.npy with Python objects)" in _refusal(model).reason
    (model / "objects.npy").unlink()
    np.save(model / "numbers.npy", np.zeros(3, np.float32))
    assert "no Bastion runtime loads .npy" in _refusal(model).reason


def test_torch_style_zip_with_pickle_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    with zipfile.ZipFile(model / "model.safetensors", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02N.")
    assert "zip with pickle inside" in _refusal(model).reason


# --- file system tricks --------------------------------------------------------------------------


def test_symlink_escaping_the_source_is_refused(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    (model / "passwd.txt").symlink_to("../../../../etc/passwd")
    failure = _refusal(model)
    assert failure.path == "passwd.txt"
    assert failure.reason.startswith("symbolic link")


def test_symlinked_directory_and_symlinked_source_are_refused(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    (model / "sub").symlink_to(tmp_path)
    assert _refusal(model).reason.startswith("symbolic link")
    (model / "sub").unlink()
    (tmp_path / "link").symlink_to(model)
    assert _refusal(tmp_path / "link").reason.startswith("source is a symbolic link")


def test_hard_link_is_refused(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    os.link(model / "config.json", tmp_path / "elsewhere.json")
    failure = _refusal(model)
    assert failure.path == "config.json"
    assert failure.reason.startswith("hard link (2 names)")


def test_fifo_and_socket_are_refused_without_blocking(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    os.mkfifo(model / "pipe.json")
    assert _refusal(model).reason.startswith("FIFO")
    (model / "pipe.json").unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(model / "sock"))
        assert _refusal(model).reason.startswith("socket")


def test_hidden_file_and_control_characters_in_names_are_refused(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    (model / ".env").write_text("x")
    assert _refusal(model).reason.startswith("hidden file")
    (model / ".env").unlink()
    (model / "bad\x1b[2J.txt").write_text("x")
    failure = _refusal(model)
    assert "\x1b" not in str(failure)
    assert failure.reason.startswith("file name contains control characters")


# --- ONNX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("../../etc/passwd", "escapes the model directory"),
        ("/etc/passwd", "absolute path"),
        ("C:/Windows/win.ini", "absolute path"),
        ("missing.bin", "missing from the model directory"),
    ],
)
def test_onnx_external_data_outside_the_bundle_is_refused(
    tmp_path: Path, location: str, reason: str
) -> None:
    model = tmp_path / "m"
    model.mkdir()
    onnx.save(_onnx_model(external=location), str(model / "model.onnx"))
    failure = _refusal(model)
    assert failure.path == "model.onnx"
    assert reason in failure.reason


def test_onnx_external_data_past_the_end_of_its_file_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    onnx.save(_onnx_model(external="w.data"), str(model / "model.onnx"))
    (model / "w.data").write_bytes(b"\x00" * 4)
    assert "outside its data file" in _refusal(model).reason


def test_single_onnx_file_with_external_data_is_refused(tmp_path: Path) -> None:
    onnx.save(_onnx_model(external="w.data"), str(tmp_path / "model.onnx"))
    (tmp_path / "w.data").write_bytes(b"\x00" * 8)
    assert "import its directory" in _refusal(tmp_path / "model.onnx").reason


def test_onnx_custom_op_domain_is_refused_also_inside_subgraphs(tmp_path: Path) -> None:
    path = tmp_path / "custom.onnx"
    onnx.save(_onnx_model(domain="evil.ops"), str(path))
    assert "`evil.ops` is not allowed" in _refusal(path).reason

    inner = helper.make_graph(
        [helper.make_node("Run", [], ["z"], domain="evil.ops")],
        "branch",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
    )
    cond = helper.make_node("If", ["c"], ["z"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph(
        [cond],
        "outer",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(path))
    assert "`evil.ops` is not allowed" in _refusal(path).reason


def test_onnx_model_local_function_is_allowed_but_its_body_is_checked(tmp_path: Path) -> None:
    def model_with_body(domain: str) -> onnx.ModelProto:
        body = [helper.make_node("Neg", ["a"], ["b"], domain=domain)]
        function = helper.make_function(
            "local", "MyNeg", ["a"], ["b"], body, [helper.make_opsetid("", 17)]
        )
        graph = helper.make_graph(
            [helper.make_node("MyNeg", ["x"], ["y"], domain="local")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
        return helper.make_model(graph, functions=[function], opset_imports=opsets)

    path = tmp_path / "f.onnx"
    onnx.save(model_with_body(""), str(path))
    assert scan_model(path).files[0].kind is FileKind.ONNX
    onnx.save(model_with_body("evil.ops"), str(path))
    assert "`evil.ops` is not allowed" in _refusal(path).reason


def test_garbage_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
    assert _refusal(path).reason == "not a valid ONNX model"


# --- safetensors ---------------------------------------------------------------------------------


def test_safetensors_header_over_the_cap_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    failure = _refusal(path)
    assert "header of 100000001 bytes exceeds the cap of 100000000" in failure.reason


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\x00" * 12,
            "overlaps another tensor",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\x00" * 4,
            "lies outside the file",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\x00" * 16,
            "8 bytes no tensor covers",
        ),
        (
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\x00" * 8,
            "shape and dtype do not match",
        ),
        (
            {"a": {"dtype": "OBJ", "shape": [2], "data_offsets": [0, 8]}},
            b"\x00" * 8,
            "unknown dtype",
        ),
        (
            {"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}},
            b"\x00" * 4,
            "gap before tensor",
        ),
    ],
)
def test_inconsistent_safetensors_headers_are_refused(
    tmp_path: Path, header: dict[str, object], data: bytes, reason: str
) -> None:
    path = tmp_path / "bad.safetensors"
    _write_safetensors(path, header, data)
    assert reason in _refusal(path).reason


def test_safetensors_with_invalid_json_or_duplicate_names_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00")
    assert _refusal(path).reason == "safetensors header: invalid JSON"
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    raw = f'{{"a": {entry}, "a": {entry}}}'.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00")
    assert _refusal(path).reason == "safetensors header: duplicate keys"


# --- configs, code, archives, unknown files ------------------------------------------------------


def test_remote_code_config_is_refused_even_when_nested(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    config = {"model_type": "x", "nested": [{"deeper": {"auto_map": {"AutoModel": "m.M"}}}]}
    (model / "config.json").write_text(json.dumps(config))
    failure = _refusal(model)
    assert failure.path == "config.json"
    assert failure.reason.startswith("remote-code entry `auto_map`")
    assert "m.M" not in str(failure)


def test_trust_remote_code_in_tokenizer_config_is_refused(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    (model / "tokenizer_config.json").write_text(json.dumps({"trust_remote_code": True}))
    assert _refusal(model).reason.startswith("remote-code entry `trust_remote_code`")


def test_custom_code_file_is_refused(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    (model / "sub").mkdir()
    (model / "sub" / "modeling_evil.py").write_text("import os\n")
    failure = _refusal(model)
    assert failure.path == "sub/modeling_evil.py"
    assert failure.reason.startswith("custom code (.py)")


def test_archives_are_refused_by_name_and_by_content(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    with zipfile.ZipFile(model / "extra.zip", "w") as archive:
        archive.writestr("a.txt", "x")
    assert _refusal(model).reason.startswith("archive (.zip)")
    (model / "extra.zip").rename(model / "extra.txt")
    assert _refusal(model).reason.startswith("zip archive (by content)")


def test_unknown_file_type_lists_what_is_accepted(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    (model / "model.gguf").write_bytes(b"GGUF")
    failure = _refusal(model)
    assert failure.reason.startswith("unsupported file type; accepted:")
    assert "*.safetensors" in failure.reason


def test_size_limits_apply(tmp_path: Path) -> None:
    model = _hf_dir(tmp_path / "m")
    assert "over the limit of 10" in _refusal(model, ScanLimits(max_json_bytes=10)).reason
    assert "more than 2 files" in _refusal(model, ScanLimits(max_files=2)).reason
    assert "total limit" in _refusal(model, ScanLimits(max_total_bytes=100)).reason


def test_unsafe_model_is_a_400_with_its_own_code(tmp_path: Path) -> None:
    failure = _refusal(tmp_path / "absent")
    assert isinstance(failure, InvalidRequest)
    assert failure.status == 400
    assert failure.code == "unsafe_model"


def test_safetensors_whose_length_bytes_resemble_pickle_magic_is_accepted(tmp_path: Path) -> None:
    # A 640-byte header starts the file with 0x80 0x02, the bytes of a protocol-2 pickle.
    path = tmp_path / "padded.safetensors"
    entry = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    raw = json.dumps({"a": entry}).encode()
    raw += b" " * (0x280 - len(raw))
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x07")
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert scan_model(path).files[0].kind is FileKind.SAFETENSORS
