"""A webhook receiver on loopback for the alert tests: a real HTTP server in a thread."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Delivery:
    """One request the receiver got: its headers (lowercase names) and its raw body."""

    headers: dict[str, str]
    body: bytes
    at: float


class AlertReceiver:
    """Records every POST it gets and answers each with the next scripted status (then 200).

    `headers` of a scripted answer go with it (e.g. ``Retry-After``). With `hold`, each
    answer waits for that event to be set (a busy receiver), once the POST is recorded."""

    def __init__(
        self,
        statuses: Iterable[int | tuple[int, dict[str, str]]] = (),
        *,
        hold: threading.Event | None = None,
    ) -> None:
        self.deliveries: list[Delivery] = []
        self._script: deque[int | tuple[int, dict[str, str]]] = deque(statuses)
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, extra = receiver._next()
                with receiver._arrived:
                    receiver.deliveries.append(Delivery(headers, body, time.time()))
                    receiver._arrived.notify_all()
                if hold is not None:
                    hold.wait(30)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/bastion"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _next(self) -> tuple[int, dict[str, str]]:
        with self._arrived:
            item = self._script.popleft() if self._script else 200
        return (item, {}) if isinstance(item, int) else item

    def wait(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """The deliveries once there are at least `count` (AssertionError after `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.deliveries) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.deliveries)} deliveries, not {count}")
                self._arrived.wait(left)
            return list(self.deliveries)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
