"""Which OHTTP keys a client trusts, per server: fingerprints the operator gave, or the one
seen on first use, kept in a pin file (like SSH's known_hosts).

The pin file is a JSON object of origin → fingerprints. Clients that share it take a lock
to add a pin and replace the file atomically; a server already pinned to another key is
never re-pinned silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from bastion.client.errors import OHTTPKeyError


class KeyPins:
    """The fingerprints a client trusts: given ones, or those of its pin file."""

    def __init__(self, fingerprints: Iterable[str], pin_file: Path | None) -> None:
        self._fingerprints = frozenset(f.lower() for f in fingerprints)
        self._pin_file = pin_file

    def trusted(self, origin: str) -> frozenset[str] | None:
        """The fingerprints trusted for `origin`; None: nothing yet (trust on first use)."""
        if self._fingerprints:
            return self._fingerprints
        pins = read_pins(self._pin_file)
        stored = pins.get(origin)
        return frozenset(stored) if stored else None

    def remember(self, origin: str, fingerprint: str) -> None:
        """Pin `fingerprint` for `origin` in the pin file (first use), if there is one."""
        if self._pin_file is None:
            return
        self._pin_file.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self._pin_file.with_name(self._pin_file.name + ".lock")
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            # Another client may be pinning another server in the same file right now.
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            pins = read_pins(self._pin_file)
            existing = pins.get(origin)
            if existing and fingerprint not in existing:
                raise OHTTPKeyError(
                    "Another client pinned a different OHTTP key for this server meanwhile."
                )
            pins[origin] = existing or [fingerprint]
            fd, temporary = tempfile.mkstemp(
                dir=self._pin_file.parent, prefix=self._pin_file.name, suffix=".tmp"
            )
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(pins, handle, indent=2)
                os.replace(temporary, self._pin_file)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        finally:
            os.close(lock_fd)


def read_pins(path: Path | None) -> dict[str, list[str]]:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise OHTTPKeyError(f"The pin file {path} is unreadable.") from None
    if not isinstance(data, dict):
        raise OHTTPKeyError(f"The pin file {path} is not a JSON object.")
    return {str(k): [str(f).lower() for f in v] for k, v in data.items() if isinstance(v, list)}
