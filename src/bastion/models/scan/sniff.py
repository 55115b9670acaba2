"""Content sniffing: a pickle, an archive or a polyglot is refused whatever its name says."""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from typing import BinaryIO

from bastion.models.scan.report import CONVERT, MIB, UnsafeModel

_SNIFF_BYTES = 1 * MIB


_ZIP_TAIL_BYTES = 22 + 65535  # end-of-central-directory record + the longest comment


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


def sniff(rel: str, handle: BinaryIO, size: int) -> None:
    handle.seek(0)
    head = handle.read(min(size, _SNIFF_BYTES))
    if _looks_like_pickle(head):
        raise UnsafeModel(rel, f"pickle content (whatever its name says): {CONVERT}")
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
        return f"zip with pickle inside (PyTorch checkpoint): {CONVERT}"
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
