"""Who is on the other end of a Unix socket, and whether it may be: SO_PEERCRED checks.

The kernel records the pid, uid and gid of the process that called ``connect()``; a peer
cannot forge them. The gateway accepts its worker's connection only from the process the
sandbox launched or one of its descendants (a sandbox such as bubblewrap starts the worker
as its own child), or, when the sandbox cannot name a pid (the worker lives in a container
whose processes the gateway cannot trace), from a process of the expected uid.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_UCRED = struct.Struct("3i")
# Deep enough for any launcher chain (bwrap -> init -> worker); bounds the /proc walk.
_MAX_ANCESTRY = 32


class PeerRejected(Exception):
    """The process that connected is not the worker; the message is safe to log."""


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The connecting process as the kernel saw it at connect() time."""

    pid: int
    uid: int
    gid: int


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def peer_credentials(sock: _HasSockopt) -> PeerCredentials:
    """Read SO_PEERCRED from a connected Unix socket (a real socket or asyncio's wrapper)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def check_peer(peer: PeerCredentials, *, pid: int | None, uid: int) -> None:
    """Raise PeerRejected unless `peer` is process `pid` or a descendant of it.

    With `pid` None the sandbox could not tell which process the worker is; any process
    running as `uid` is then accepted, which the private 0700 directory around the socket
    already limits to that uid (and root).
    """
    if pid is None:
        if peer.uid != uid:
            raise PeerRejected("a process of another user connected to the worker's socket")
        return
    if peer.pid <= 0 or not (peer.pid == pid or _descends_from(peer.pid, pid)):
        raise PeerRejected("a process other than the worker connected to its socket")


def _descends_from(child: int, ancestor: int) -> bool:
    """True if `ancestor` is among the parents of `child` (read from /proc)."""
    current = child
    for _ in range(_MAX_ANCESTRY):
        parent = _parent_pid(current)
        if parent == ancestor:
            return True
        if parent is None or parent <= 1:
            return False
        current = parent
    return False


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after the
    # last ")" are "state ppid ...".
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None
