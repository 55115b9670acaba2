"""``.npy`` is refused either way; its header is read (never unpickled) to say why."""

from __future__ import annotations

import ast
import struct
from typing import BinaryIO

from bastion.models.scan.report import CONVERT


def npy_reason(handle: BinaryIO) -> str:
    """Say why a .npy is refused, reading only its header (a Python literal, never a pickle)."""
    handle.seek(0)
    head = handle.read(12)
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        return f"not a valid .npy file; {CONVERT}"
    if head[6] == 1:
        (length,), start = struct.unpack("<H", head[8:10]), 10
    else:
        (length,), start = struct.unpack("<I", head[8:12]), 12
    handle.seek(start)
    try:
        header = ast.literal_eval(handle.read(min(length, 65536)).decode("latin-1"))
        descr = str(header["descr"])
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError):
        return f"not a valid .npy file; {CONVERT}"
    if "O" in descr:
        return f"pickle-based format (.npy with Python objects): {CONVERT}"
    return "NumPy array file: no Bastion runtime loads .npy; store the arrays as safetensors"
