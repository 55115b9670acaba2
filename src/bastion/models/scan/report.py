"""What a scan reports: the kinds of files accepted, the limits, the report, the refusal."""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bastion.errors import InvalidRequest

if TYPE_CHECKING:
    from bastion.config import Settings


_GIB = 1 << 30


MIB = 1 << 20


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
    max_json_bytes: int = 64 * MIB
    max_json_depth: int = 64
    max_text_bytes: int = 64 * MIB
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
        self.path = printable(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


CONVERT = (
    "convert it to safetensors (e.g. with `transformers`' save_pretrained(safe_serialization=True))"
)


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\\]")


def printable(path: str) -> str:
    """Escape what could forge output (control characters, backslashes, lone surrogates)."""
    text = path.encode("utf-8", "backslashreplace").decode("utf-8")
    return UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
