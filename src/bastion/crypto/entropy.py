"""Random bytes for the request path, without handing the GIL away on every request.

``os.urandom`` (and ``secrets``, ``uuid.uuid4`` on top of it) releases the GIL around its
``getrandom`` call, as CPython does for every system call. In a process where another
thread is runnable (a worker's receive thread, its runtime thread), each release lets that
thread take the interpreter, and the caller waits for it to give it back: on a loaded
worker the 16 random bytes of an OHTTP response nonce cost 70 to 130 µs instead of 0.3 µs
(tests/unit/crypto/test_entropy.py shows the release; benchmarks/ohttp.py the cost).

:func:`random_bytes` reads the kernel's CSPRNG in blocks of :data:`POOL_BYTES` and hands out
each byte once, so one request in hundreds makes the system call. The bytes are the same
``getrandom`` output ``secrets`` returns, only read ahead; each is handed out once (a lock
guards the pool), and a forked child throws its parent's pool away, so parent and child
never share a byte. For long-lived secrets (keys) Bastion still calls ``secrets`` directly.
"""

from __future__ import annotations

import os
import threading

# Bytes read from the kernel at a time: 256 OHTTP response nonces (16 bytes).
POOL_BYTES = 4096


class _Pool:
    __slots__ = ("_buffer", "_lock", "_offset")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0

    def take(self, size: int) -> bytes:
        if size < 0:
            raise ValueError("size must not be negative")
        if size > POOL_BYTES // 4:
            return os.urandom(size)
        with self._lock:
            end = self._offset + size
            if end > len(self._buffer):
                self._buffer, self._offset, end = os.urandom(POOL_BYTES), 0, size
            chunk = self._buffer[self._offset : end]
            self._offset = end
            return chunk

    def forget(self) -> None:
        """Drop what is read ahead (in a forked child: those bytes are its parent's too)."""
        self._lock = threading.Lock()
        self._buffer, self._offset = b"", 0


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)


def random_bytes(size: int) -> bytes:
    """`size` bytes from the OS's CSPRNG (read ahead in blocks; each byte given once)."""
    return _POOL.take(size)


def random_hex(size: int) -> str:
    """`size` random bytes as hex, as ``secrets.token_hex(size)``."""
    return _POOL.take(size).hex()
