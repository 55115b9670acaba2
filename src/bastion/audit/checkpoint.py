"""The text of a transparency log checkpoint (c2sp.org/tlog-checkpoint).

A checkpoint is what the audit log signs (as a signed note, :mod:`bastion.audit.note`) to
commit to its contents at one size::

    <origin>                 the log's identity, e.g. "bastion.example/audit"
    <size>                   decimal leaf count, no leading zeros ("0" for the empty tree)
    <base64 root hash>       RFC 9162 Merkle tree root of those leaves
    <extension line>...      optional, opaque, non-empty

each line ending in a newline. Parsing is strict (one spelling per checkpoint), because two
texts for one tree head would let a log show different views that compare unequal as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bastion.audit.merkle import HASH_SIZE
from bastion.audit.note import b64encode, decode_base64, has_control_characters

MAX_SIZE = 2**64 - 1

_SIZE_LINE = re.compile(r"0|[1-9][0-9]*")


class MalformedCheckpointError(ValueError):
    """The text is not a well-formed checkpoint."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "origin")
        if isinstance(self.size, bool) or not 0 <= self.size <= MAX_SIZE:
            raise MalformedCheckpointError(f"tree size {self.size!r} is outside 0..2^64-1")
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise MalformedCheckpointError(f"root hash must be {HASH_SIZE} bytes")
        for extension in self.extensions:
            _check_line(extension, "extension line")

    def encode(self) -> str:
        root64 = b64encode(self.root)
        lines = [self.origin, str(self.size), root64, *self.extensions]
        return "".join(f"{line}\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        if not text.endswith("\n"):
            raise MalformedCheckpointError("a checkpoint ends with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedCheckpointError("a checkpoint has at least three lines")
        origin, size_line, root_line, *extensions = lines
        if len(size_line) > len(str(MAX_SIZE)) or not _SIZE_LINE.fullmatch(size_line):
            raise MalformedCheckpointError("the tree size is not a canonical decimal")
        try:
            root = decode_base64(root_line)
        except ValueError as exc:
            raise MalformedCheckpointError("the root hash is not canonical base64") from exc
        return cls(origin, int(size_line), root, tuple(extensions))


def _check_line(line: str, what: str) -> None:
    if not line:
        raise MalformedCheckpointError(f"the {what} is empty")
    if "\n" in line or has_control_characters(line):
        raise MalformedCheckpointError(f"the {what} holds a control character")
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedCheckpointError(f"the {what} is not valid Unicode") from exc
