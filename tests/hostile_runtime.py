"""A hostile runtime for the sandbox's escape tests: it tries to get out, and says how far
it got.

It is not one of Bastion's runtimes: the escape tests register it as ``escape-test`` with
``BASTION_EXTRA_RUNTIMES=escape-test=hostile_runtime`` (this folder on PYTHONPATH), and
load it like any model. It it reads each prompt as a JSON
``{"attempt": NAME, "args": {...}}``, makes that attempt from inside its worker, and
answers with a JSON report ``{"attempt", "escaped": bool, "error": errno name or message,
...}``. It never sends anything it reads anywhere but into that report. The attempts that
exhaust resources (fork, memory, CPU, /tmp) run only inside Bastion's bubblewrap sandbox
(not root, hostname ``bastion-worker``); elsewhere they refuse, so registering this model
on an unsandboxed server cannot hurt the host. Attempts on kernel settings never change
one: they open files for writing without writing, or write back the value just read.
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
from bastion.wire.protocol import (
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
# x86-64 system call numbers.
_SYS_PTRACE = 101
_SYS_CLONE = 56
_SYS_IO_URING_SETUP = 425
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIGCHLD = 17


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
        with open("/tmp/fill", "wb") as handle:
            while written < limit_bytes:
                handle.write(block)
                handle.flush()
                written += len(block)
    except OSError as exc:
        return {"escaped": False, "error": _error(exc), "written": written}
    finally:
        Path("/tmp/fill").unlink(missing_ok=True)
    return {"escaped": True, "written": written}


def _writable_files(top: str) -> Report:
    """Open every file under `top` that looks writable (a w bit) for writing, without
    writing a byte; report those that opened."""
    if not os.path.isdir(top):
        return {"escaped": False, "error": "ENOENT"}
    tried = 0
    opened: list[str] = []
    errors: dict[str, int] = {}
    for root, dirs, files in os.walk(top, followlinks=False):
        # Per-process copies (sys/fs/cgroup/...) are walked like the rest.
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for name in files:
            path = os.path.join(root, name)
            try:
                if not os.lstat(path).st_mode & 0o222:
                    continue
            except OSError:
                continue
            tried += 1
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
            except OSError as exc:
                code = _error(exc)
                errors[code] = errors.get(code, 0) + 1
                continue
            os.close(fd)
            opened.append(path)
    return {"escaped": bool(opened), "tried": tried, "opened": opened[:20], "errors": errors}


def _rewrite(path: str) -> Report:
    """Write a file's own content back to it (a kernel setting stays as it was)."""

    def attempt() -> str:
        value = Path(path).read_bytes()
        with open(path, "wb", buffering=0) as handle:
            handle.write(value)
        return "rewritten"

    return _blocked(attempt)


def _setuid_file() -> Report:
    """Make a set-user-id file in the writable tmpfs, and say what it would be worth."""
    path = "/tmp/suid"
    Path(path).write_bytes(b"#!/bin/sh\n")
    os.chmod(path, 0o4755)  # noqa: S103 - the attack under test
    info = os.stat(path)
    nosuid = bool(os.statvfs("/tmp").f_flag & os.ST_NOSUID)
    try:
        os.chown(path, 0, 0)
        chown = "done"
    except OSError as exc:
        chown = _error(exc)
    return {
        # Worth something only if it is root's, on a file system that honours the bit.
        "escaped": info.st_uid == 0 and not nosuid,
        "owner": info.st_uid,
        "setuid_bit": bool(info.st_mode & 0o4000),
        "nosuid": nosuid,
        "chown_to_root": chown,
    }


def _syscall(*args: int) -> Report:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(*(ctypes.c_long(a) for a in args))
    if result >= 0:
        return {"escaped": True, "result": result}
    return {"escaped": False, "error": errno.errorcode.get(ctypes.get_errno(), "?")}


def _new_namespace(flag: str) -> Report:
    """unshare() and clone() asking for a new user (or network) namespace."""
    value = {"user": _CLONE_NEWUSER, "net": _CLONE_NEWNET}[flag]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(value) == 0:
        return {"escaped": True, "result": "unshare"}
    unshare_error = errno.errorcode.get(ctypes.get_errno(), "?")
    pid = libc.syscall(ctypes.c_long(_SYS_CLONE), ctypes.c_long(value | _SIGCHLD), 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
        return {"escaped": True, "result": "clone"}
    clone_error = errno.errorcode.get(ctypes.get_errno(), "?")
    return {"escaped": False, "error": unshare_error, "clone_error": clone_error}


def _write_beside_socket() -> Report:
    """Write a file in the worker's own IPC directory (on the host's disk)."""
    argv = Path("/proc/self/cmdline").read_bytes().split(b"\0")
    socket_path = argv[argv.index(b"--endpoint") + 1].decode()
    return _write(str(Path(socket_path).parent / "escape"))


def _io_uring() -> Report:
    params = ctypes.create_string_buffer(120)
    return _syscall(_SYS_IO_URING_SETUP, 8, ctypes.addressof(params))


def _mknod() -> Report:
    # /dev/mem's numbers: a device node would give the host's memory to whoever opens it.
    return _blocked(lambda: os.mknod("/tmp/mem", 0o20600, os.makedev(1, 1)))


def _identity() -> Report:
    status = dict(
        line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines()
    )
    return {
        "escaped": False,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "sandboxed": _sandboxed(),
        "cap_eff": status["CapEff"].strip(),
        "cap_bnd": status["CapBnd"].strip(),
        "no_new_privs": status["NoNewPrivs"].strip(),
        "seccomp": status["Seccomp"].strip(),
        "home": os.environ.get("HOME"),
    }


def _panic() -> Report:
    """A real Rust panic through PyO3 (a BaseException): a tokenizer whose pre-tokenizer
    regex exceeds Oniguruma's retry limit, as a tokenizer.json from a model could make."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"((a+)+)+b"), "isolated")
    tokenizer.encode("a" * 25 + "c")
    return {"escaped": False, "error": "no panic"}


def _exit(code: int) -> Report:
    raise SystemExit(code)


def _say(marker: str) -> Report:
    """Write `marker` (standing in for a request's text) everywhere a runtime could:
    stdout, stderr, a raw write to fd 2, an exception in a thread, an unraisable one."""
    import sys
    import threading

    print(marker)
    print(marker, file=sys.stderr)
    os.write(2, f"{marker}\n".encode())

    def fail() -> None:
        raise ValueError(marker)

    thread = threading.Thread(target=fail)
    thread.start()
    thread.join()

    class Unraisable:
        def __del__(self) -> None:
            raise ValueError(marker)

    Unraisable()
    return {"escaped": False, "error": "said"}


def _sandboxed() -> bool:
    return os.getuid() != 0 and socket.gethostname() == "bastion-worker"


_ATTEMPTS: dict[str, Callable[..., Report]] = {
    "connect": _connect,
    "dns": _dns,
    "unix": _unix,
    "read": _read,
    "write": _write,
    "ptrace": _ptrace,
    "signal": _signal,
    "writable_files": _writable_files,
    "rewrite": _rewrite,
    "setuid_file": _setuid_file,
    "new_namespace": _new_namespace,
    "io_uring": _io_uring,
    "mknod": _mknod,
    "write_beside_socket": _write_beside_socket,
    "panic": _panic,
    "exit": _exit,
    "say": _say,
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
        return _identity()
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

    def embed(self, request: Embed, cancel: CancelToken | None = None) -> EmbedResult:
        raise UnsupportedOperation("embeddings")

    def infer(self, request: Infer, cancel: CancelToken | None = None) -> InferResult:
        raise UnsupportedOperation("inference")


def load(source: Path | ModelFiles, options: Mapping[str, Any]) -> EscapeRuntime:
    return EscapeRuntime()
