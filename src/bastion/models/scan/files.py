"""Walking a model directory and opening its files safely: no links, no special files, no
name tricks, and each file opened is the inode the walk saw."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bastion.models.scan.report import (
    DIR_FLAGS,
    UNPRINTABLE,
    ScanLimits,
    ScannedFile,
    ScanReport,
    UnsafeModel,
)

_SKIPPED_TOP_LEVEL = frozenset({".git", ".gitattributes", ".gitignore", ".cache", ".huggingface"})


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


@dataclass
class Found:
    path: str
    st: os.stat_result


def _check_name(rel: str, name: str) -> None:
    if UNPRINTABLE.search(name) or "/" in name:
        raise UnsafeModel(rel, "file name contains control characters or a backslash")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeModel(rel, "file name is not valid UTF-8") from None
    if name.startswith("."):
        raise UnsafeModel(rel, "hidden file: remove it before import")


def check_type(rel: str, st: os.stat_result) -> None:
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


def walk(
    dir_fd: int,
    prefix: str,
    depth: int,
    limits: ScanLimits,
    found: list[Found],
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
        check_type(rel, st)
        if len(found) >= limits.max_files:
            raise UnsafeModel(".", f"more than {limits.max_files} files (BASTION_IMPORT_MAX_FILES)")
        if stat.S_ISDIR(st.st_mode):
            sub_fd = os.open(entry.name, DIR_FLAGS, dir_fd=dir_fd)
            try:
                if not _same_inode(os.fstat(sub_fd), st):
                    raise UnsafeModel(rel, "directory changed during the scan")
                walk(sub_fd, rel, depth + 1, limits, found, skipped)
            finally:
                os.close(sub_fd)
        else:
            found.append(Found(rel, st))


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def open_at(root: Path, rel: str, expected: tuple[int, int, int, int]) -> Iterator[BinaryIO]:
    """Open ``root/rel`` following no link, and check it is still the file that was scanned."""
    fds = [os.open(root, DIR_FLAGS)]
    try:
        *dirs, name = rel.split("/")
        for part in dirs:
            fds.append(os.open(part, DIR_FLAGS, dir_fd=fds[-1]))
        fd = os.open(name, _OPEN_FLAGS, dir_fd=fds[-1])
    except OSError as exc:
        raise UnsafeModel(rel, "cannot be opened as a regular file (moved or replaced?)") from exc
    finally:
        for opened in fds:
            os.close(opened)
    with os.fdopen(fd, "rb") as handle:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or now.st_nlink != 1 or identity(now) != expected:
            raise UnsafeModel(rel, "file was replaced or changed since it was scanned")
        yield handle


def open_scanned(
    report: ScanReport, scanned: ScannedFile
) -> contextlib.AbstractContextManager[BinaryIO]:
    """Open a scanned file for import; raises UnsafeModel if it was replaced or changed since."""
    expected = (scanned.device, scanned.inode, scanned.size, scanned.mtime_ns)
    return open_at(report.root, scanned.path, expected)
