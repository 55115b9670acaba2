"""The event sink that writes the audit log: at once in the CLI, from a thread in a server.

A server emits events on its request path (failed sign-ins, refusals) and must not wait
for the database there, nor let an attacker's flood of failures turn into a flood of
transactions. In the background mode :meth:`AuditWriter.emit` only queues the event; one
thread writes what has queued in one transaction every `flush_interval_s` (group commit),
signs a checkpoint when one is due, and a second thread prunes past the retention and
verifies the whole log on a schedule. A record is committed when its transaction is; a
process killed in between loses at most the events of the last interval, never a
committed record, and the log stays verifiable (each transaction is atomic).

If the database cannot be written, events wait (up to `max_pending`) and are retried; past
that the oldest are dropped and counted, never silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from bastion.audit.events import AUDIT_PRUNED, AUDIT_VERIFY_FAILED, Event
from bastion.audit.log import AuditLog
from bastion.audit.verify import VerifyReport, verify_log

logger = logging.getLogger("bastion.audit")

DAY_S = 86_400.0


class AuditWriter:
    """An EventSink appending to an :class:`AuditLog`."""

    def __init__(
        self,
        log: AuditLog,
        *,
        retention_days: float = 180,
        flush_interval_s: float = 0.05,
        max_batch: int = 1000,
        max_pending: int = 100_000,
        verify_interval_s: float = 6 * 3600.0,
        prune_interval_s: float = 3600.0,
        checkpoint_interval_s: float = 10.0,
    ) -> None:
        self.log = log
        self.retention_s = retention_days * DAY_S
        self._flush_interval_s = flush_interval_s
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._verify_interval_s = verify_interval_s
        self._prune_interval_s = prune_interval_s
        self._checkpoint_interval_s = checkpoint_interval_s
        self._pending: deque[Event] = deque()
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self._keeper: threading.Thread | None = None
        self._stopping = False
        self._stop_keeper = threading.Event()
        self.dropped = 0
        self.written = 0
        self.last_verify: VerifyReport | None = None
        # Where the log's own events (a failed verification, a prune) go: a server sets its
        # whole event fan-out (logs, metrics, alerts and this log); by default this log.
        self.on_event: Callable[[Event], None] | None = None

    # ------------------------------------------------------------------ EventSink

    def emit(self, event: Event) -> None:
        if self._writer is None:
            # A management command: its record is signed at once (a CLI process may not
            # live to sign a later checkpoint).
            self._append_now([event], checkpoint=True)
            return
        with self._cond:
            if len(self._pending) >= self._max_pending:
                self._pending.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    logger.error(
                        "audit events dropped: the database has not taken them",
                        extra={"dropped": self.dropped},
                    )
            self._pending.append(event)
            if len(self._pending) >= self._max_batch:
                self._cond.notify()

    # ------------------------------------------------------------------ background mode

    def start_background(self) -> None:
        """Write from threads from now on (a server); emit() no longer waits."""
        if self._writer is not None:
            return
        self._stopping = False
        self._stop_keeper.clear()
        self._writer = threading.Thread(target=self._write_forever, name="bastion-audit")
        self._keeper = threading.Thread(target=self._keep_forever, name="bastion-audit-keeper")
        self._writer.daemon = self._keeper.daemon = True
        self._writer.start()
        self._keeper.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, sign a final checkpoint and stop the threads."""
        writer, keeper = self._writer, self._keeper
        if writer is None:
            return
        self._stop_keeper.set()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        writer.join(timeout_s)
        if keeper is not None:
            keeper.join(timeout_s)
        self._writer = self._keeper = None
        if self._pending:
            self._append_now(self._take(len(self._pending)))
        try:
            self.log.checkpoint(force=True)
        except Exception as exc:
            logger.error(
                "the final audit checkpoint was not signed",
                extra={"exc_type": type(exc).__name__},
            )

    def flush(self) -> None:
        """Write everything queued now (tests, and before a verification)."""
        self._append_now(self._take(len(self._pending)))

    # ------------------------------------------------------------------ the threads

    def _write_forever(self) -> None:
        last_checkpoint = time.monotonic()
        backoff_s = self._flush_interval_s
        while True:
            with self._cond:
                if not self._pending and not self._stopping:
                    self._cond.wait(self._flush_interval_s)
                stopping = self._stopping
            batch = self._take(self._max_batch)
            if batch:
                if self._append_now(batch):
                    backoff_s = self._flush_interval_s
                else:
                    self._requeue(batch)
                    if stopping:
                        return
                    time.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 5.0)
                    continue
            if stopping and not self._pending:
                return
            now = time.monotonic()
            if now - last_checkpoint >= self._checkpoint_interval_s:
                last_checkpoint = now
                self._checkpoint()

    def _keep_forever(self) -> None:
        next_prune = next_verify = time.monotonic() + min(60.0, self._prune_interval_s)
        while not self._stop_keeper.wait(max(0.0, min(next_prune, next_verify) - time.monotonic())):
            now = time.monotonic()
            if now >= next_prune:
                next_prune = now + self._prune_interval_s
                self.prune()
            if now >= next_verify:
                next_verify = now + self._verify_interval_s
                self.verify()

    def prune(self) -> int:
        try:
            removed = self.log.prune(self.retention_s)
        except Exception as exc:
            logger.error("audit records were not pruned", extra={"exc_type": type(exc).__name__})
            return 0
        if removed:
            self._report(
                Event(
                    kind=AUDIT_PRUNED,
                    actor="system",
                    detail={"records": removed, "retention_days": self.retention_s / DAY_S},
                )
            )
        return removed

    def verify(self) -> VerifyReport | None:
        """Check the whole log against the key ring's own key; report a failure."""
        try:
            self.flush()
            verifier = self.log.own_verifier()
            if verifier is None:
                return None
            report = verify_log(self.log.database, verifier)
        except Exception as exc:
            logger.error("the audit log was not verified", extra={"exc_type": type(exc).__name__})
            return None
        self.last_verify = report
        if not report.ok:
            logger.error(
                "the audit log does not verify",
                extra={"problems": len(report.problems), "first": report.problems[0]},
            )
            self._report(
                Event(
                    kind=AUDIT_VERIFY_FAILED,
                    outcome="failure",
                    actor="system",
                    detail={"problems": len(report.problems), "first": report.problems[0]},
                )
            )
        return report

    # ------------------------------------------------------------------ internals

    def _report(self, event: Event) -> None:
        (self.on_event or self.emit)(event)

    def _take(self, count: int) -> list[Event]:
        with self._cond:
            return [self._pending.popleft() for _ in range(min(count, len(self._pending)))]

    def _requeue(self, batch: list[Event]) -> None:
        with self._cond:
            self._pending.extendleft(reversed(batch))
            while len(self._pending) > self._max_pending:
                self._pending.popleft()
                self.dropped += 1

    def _append_now(self, batch: list[Event], *, checkpoint: bool = False) -> bool:
        if not batch:
            return True
        try:
            self.log.append(batch, checkpoint=checkpoint)
        except Exception as exc:
            logger.error(
                "audit records were not written",
                extra={"events": len(batch), "exc_type": type(exc).__name__},
            )
            return False
        self.written += len(batch)
        return True

    def _checkpoint(self) -> None:
        try:
            self.log.checkpoint()
        except Exception as exc:
            logger.error(
                "an audit checkpoint was not signed", extra={"exc_type": type(exc).__name__}
            )
