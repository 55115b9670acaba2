"""Process trees for the benchmarks: start servers, read their CPU and memory, stop them all.

Every server starts in its own session, so a Ctrl-C in the terminal reaches only the
benchmark, which then stops each server itself: SIGINT to the main process (uvicorn and
LitServe both shut down gracefully on it), then SIGTERM and SIGKILL, by process id, to any
process of its tree that is still there. A process is known by its id and start time, so a
recycled id is never signalled.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SECRET = re.compile(r"bsk_\S+")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 is index 0), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _identity(pid: int) -> tuple[int, str] | None:
    fields = _stat_fields(pid)
    return None if fields is None else (pid, fields[19])  # field 22: start time


def _is_running(identity: tuple[int, str]) -> bool:
    fields = _stat_fields(identity[0])
    return fields is not None and fields[19] == identity[1] and fields[0] != "Z"


def process_tree(root: int) -> list[int]:
    """The root and all its descendants, root first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident set size of one process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Server:
    """One started server process and every process of its tree seen so far."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str], log: Path):
        self.name = name
        self.command = list(command)
        self.log = log
        self.started_at = time.monotonic()
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                self.command,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._seen: set[tuple[int, str]] = set()
        self.tree()

    @property
    def pid(self) -> int:
        return self.process.pid

    def tree(self) -> list[int]:
        """The live process tree, remembered so that leftovers can be stopped later."""
        pids = process_tree(self.pid) if self.process.poll() is None else []
        for pid in pids:
            identity = _identity(pid)
            if identity is not None:
                self._seen.add(identity)
        return pids

    def log_tail(self, lines: int = 25) -> str:
        """The end of the server's output, with any API key blanked out."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return _SECRET.sub("bsk_<redacted>", "\n".join(text.splitlines()[-lines:]))

    def stop(self, grace_s: float = 15.0) -> list[int]:
        """Stop the server and its children; return the ids that had to be killed."""
        self.tree()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_is_running(i) for i in self._seen):
            time.sleep(0.1)
        leftovers = [i for i in self._seen if _is_running(i)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for identity in leftovers:
                if _is_running(identity):
                    os.kill(identity[0], sig)
            time.sleep(0.5)
        return [pid for pid, _ in leftovers]


class Fleet:
    """The servers of one benchmark run; leaving the `with` block stops every one of them."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.servers: list[Server] = []

    def start(self, name: str, command: Sequence[str], env: Mapping[str, str]) -> Server:
        server = Server(name, command, env, self.logs / f"{name}.log")
        self.servers.append(server)
        return server

    def stop(self, server: Server) -> list[int]:
        if server in self.servers:
            self.servers.remove(server)
        return server.stop()

    def stop_all(self) -> None:
        while self.servers:
            server = self.servers.pop()
            leftovers = server.stop()
            if leftovers:
                print(f"[{server.name}] killed leftover processes {leftovers}", flush=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
