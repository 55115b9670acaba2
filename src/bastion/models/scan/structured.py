"""JSON and text files: strict JSON (no duplicate keys, NaN or remote-code keys), bounded
nesting, printable text."""

from __future__ import annotations

import json
from typing import Any, BinaryIO

from bastion.models.scan.report import UnsafeModel

_REMOTE_CODE_KEYS = frozenset({"auto_map", "trust_remote_code", "custom_pipelines", "_target_"})


def read_all(rel: str, handle: BinaryIO, size: int, cap: int, what: str) -> bytes:
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


def parse_json(rel: str, data: bytes, what: str) -> Any:
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


def check_json_config(rel: str, value: Any, max_depth: int) -> None:
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


def check_text(rel: str, data: bytes) -> None:
    if b"\x00" in data:
        raise UnsafeModel(rel, "text file contains NUL bytes")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeModel(rel, "text file is not valid UTF-8") from None
