"""A hostile runtime for the sandbox's escape tests: it tries to get out, and says how far
it got.

Registered as ``escape-test`` and loaded like any model, it reads each prompt as a JSON
``{"attempt": NAME, "args": {...}}``, makes that attempt from inside its worker, and
answers with a JSON report ``{"attempt", "escaped": bool, "error": errno name or message,
...}``. It never sends anything it reads anywhere but into that report. The attempts that
exhaust resources (fork, memory, CPU, /tmp) run only inside Bastion's bubblewrap sandbox
(uid 65534, hostname ``bastion-worker``); elsewhere they refuse, so registering this model
on an unsandboxed server cannot hurt the host.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bastion.runtimes.base import CancelToken, EmitDelta, ModelFiles, UnsupportedOperation
from bastion.workers.protocol import (
    Choice,
    Embed,
    EmbedResult,
    Generate,
    GenerateResult,
    Infer,
    InferResult,
    ModelMetadata,
)

Report = dict[str, Any]
_PTRACE_ATTACH = 16
_SYS_PTRACE = 101  # x86-64


def _error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def _blocked(attempt: Callable[[], object]) -> Report:
    """Run `attempt`; escaped if it returns, blocked with the error if it raises."""
    try:
        result = attempt()
    except (OSError, MemoryError, ValueError) as exc:
        return {"escaped": False, "error": _error(exc)}
    return {"escaped": True, "result": str(result)[:200]}


def _connect(host: str, port: int) -> Report:
    def attempt() -> str:
        with socket.create_connection((host, port), timeout=3):
            return "connected"

    return _blocked(attempt)


def _read(path: str) -> Report:
    return _blocked(lambda: len(Path(path).read_bytes()))


def _write(path: str) -> Report:
    return _blocked(lambda: Path(path).write_bytes(b"escape"))


def _ptrace(pid: int) -> Report:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(_SYS_PTRACE, _PTRACE_ATTACH, pid, 0, 0)
    if result == 0:
        return {"escaped": True, "result": "attached"}
    return {"escaped": False, "error": errno.errorcode.get(ctypes.get_errno(), "?")}


def _signal(pid: int) -> Report:
    return _blocked(lambda: os.kill(pid, signal.SIGTERM))


def _unix(path: str) -> Report:
    def attempt() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(path)
        return "connected"

    return _blocked(attempt)


def _dns(name: str) -> Report:
    try:
        found = socket.getaddrinfo(name, 443)
    except socket.gaierror as exc:
        return {"escaped": False, "error": f"gaierror {exc.errno}"}
    return {"escaped": True, "result": str(found[:1])}


def _fork_bomb(limit: int) -> Report:
    children: list[int] = []
    try:
        for _ in range(limit):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
    except OSError as exc:
        return {"escaped": False, "error": _error(exc), "forked": len(children)}
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return {"escaped": True, "forked": len(children)}


def _memory_bomb(limit_bytes: int) -> Report:
    held: list[bytearray] = []
    chunk = 64 * 1024 * 1024
    try:
        while len(held) * chunk < limit_bytes:
            block = bytearray(chunk)
            block[::4096] = b"\x01" * len(block[::4096])  # touch every page
            held.append(block)
    except MemoryError:
        return {"escaped": False, "error": "MemoryError", "held_bytes": len(held) * chunk}
    return {"escaped": True, "held_bytes": len(held) * chunk}


def _spin(seconds: float) -> Report:
    # Ignores cancellation on purpose: the worker must be stopped from outside.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return {"escaped": True, "result": f"spun {seconds} s"}


def _fill_tmp(limit_bytes: int) -> Report:
    written = 0
    block = b"\0" * (1024 * 1024)
    try:
        with open("/tmp/fill", "wb") as handle:  # noqa: S108 - the sandbox's own tmpfs
            while written < limit_bytes:
                handle.write(block)
                handle.flush()
                written += len(block)
    except OSError as exc:
        return {"escaped": False, "error": _error(exc), "written": written}
    finally:
        Path("/tmp/fill").unlink(missing_ok=True)  # noqa: S108
    return {"escaped": True, "written": written}


def _sandboxed() -> bool:
    return os.getuid() == 65534 and socket.gethostname() == "bastion-worker"


_ATTEMPTS: dict[str, Callable[..., Report]] = {
    "connect": _connect,
    "dns": _dns,
    "unix": _unix,
    "read": _read,
    "write": _write,
    "ptrace": _ptrace,
    "signal": _signal,
}
_EXHAUSTING: dict[str, Callable[..., Report]] = {
    "fork_bomb": _fork_bomb,
    "memory_bomb": _memory_bomb,
    "spin": _spin,
    "fill_tmp": _fill_tmp,
}


def run_attempt(attempt: str, args: Mapping[str, Any]) -> Report:
    """Make one attempt and report on it."""
    if attempt == "whoami":
        return {"escaped": False, "uid": os.getuid(), "sandboxed": _sandboxed()}
    if attempt in _EXHAUSTING:
        if not _sandboxed():
            return {"escaped": False, "error": "refused outside the sandbox"}
        return _EXHAUSTING[attempt](**args)
    if attempt not in _ATTEMPTS:
        return {"escaped": False, "error": f"unknown attempt {attempt!r}"}
    return _ATTEMPTS[attempt](**args)


class EscapeRuntime:
    def __init__(self) -> None:
        self._metadata = ModelMetadata(
            runtime="escape-test", capabilities=["completions"], platform="bastion_escape_test"
        )

    def metadata(self) -> ModelMetadata:
        return self._metadata

    def generate(self, request: Generate, cancel: CancelToken, emit: EmitDelta) -> GenerateResult:
        attempt = None
        try:
            asked = json.loads(request.prompt or "{}")
            attempt = str(asked.get("attempt"))
            report = run_attempt(attempt, dict(asked.get("args", {})))
        except (ValueError, TypeError) as exc:
            report = {"escaped": False, "error": type(exc).__name__}
        text = json.dumps({"attempt": attempt, **report})
        return GenerateResult(
            id=request.id,
            choices=[Choice(index=0, text=text, finish_reason="stop")],
            prompt_tokens=1,
            completion_tokens=1,
        )

    def embed(self, request: Embed) -> EmbedResult:
        raise UnsupportedOperation("embeddings")

    def infer(self, request: Infer) -> InferResult:
        raise UnsupportedOperation("inference")


def load(source: Path | ModelFiles, options: Mapping[str, Any]) -> EscapeRuntime:
    return EscapeRuntime()
