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
"""

from __future__ import annotations

import ast
import contextlib
import enum
import io
import json
import os
import pickletools
import posixpath
import re
import stat
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, BinaryIO

import onnx

from bastion.errors import InvalidRequest

if TYPE_CHECKING:
    from bastion.config import Settings

_GIB = 1 << 30
_MIB = 1 << 20


class FileKind(enum.StrEnum):
    """What a scanned file is, which decides how it is loaded later."""

    SAFETENSORS = "safetensors"
    ONNX = "onnx"
    ONNX_DATA = "onnx_data"
    JSON = "json"
    TEXT = "text"
    TOKENIZER = "tokenizer"


DEFAULT_ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


@dataclass(frozen=True)
class ScanLimits:
    """Size and policy limits of a scan; every field is configurable."""

    max_file_bytes: int = 64 * _GIB
    max_total_bytes: int = 512 * _GIB
    max_files: int = 10_000
    max_depth: int = 16
    # The safetensors format's own cap (MAX_HEADER_SIZE in the reference implementation).
    max_safetensors_header_bytes: int = 100_000_000
    max_json_bytes: int = 64 * _MIB
    max_json_depth: int = 64
    max_text_bytes: int = 64 * _MIB
    # Protobuf cannot parse a message of 2 GiB or more; bigger models use external data.
    max_onnx_model_bytes: int = 2 * _GIB - 1
    onnx_allowed_domains: frozenset[str] = field(default=DEFAULT_ONNX_DOMAINS)


def limits_from_settings(settings: Settings) -> ScanLimits:
    """The import limits a home's configuration sets (BASTION_IMPORT_*)."""
    for name in ("import_max_file_bytes", "import_max_total_bytes", "import_max_files"):
        if getattr(settings, name) <= 0:
            raise InvalidRequest(f"BASTION_{name.upper()} must be a positive number.")
    extra = {d.strip() for d in settings.import_onnx_domains.split(",") if d.strip()}
    return ScanLimits(
        max_file_bytes=settings.import_max_file_bytes,
        max_total_bytes=settings.import_max_total_bytes,
        max_files=settings.import_max_files,
        onnx_allowed_domains=DEFAULT_ONNX_DOMAINS | extra,
    )


@dataclass(frozen=True)
class ScannedFile:
    """One accepted file; the identity fields let the importer detect a later swap."""

    path: str  # relative POSIX path inside the source
    size: int
    kind: FileKind
    device: int
    inode: int
    mtime_ns: int


@dataclass(frozen=True)
class ScanReport:
    """The accepted files of a source, relative to ``root``."""

    root: Path  # the directory the paths are relative to
    files: tuple[ScannedFile, ...]
    skipped: tuple[str, ...]  # hub/VCS metadata left out unopened

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class UnsafeModel(InvalidRequest):
    """A model file was refused; ``path`` and ``reason`` never contain file contents."""

    code = "unsafe_model"

    def __init__(self, path: str, reason: str) -> None:
        self.path = _printable(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


_CONVERT = (
    "convert it to safetensors (e.g. with `transformers`' save_pretrained(safe_serialization=True))"
)
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
_SKIPPED_TOP_LEVEL = frozenset({".git", ".gitattributes", ".gitignore", ".cache", ".huggingface"})
_REMOTE_CODE_KEYS = frozenset({"auto_map", "trust_remote_code", "custom_pipelines", "_target_"})
_ACCEPTED = (
    "accepted: *.safetensors, *.onnx (+ its external data), *.json, *.txt, *.md, *.jinja, "
    "tokenizer files (tokenizer.model, vocab.txt, merges.txt, ...), LICENSE/README/NOTICE"
)

# safetensors dtypes and their sizes in bits, as in the reference implementation.
_SAFETENSORS_DTYPE_BITS: Mapping[str, int] = MappingProxyType({
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
    "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
})  # fmt: skip

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SNIFF_BYTES = 1 * _MIB
_ZIP_TAIL_BYTES = 22 + 65535  # end-of-central-directory record + the longest comment
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\\]")


def _printable(path: str) -> str:
    """Escape what could forge output (control characters, backslashes, lone surrogates)."""
    text = path.encode("utf-8", "backslashreplace").decode("utf-8")
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# --- walking -------------------------------------------------------------------------------------


@dataclass
class _Found:
    path: str
    st: os.stat_result


def _check_name(rel: str, name: str) -> None:
    if _UNPRINTABLE.search(name) or "/" in name:
        raise UnsafeModel(rel, "file name contains control characters or a backslash")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeModel(rel, "file name is not valid UTF-8") from None
    if name.startswith("."):
        raise UnsafeModel(rel, "hidden file: remove it before import")


def _check_type(rel: str, st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise UnsafeModel(rel, "symbolic link: copy the real file into the model directory")
    if stat.S_ISFIFO(mode):
        raise UnsafeModel(rel, "FIFO (named pipe): only regular files can be imported")
    if stat.S_ISSOCK(mode):
        raise UnsafeModel(rel, "socket: only regular files can be imported")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise UnsafeModel(rel, "device file: only regular files can be imported")
    if stat.S_ISREG(mode) and st.st_nlink > 1:
        raise UnsafeModel(rel, f"hard link ({st.st_nlink} names): copy the file instead")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UnsafeModel(rel, "not a regular file")


def _walk(
    dir_fd: int,
    prefix: str,
    depth: int,
    limits: ScanLimits,
    found: list[_Found],
    skipped: list[str],
) -> None:
    if depth > limits.max_depth:
        raise UnsafeModel(prefix, f"directories nested deeper than {limits.max_depth}")
    with os.scandir(dir_fd) as entries:
        ordered = sorted(entries, key=lambda e: e.name)
    for entry in ordered:
        rel = f"{prefix}/{entry.name}" if prefix else entry.name
        if not prefix and entry.name in _SKIPPED_TOP_LEVEL:
            skipped.append(entry.name)
            continue
        _check_name(rel, entry.name)
        st = entry.stat(follow_symlinks=False)
        _check_type(rel, st)
        if len(found) >= limits.max_files:
            raise UnsafeModel(".", f"more than {limits.max_files} files (BASTION_IMPORT_MAX_FILES)")
        if stat.S_ISDIR(st.st_mode):
            sub_fd = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                if not _same_inode(os.fstat(sub_fd), st):
                    raise UnsafeModel(rel, "directory changed during the scan")
                _walk(sub_fd, rel, depth + 1, limits, found, skipped)
            finally:
                os.close(sub_fd)
        else:
            found.append(_Found(rel, st))


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def _open_at(root: Path, rel: str, expected: tuple[int, int, int, int]) -> Iterator[BinaryIO]:
    """Open ``root/rel`` following no link, and check it is still the file that was scanned."""
    fds = [os.open(root, _DIR_FLAGS)]
    try:
        *dirs, name = rel.split("/")
        for part in dirs:
            fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
        fd = os.open(name, _OPEN_FLAGS, dir_fd=fds[-1])
    except OSError as exc:
        raise UnsafeModel(rel, "cannot be opened as a regular file (moved or replaced?)") from exc
    finally:
        for opened in fds:
            os.close(opened)
    with os.fdopen(fd, "rb") as handle:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or now.st_nlink != 1 or _identity(now) != expected:
            raise UnsafeModel(rel, "file was replaced or changed since it was scanned")
        yield handle


def open_scanned(
    report: ScanReport, scanned: ScannedFile
) -> contextlib.AbstractContextManager[BinaryIO]:
    """Open a scanned file for import; raises UnsafeModel if it was replaced or changed since."""
    expected = (scanned.device, scanned.inode, scanned.size, scanned.mtime_ns)
    return _open_at(report.root, scanned.path, expected)


# --- content sniffing ----------------------------------------------------------------------------


class _BoundedStream(io.BytesIO):
    """A prefix of a file that records whether a parser ran off its end."""

    exhausted = False

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        if size is not None and size >= 0 and len(data) < size:
            self.exhausted = True
        return data

    def readline(self, size: int | None = -1, /) -> bytes:
        line = super().readline(size)
        if not line.endswith(b"\n"):
            self.exhausted = True
        return line


_IMPORT_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST"})


def _looks_like_pickle(prefix: bytes) -> bool:
    """True if the bytes parse as pickle opcodes (never executed) that import or declare a protocol.

    A parse that runs off the end of the prefix still counts: an unpickler would already have
    run the opcodes it read.
    """
    stream = _BoundedStream(prefix)
    saw_import = saw_proto = False
    try:
        for opcode, _arg, pos in pickletools.genops(stream):
            saw_proto |= opcode.name == "PROTO" and pos == 0
            saw_import |= opcode.name in _IMPORT_OPCODES
    except ValueError:
        if not stream.exhausted:
            return False
    except Exception:  # any other parse failure means "not a pickle"
        return False
    return saw_import or saw_proto


def _sniff(rel: str, handle: BinaryIO, size: int) -> None:
    handle.seek(0)
    head = handle.read(min(size, _SNIFF_BYTES))
    if _looks_like_pickle(head):
        raise UnsafeModel(rel, f"pickle content (whatever its name says): {_CONVERT}")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or _has_zip_directory(handle, size):
        raise UnsafeModel(rel, _zip_reason(handle))
    archive = _archive_magic(head)
    if archive:
        raise UnsafeModel(rel, f"{archive} archive (by content): unpack it and import the files")


def _has_zip_directory(handle: BinaryIO, size: int) -> bool:
    # Zip readers (torch.load included) find the archive from its end, so a valid-looking file
    # with a zip appended is a polyglot.
    tail = min(size, _ZIP_TAIL_BYTES)
    handle.seek(size - tail)
    return b"PK\x05\x06" in handle.read(tail)


def _zip_reason(handle: BinaryIO) -> str:
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        names = []
    if any(name.endswith(".pkl") for name in names):
        return f"zip with pickle inside (PyTorch checkpoint): {_CONVERT}"
    return "zip archive (by content): unpack it and import the files"


def _archive_magic(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7z"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"Rar!\x1a\x07"):
        return "rar"
    if re.match(rb"BZh[1-9]1AY&SY", head):
        return "bzip2"
    if head[257:262] == b"ustar":
        return "tar"
    return None


# --- per-format validation -----------------------------------------------------------------------


def _read_all(rel: str, handle: BinaryIO, size: int, cap: int, what: str) -> bytes:
    if size > cap:
        raise UnsafeModel(rel, f"{what} of {size} bytes is over the limit of {cap}")
    handle.seek(0)
    return handle.read(size)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate key")
        result[key] = value
    return result


def _parse_json(rel: str, data: bytes, what: str) -> Any:
    try:
        return json.loads(
            data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_reject_constant
        )
    except UnicodeDecodeError:
        raise UnsafeModel(rel, f"{what} is not valid UTF-8") from None
    except RecursionError:
        raise UnsafeModel(rel, f"{what} is nested too deeply") from None
    except ValueError as exc:
        detail = "duplicate keys" if "duplicate key" in str(exc) else "invalid JSON"
        raise UnsafeModel(rel, f"{what}: {detail}") from None


def _check_json_config(rel: str, value: Any, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise UnsafeModel(rel, f"JSON nested deeper than {max_depth}")
        if isinstance(node, dict):
            for key, child in node.items():
                if key.lower() in _REMOTE_CODE_KEYS:
                    raise UnsafeModel(
                        rel,
                        f"remote-code entry `{key.lower()}`: Bastion never runs code shipped "
                        "with a model; use a model supported without custom code",
                    )
                stack.append((child, depth + 1))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


def _check_text(rel: str, data: bytes) -> None:
    if b"\x00" in data:
        raise UnsafeModel(rel, "text file contains NUL bytes")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeModel(rel, "text file is not valid UTF-8") from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_safetensors(rel: str, handle: BinaryIO, size: int, limits: ScanLimits) -> None:
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise UnsafeModel(rel, "safetensors file shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    cap = limits.max_safetensors_header_bytes
    if header_len > cap:
        raise UnsafeModel(rel, f"safetensors header of {header_len} bytes exceeds the cap of {cap}")
    if 8 + header_len > size:
        raise UnsafeModel(rel, "safetensors header length runs past the end of the file")
    raw = handle.read(header_len)
    if not raw.startswith(b"{"):
        raise UnsafeModel(rel, "safetensors header does not start with `{`")
    header = _parse_json(rel, raw, "safetensors header")
    if not isinstance(header, dict):
        raise UnsafeModel(rel, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnsafeModel(rel, "safetensors __metadata__ must map strings to strings")
    extents: list[tuple[int, int, str]] = []
    for name, info in header.items():
        shown = _printable(name)[:80]
        if not isinstance(info, dict):
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPE_BITS:
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` has an unknown dtype")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` has invalid data_offsets")
        elements = 1
        for dim in shape:
            elements *= dim
        bits = elements * _SAFETENSORS_DTYPE_BITS[dtype]
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise UnsafeModel(
                rel, f"safetensors tensor `{shown}`: shape and dtype do not match its size"
            )
        extents.append((offsets[0], offsets[1], shown))
    data_len = size - 8 - header_len
    position = 0
    for begin, end, shown in sorted(extents):
        if begin < position:
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` overlaps another tensor")
        if begin > position:
            raise UnsafeModel(rel, f"safetensors data has a gap before tensor `{shown}`")
        if end > data_len:
            raise UnsafeModel(rel, f"safetensors tensor `{shown}` lies outside the file")
        position = end
    if position != data_len:
        raise UnsafeModel(
            rel, f"safetensors data section has {data_len - position} bytes no tensor covers"
        )


def _onnx_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """Every graph of a model: the main one, training graphs, and all nested subgraphs."""
    stack = [model.graph]
    for info in model.training_info:
        stack.extend([info.initialization, info.algorithm])
    nodes_of_functions = [node for function in model.functions for node in function.node]
    stack.extend(_subgraphs(nodes_of_functions))
    while stack:
        graph = stack.pop()
        yield graph
        stack.extend(_subgraphs(graph.node))


def _subgraphs(nodes: Any) -> Iterator[onnx.GraphProto]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield attribute.g
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                yield from attribute.graphs


def _onnx_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    def from_nodes(nodes: Any) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attribute in node.attribute:
                yield attribute.t
                yield from attribute.tensors
                for sparse in [attribute.sparse_tensor, *attribute.sparse_tensors]:
                    yield from (sparse.values, sparse.indices)

    for function in model.functions:
        yield from from_nodes(function.node)
    for graph in _onnx_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from from_nodes(graph.node)


def _check_onnx(
    rel: str,
    handle: BinaryIO,
    size: int,
    limits: ScanLimits,
    files: dict[str, _Found],
    single_file: bool,
) -> dict[str, int]:
    """Validate an ONNX model; returns external data files it needs and the extent each needs."""
    data = _read_all(rel, handle, size, limits.max_onnx_model_bytes, "ONNX model")
    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # protobuf's DecodeError and onnx's errors share no narrower base
        raise UnsafeModel(rel, "not a valid ONNX model") from None
    local_functions = {(f.domain, f.name) for f in model.functions}
    node_lists = [graph.node for graph in _onnx_graphs(model)]
    node_lists += [function.node for function in model.functions]
    for nodes in node_lists:
        for node in nodes:
            domain = node.domain
            if domain in limits.onnx_allowed_domains or (domain, node.op_type) in local_functions:
                continue
            raise UnsafeModel(
                rel,
                f"ONNX operator domain `{_printable(domain)[:80]}` is not allowed (custom ops "
                f"load native code); allowed: {sorted(limits.onnx_allowed_domains)}",
            )
    needed: dict[str, int] = {}
    base = posixpath.dirname(rel)
    for tensor in _onnx_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if single_file:
            raise UnsafeModel(rel, "ONNX model with external data: import its directory")
        target, end = _external_extent(rel, base, tensor, files)
        needed[target] = max(needed.get(target, 0), end)
    return needed


def _external_extent(
    rel: str, base: str, tensor: onnx.TensorProto, files: dict[str, _Found]
) -> tuple[str, int]:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    if not location or "\x00" in location:
        raise UnsafeModel(rel, "ONNX external data without a location")
    if location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location):
        raise UnsafeModel(rel, "ONNX external data with an absolute path")
    if "\\" in location or ".." in location.split("/"):
        raise UnsafeModel(rel, "ONNX external data path escapes the model directory (`..`)")
    target = posixpath.normpath(posixpath.join(base, location))
    if target not in files:
        raise UnsafeModel(rel, "ONNX external data file is missing from the model directory")
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries.get("length", "-1"))
    except ValueError:
        raise UnsafeModel(rel, "ONNX external data offset/length is not a number") from None
    size = files[target].st.st_size
    end = size if length < 0 else offset + length
    if offset < 0 or end > size:
        raise UnsafeModel(rel, "ONNX external data lies outside its data file")
    return target, end


def _npy_reason(handle: BinaryIO) -> str:
    """Say why a .npy is refused, reading only its header (a Python literal, never a pickle)."""
    handle.seek(0)
    head = handle.read(12)
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        return f"not a valid .npy file; {_CONVERT}"
    if head[6] == 1:
        (length,), start = struct.unpack("<H", head[8:10]), 10
    else:
        (length,), start = struct.unpack("<I", head[8:12]), 12
    handle.seek(start)
    try:
        header = ast.literal_eval(handle.read(min(length, 65536)).decode("latin-1"))
        descr = str(header["descr"])
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError):
        return f"not a valid .npy file; {_CONVERT}"
    if "O" in descr:
        return f"pickle-based format (.npy with Python objects): {_CONVERT}"
    return "NumPy array file: no Bastion runtime loads .npy; store the arrays as safetensors"


# --- the scan ------------------------------------------------------------------------------------


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
        raise UnsafeModel(rel, _npy_reason(handle))
    if suffix in _PICKLE_EXTENSIONS:
        raise UnsafeModel(rel, f"pickle-based format ({suffix}): {_CONVERT}")
    if suffix in _ARCHIVE_EXTENSIONS or ".tar" in suffixes:
        raise UnsafeModel(rel, f"archive ({suffix}): unpack it and import the files")
    if suffix in _CODE_EXTENSIONS:
        raise UnsafeModel(
            rel, f"custom code ({suffix}): Bastion never runs code shipped with a model"
        )


def _validate(rel: str, kind: FileKind, handle: BinaryIO, size: int, limits: ScanLimits) -> None:
    if kind is FileKind.SAFETENSORS:
        _check_safetensors(rel, handle, size, limits)
    elif kind is FileKind.JSON or rel.endswith(".json"):
        data = _read_all(rel, handle, size, limits.max_json_bytes, "JSON file")
        _check_json_config(rel, _parse_json(rel, data, "JSON file"), limits.max_json_depth)
    elif kind is FileKind.TEXT or rel.endswith(".txt"):
        _check_text(rel, _read_all(rel, handle, size, limits.max_text_bytes, "text file"))
    elif kind is FileKind.TOKENIZER:  # a binary sentencepiece model: size-limited, sniffed
        _read_all(rel, handle, size, limits.max_text_bytes, "tokenizer file")


def _locate(source: Path) -> tuple[Path, list[_Found]]:
    """Resolve the source into a root directory plus either its walk or one named file."""
    try:
        st = os.lstat(source)
    except OSError as exc:
        raise UnsafeModel(source.name or ".", "source does not exist or cannot be read") from exc
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeModel(source.name, "source is a symbolic link: pass the real path")
    _check_type(source.name, st)
    if stat.S_ISDIR(st.st_mode):
        return source.resolve(strict=True), []
    return source.parent.resolve(strict=True), [_Found(source.name, st)]


def scan_model(source: Path, limits: ScanLimits | None = None) -> ScanReport:
    """Scan a model directory, ``.onnx`` or ``.safetensors`` file; raise UnsafeModel if unsafe."""
    limits = limits or ScanLimits()
    root, found = _locate(source)
    skipped: list[str] = []
    single = bool(found)
    if single:
        kind = _kind_by_name(found[0].path)
        if kind not in (FileKind.ONNX, FileKind.SAFETENSORS):
            with _open_at(root, found[0].path, _identity(found[0].st)) as handle:
                _refuse_by_extension(found[0].path, handle)
            raise UnsafeModel(found[0].path, "a single file must be .onnx or .safetensors")
    else:
        root_fd = os.open(root, _DIR_FLAGS)
        try:
            _walk(root_fd, "", 0, limits, found, skipped)
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
            with _open_at(root, item.path, _identity(item.st)) as handle:
                _sniff(item.path, handle, item.st.st_size)
                needed = _check_onnx(item.path, handle, item.st.st_size, limits, by_path, single)
            for target, end in needed.items():
                external[target] = max(external.get(target, 0), end)

    accepted: list[ScannedFile] = []
    for item in found:
        size = item.st.st_size
        with _open_at(root, item.path, _identity(item.st)) as handle:
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
                _sniff(item.path, handle, size)
                _validate(item.path, kind, handle, size, limits)
        accepted.append(
            ScannedFile(item.path, size, kind, item.st.st_dev, item.st.st_ino, item.st.st_mtime_ns)
        )
    return ScanReport(root=root, files=tuple(accepted), skipped=tuple(skipped))
