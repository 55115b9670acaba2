"""Import scanner: accept only model files Bastion can load without running their code.

``scan_model`` walks a Hugging Face style directory, a single ``.onnx`` file or a single
``.safetensors`` file and returns the files to import, or raises ``UnsafeModel`` naming the file
and the specific reason. Nothing is ever unpickled, imported or executed: pickles are recognised
by parsing opcodes (``pickletools``), safetensors by their 8-byte length and JSON header only, and
ONNX by its protobuf without external data.

Decisions (the lead's threat model relies on them):

- Files are opened relative to directory descriptors with ``O_NOFOLLOW``, and each open file is
  checked to be the inode the walk saw, so a path swapped for a symlink mid-scan is refused.
  ``open_scanned`` gives the importer the same guarantee (and refuses a file changed since).
- Refused outright: symlinks, hard links (``st_nlink > 1``), FIFOs, sockets, devices; names that
  are hidden, not UTF-8, or contain control characters or backslashes. The hub/VCS metadata
  ``.git``, ``.gitattributes``, ``.gitignore``, ``.cache``, ``.huggingface`` at the top level are
  skipped unopened and listed in ``ScanReport.skipped`` (no runtime reads them).
- ``.npy``: refused either way. Its header is read (``ast.literal_eval``, never pickle) only to say
  why: object dtypes are pickle-based; numeric arrays are simply no format any runtime loads.
- ONNX op domains allowed by default: ``""``, ``ai.onnx``, ``ai.onnx.ml`` (standard) and
  ``com.microsoft`` (contrib kernels built into ONNX Runtime, no library is loaded). Nodes calling
  a function defined in the model itself are allowed; the function bodies are checked too.
- ONNX external data must be a relative path inside the bundle, to a data file of the scan
  (kind ``onnx_data``), with offset+length inside that file. Such a data file may carry a ``.bin``
  name (common for ONNX); it is still refused if its content is a pickle or an archive.
- JSON anywhere: refuse the keys ``auto_map``, ``trust_remote_code``, ``custom_pipelines`` and
  Hydra's ``_target_`` at any depth, duplicate keys, NaN/Infinity, and nesting over the limit.
  Chat templates are allowed (they are rendered in a sandbox elsewhere).

The checks live one per module: :mod:`.files` (walking and opening), :mod:`.sniff`
(content), :mod:`.structured` (JSON, text), :mod:`.safetensors`, :mod:`.onnx`, :mod:`.npy`;
:mod:`.report` holds what a scan returns or raises.
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path
from typing import BinaryIO

from bastion.models.scan.files import Found, check_type, identity, open_at, open_scanned, walk
from bastion.models.scan.npy import npy_reason
from bastion.models.scan.onnx import check_onnx
from bastion.models.scan.report import (
    CONVERT,
    DEFAULT_ONNX_DOMAINS,
    DIR_FLAGS,
    FileKind,
    ScanLimits,
    ScannedFile,
    ScanReport,
    UnsafeModel,
    limits_from_settings,
)
from bastion.models.scan.safetensors import check_safetensors
from bastion.models.scan.sniff import sniff
from bastion.models.scan.structured import check_json_config, check_text, parse_json, read_all

__all__ = [
    "DEFAULT_ONNX_DOMAINS",
    "FileKind",
    "ScanLimits",
    "ScanReport",
    "ScannedFile",
    "UnsafeModel",
    "limits_from_settings",
    "open_scanned",
    "scan_model",
]


_PICKLE_EXTENSIONS = frozenset({
    ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npz", ".dill", ".sav",
})  # fmt: skip


_ARCHIVE_EXTENSIONS = frozenset({
    ".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".lz4", ".lzma",
})  # fmt: skip


_CODE_EXTENSIONS = frozenset({
    ".py", ".pyc", ".pyo", ".pyd", ".so", ".dll", ".dylib", ".sh", ".ipynb", ".js",
})  # fmt: skip


_TOKENIZER_NAMES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "added_tokens.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model",
})  # fmt: skip


_TEXT_STEMS = frozenset({"license", "licence", "notice", "readme", "copying"})


_ACCEPTED = (
    "accepted: *.safetensors, *.onnx (+ its external data), *.json, *.txt, *.md, *.jinja, "
    "tokenizer files (tokenizer.model, vocab.txt, merges.txt, ...), LICENSE/README/NOTICE"
)


def _kind_by_name(rel: str) -> FileKind | None:
    name = posixpath.basename(rel).lower()
    suffix = posixpath.splitext(name)[1]
    if name in _TOKENIZER_NAMES:
        return FileKind.TOKENIZER
    if suffix == ".safetensors":
        return FileKind.SAFETENSORS
    if suffix == ".onnx":
        return FileKind.ONNX
    if suffix == ".json":
        return FileKind.JSON
    if suffix in {".txt", ".md", ".jinja"} or posixpath.splitext(name)[0] in _TEXT_STEMS:
        return FileKind.TEXT
    return None


def _refuse_by_extension(rel: str, handle: BinaryIO) -> None:
    suffixes = [s.lower() for s in Path(rel).suffixes]
    suffix = suffixes[-1] if suffixes else ""
    if suffix == ".npy":
        raise UnsafeModel(rel, npy_reason(handle))
    if suffix in _PICKLE_EXTENSIONS:
        raise UnsafeModel(rel, f"pickle-based format ({suffix}): {CONVERT}")
    if suffix in _ARCHIVE_EXTENSIONS or ".tar" in suffixes:
        raise UnsafeModel(rel, f"archive ({suffix}): unpack it and import the files")
    if suffix in _CODE_EXTENSIONS:
        raise UnsafeModel(
            rel, f"custom code ({suffix}): Bastion never runs code shipped with a model"
        )


def _validate(rel: str, kind: FileKind, handle: BinaryIO, size: int, limits: ScanLimits) -> None:
    if kind is FileKind.SAFETENSORS:
        check_safetensors(rel, handle, size, limits)
    elif kind is FileKind.JSON or rel.endswith(".json"):
        data = read_all(rel, handle, size, limits.max_json_bytes, "JSON file")
        check_json_config(rel, parse_json(rel, data, "JSON file"), limits.max_json_depth)
    elif kind is FileKind.TEXT or rel.endswith(".txt"):
        check_text(rel, read_all(rel, handle, size, limits.max_text_bytes, "text file"))
    elif kind is FileKind.TOKENIZER:  # a binary sentencepiece model: size-limited, sniffed
        read_all(rel, handle, size, limits.max_text_bytes, "tokenizer file")


def _locate(source: Path) -> tuple[Path, list[Found]]:
    """Resolve the source into a root directory plus either its walk or one named file."""
    try:
        st = os.lstat(source)
    except OSError as exc:
        raise UnsafeModel(source.name or ".", "source does not exist or cannot be read") from exc
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeModel(source.name, "source is a symbolic link: pass the real path")
    check_type(source.name, st)
    if stat.S_ISDIR(st.st_mode):
        return source.resolve(strict=True), []
    return source.parent.resolve(strict=True), [Found(source.name, st)]


def scan_model(source: Path, limits: ScanLimits | None = None) -> ScanReport:
    """Scan a model directory, ``.onnx`` or ``.safetensors`` file; raise UnsafeModel if unsafe."""
    limits = limits or ScanLimits()
    root, found = _locate(source)
    skipped: list[str] = []
    single = bool(found)
    if single:
        kind = _kind_by_name(found[0].path)
        if kind not in (FileKind.ONNX, FileKind.SAFETENSORS):
            with open_at(root, found[0].path, identity(found[0].st)) as handle:
                _refuse_by_extension(found[0].path, handle)
            raise UnsafeModel(found[0].path, "a single file must be .onnx or .safetensors")
    else:
        root_fd = os.open(root, DIR_FLAGS)
        try:
            walk(root_fd, "", 0, limits, found, skipped)
        finally:
            os.close(root_fd)
    by_path = {f.path: f for f in found}
    total = 0
    for item in found:
        if item.st.st_size > limits.max_file_bytes:
            raise UnsafeModel(
                item.path,
                f"file of {item.st.st_size} bytes is over the limit of {limits.max_file_bytes} "
                "bytes (BASTION_IMPORT_MAX_FILE_BYTES)",
            )
        total += item.st.st_size
        if total > limits.max_total_bytes:
            raise UnsafeModel(
                ".",
                f"model is over the total limit of {limits.max_total_bytes} bytes "
                "(BASTION_IMPORT_MAX_TOTAL_BYTES)",
            )

    # ONNX models first: they decide which other files are their external data.
    external: dict[str, int] = {}
    for item in found:
        if _kind_by_name(item.path) is FileKind.ONNX:
            with open_at(root, item.path, identity(item.st)) as handle:
                sniff(item.path, handle, item.st.st_size)
                needed = check_onnx(item.path, handle, item.st.st_size, limits, by_path, single)
            for target, end in needed.items():
                external[target] = max(external.get(target, 0), end)

    accepted: list[ScannedFile] = []
    for item in found:
        size = item.st.st_size
        with open_at(root, item.path, identity(item.st)) as handle:
            kind = _kind_by_name(item.path)
            if item.path in external:
                if kind is not None:
                    raise UnsafeModel(item.path, f"ONNX external data cannot be a {kind} file")
                kind = FileKind.ONNX_DATA
            else:
                _refuse_by_extension(item.path, handle)
            if kind is None:
                raise UnsafeModel(item.path, f"unsupported file type; {_ACCEPTED}")
            if kind is not FileKind.ONNX:
                sniff(item.path, handle, size)
                _validate(item.path, kind, handle, size, limits)
        accepted.append(
            ScannedFile(item.path, size, kind, item.st.st_dev, item.st.st_ino, item.st.st_mtime_ns)
        )
    return ScanReport(root=root, files=tuple(accepted), skipped=tuple(skipped))
