"""Hearing revision bumps at once on PostgreSQL: LISTEN on a connection of its own.

Every write that bumps the change revision also sends ``NOTIFY bastion_revision`` with the
new revision in the same transaction (:mod:`bastion.store.db`), delivered when it commits.
A :class:`RevisionWatcher` listens from a thread of its own and calls its callback for each
one, so a gateway sees a change made by the CLI or another gateway in milliseconds rather
than at its next poll. The poll stays: a watcher that lost its connection (a restarted
server, a network cut) reconnects with exponential backoff, and says so with a ``None``
callback once it listens again, since it cannot know what it missed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from bastion.store.db import REVISION_CHANNEL

logger = logging.getLogger("bastion.store")


class RevisionWatcher:
    """Calls `on_change(revision)` from its thread for every committed revision bump (any
    process), and `on_change(None)` each time it starts listening (first and after a
    reconnect). The callback must be quick and must not raise (it hands the news on);
    an exception it raises is logged and ignored."""

    def __init__(
        self,
        connect: Callable[[], Any],
        on_change: Callable[[int | None], None],
        *,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        wake_interval_s: float = 0.5,
    ) -> None:
        self._connect = connect
        self._on_change = on_change
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._wake_interval_s = wake_interval_s
        self._stop = threading.Event()
        self._listening = threading.Event()
        # How many times it started listening: tests and metrics can see a reconnect.
        self.connections = 0
        self._thread = threading.Thread(
            target=self._run, name="bastion-revision-watch", daemon=True
        )
        self._thread.start()

    @property
    def listening(self) -> bool:
        """Whether it is connected and listening now."""
        return self._listening.is_set()

    def wait_listening(self, timeout: float) -> bool:
        """Wait until it listens (or `timeout` seconds); whether it does."""
        return self._listening.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening and end the thread (within about half a second)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = self._backoff_initial_s
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except Exception as exc:
                # The message may name the host; never the password (libpq leaves it out),
                # but only the kind of error is logged anyway.
                logger.warning(
                    "cannot listen for database changes; retrying",
                    extra={"exc_type": type(exc).__name__, "retry_in_s": round(delay, 2)},
                )
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff_max_s)
                continue
            delay = self._backoff_initial_s
            try:
                with conn:
                    self._listen(conn)
            except Exception as exc:
                if not self._stop.is_set():
                    logger.warning(
                        "lost the database connection that listens for changes; reconnecting",
                        extra={"exc_type": type(exc).__name__},
                    )
            finally:
                self._listening.clear()
            self._stop.wait(delay)

    def _listen(self, conn: Any) -> None:
        conn.execute(f"LISTEN {REVISION_CHANNEL}")
        self._listening.set()
        self.connections += 1
        # Anything committed before LISTEN took effect was not heard: say so.
        self._call(None)
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=self._wake_interval_s):
                self._call(_revision_of(notify))
                if self._stop.is_set():
                    return

    def _call(self, revision: int | None) -> None:
        try:
            self._on_change(revision)
        except Exception as exc:
            logger.warning(
                "a database change callback failed", extra={"exc_type": type(exc).__name__}
            )


def _revision_of(notify: psycopg.Notify) -> int | None:
    try:
        return int(notify.payload)
    except ValueError:
        return None
