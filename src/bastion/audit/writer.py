"""The event sink that writes the audit log: at once in the CLI, from a thread in a server.

A server emits events on its request path (failed sign-ins, refusals) and must not wait
for the database there, nor let an attacker's flood of failures turn into a flood of
transactions. In the background mode :meth:`AuditWriter.emit` only queues the event; one
thread writes what has queued in one transaction every `flush_interval_s` (group commit)
and signs a checkpoint when one is due; it is the only thread that appends, so records
keep the order events were emitted in. A second thread prunes past the retention and
verifies the whole log on a schedule. A record is committed when its transaction is; a
process killed in between loses at most the events of the last interval, never a
committed record, and the log stays verifiable (each transaction is atomic).

If the database cannot be written, events wait (up to `max_pending`) and are retried; past
that the oldest are dropped and counted, never silently. An event the database refuses
(bad data) is recorded as ``audit.event_rejected`` instead of blocking the events behind it.
If the log was tampered with (a record its writer cannot authenticate, records gone), the
writer signs nothing more, reports ``audit.verify_failed`` and keeps the events waiting.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from bastion.audit.events import AUDIT_PRUNED, AUDIT_VERIFY_FAILED, Event
from bastion.audit.log import AuditLog, AuditLogTampered
from bastion.audit.verify import VerifyReport, verify_log
from bastion.errors import StorageUnavailable

logger = logging.getLogger("bastion.audit")

DAY_S = 86_400.0
EVENT_REJECTED = "audit.event_rejected"
_MAX_BACKOFF_S = 5.0


class VerificationRunning(Exception):
    """Another verification of the log is running."""


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
        # Bumped by the writer thread after each pass over the queue (flush() waits on it);
        # while a flush() waits, the writer does not sleep.
        self._passes = 0
        self._flush_waiters = 0
        self._verifying = threading.Lock()
        self._reported: set[str] = set()
        self.dropped = 0
        self.written = 0
        self.rejected = 0
        self.last_verify: VerifyReport | None = None
        # Where the log's own events (a failed verification, a prune) go: a server sets its
        # whole event fan-out (logs, metrics, alerts and this log); by default this log.
        self.on_event: Callable[[Event], None] | None = None

    # ------------------------------------------------------------------ EventSink

    def emit(self, event: Event) -> None:
        with self._cond:
            if self._writer is not None:
                if len(self._pending) >= self._max_pending:
                    self._pending.popleft()
                    self._count_dropped(1)
                # The writer sleeps while there is nothing to write: the first event wakes
                # it (it then waits one flush interval for others: group commit), as
                # does a full batch.
                if not self._pending or len(self._pending) + 1 >= self._max_batch:
                    self._cond.notify_all()
                self._pending.append(event)
                return
        # A management command: its record is written and signed at once (a CLI process
        # may not live to sign a later checkpoint), with a few tries if the database is
        # busy (another process writing).
        for attempt in range(3):
            if self._write([event], checkpoint=True):
                return
            time.sleep(0.2 * (attempt + 1))
        self._count_dropped(1)

    # ------------------------------------------------------------------ background mode

    def start_background(self) -> None:
        """Write from threads from now on (a server); emit() no longer waits."""
        with self._cond:
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
        with self._cond:
            writer, keeper = self._writer, self._keeper
            if writer is None:
                return
            self._stopping = True
            self._cond.notify_all()
        self._stop_keeper.set()
        writer.join(timeout_s)
        if keeper is not None:
            keeper.join(timeout_s)
        with self._cond:
            # From here on emit() writes at once; whatever is still queued goes now.
            self._writer = self._keeper = None
            left = list(self._pending)
            self._pending.clear()
        if left and not self._write(left):
            self._count_dropped(len(left))
        try:
            self.log.checkpoint(force=True)
        except Exception as exc:
            logger.error(
                "the final audit checkpoint was not signed",
                extra={"exc_type": type(exc).__name__},
            )

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Have everything queued so far written (by the writer thread, so that records
        keep their order); at once when there is no writer thread. Whether it was, within
        `timeout_s`."""
        with self._cond:
            if self._writer is None:
                batch = list(self._pending)
                self._pending.clear()
            else:
                deadline = time.monotonic() + timeout_s
                target = self._passes + 2  # a pass that started after this call, finished
                self._flush_waiters += 1
                self._cond.notify_all()
                try:
                    while self._pending or self._passes < target:
                        left = deadline - time.monotonic()
                        if left <= 0 or self._writer is None:
                            return False
                        self._cond.wait(min(left, 0.05))
                finally:
                    self._flush_waiters -= 1
                return True
        if batch and not self._write(batch):
            self._count_dropped(len(batch))
            return False
        return True

    # ------------------------------------------------------------------ the threads

    def _write_forever(self) -> None:
        # The thread must outlive any bug: a dead writer would silently stop the log.
        while True:
            try:
                self._write_loop()
                return
            except Exception:
                logger.exception("the audit writer failed; it goes on")
                time.sleep(self._flush_interval_s)

    def _write_loop(self) -> None:
        last_checkpoint = time.monotonic()
        backoff_s = self._flush_interval_s
        while True:
            with self._cond:
                if not (self._pending or self._stopping or self._flush_waiters):
                    # Idle: no wake-ups but for the checkpoint's timer, an event or a flush.
                    self._cond.wait(self._checkpoint_interval_s)
                    if self._pending and not (self._stopping or self._flush_waiters):
                        self._cond.wait(self._flush_interval_s)
                stopping = self._stopping
                batch = [
                    self._pending.popleft() for _ in range(min(self._max_batch, len(self._pending)))
                ]
            if batch and not self._write(batch):
                with self._cond:
                    self._requeue(batch)
                if stopping:
                    return
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
                continue
            backoff_s = self._flush_interval_s
            with self._cond:
                self._passes += 1
                self._cond.notify_all()
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
                with contextlib.suppress(VerificationRunning):
                    self.verify()

    def prune(self) -> int:
        try:
            removed = self.log.prune(self.retention_s)
        except Exception as exc:
            self._alarm(f"The audit log was not pruned: {exc}", exc)
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

    def verify(self, *, wait: bool = True) -> VerifyReport | None:
        """Check the whole log against the key ring's own key (and the records' MACs);
        report a failure, an error while checking included. VerificationRunning if another
        verification runs and `wait` is false."""
        if not self._verifying.acquire(blocking=wait):
            raise VerificationRunning
        try:
            self.flush()
            try:
                keys = self.log.own_keys()
                if keys is None:
                    return None
                report = verify_log(self.log.database, keys[0], mac_key=keys[1])
            except StorageUnavailable as exc:
                logger.warning("the audit log was not verified", extra={"reason": exc.message})
                return None
            except Exception as exc:
                report = VerifyReport(problems=[f"The log could not be checked: {exc}"])
            self.last_verify = report
            if not report.ok:
                logger.error(
                    "the audit log does not verify",
                    extra={"problems": len(report.problems), "first": report.problems[0]},
                )
                self._report(_verify_failed(len(report.problems), report.problems[0]))
            return report
        finally:
            self._verifying.release()

    # ------------------------------------------------------------------ internals

    def _write(self, batch: list[Event], *, checkpoint: bool = False) -> bool:
        """Append `batch`; whether it is written (or replaced by rejection records)."""
        try:
            self.log.append(batch, checkpoint=checkpoint)
        except AuditLogTampered as exc:
            self._alarm(exc.message, exc)
            return False
        except StorageUnavailable as exc:
            logger.error("audit records were not written", extra={"reason": exc.message})
            return False
        except Exception as exc:
            if _looks_unavailable(exc):
                logger.error(
                    "audit records were not written", extra={"exc_type": type(exc).__name__}
                )
                return False
            return self._write_one_by_one(batch, checkpoint=checkpoint)
        self.written += len(batch)
        return True

    def _write_one_by_one(self, batch: list[Event], *, checkpoint: bool) -> bool:
        """A batch the database refused: each event alone, a refused one recorded as
        rejected (its kind only), so one bad event never blocks the others."""
        for event in batch:
            try:
                self.log.append([event], checkpoint=checkpoint)
                self.written += 1
                continue
            except Exception as exc:
                if _looks_unavailable(exc) or isinstance(exc, AuditLogTampered):
                    return False
                logger.error(
                    "an audit event was refused by the database",
                    extra={"event": str(event.kind)[:64], "exc_type": type(exc).__name__},
                )
            self.rejected += 1
            rejected = Event(
                kind=EVENT_REJECTED,
                outcome="failure",
                actor="system",
                detail={"kind": str(event.kind)[:64].encode("ascii", "replace").decode()},
                at=event.at,
            )
            try:
                self.log.append([rejected], checkpoint=checkpoint)
            except Exception:
                self._count_dropped(1)
        return True

    def _alarm(self, message: str, exc: Exception) -> None:
        """A problem with the log itself: logged every time, reported once per message."""
        logger.error("audit log problem", extra={"problem": message[:200]})
        if message in self._reported:
            return
        self._reported.add(message)
        if len(self._reported) > 1000:
            self._reported.clear()
        if isinstance(exc, AuditLogTampered):
            self._report(_verify_failed(1, message))

    def _report(self, event: Event) -> None:
        (self.on_event or self.emit)(event)

    def _requeue(self, batch: list[Event]) -> None:
        self._pending.extendleft(reversed(batch))
        excess = len(self._pending) - self._max_pending
        for _ in range(max(0, excess)):
            self._pending.popleft()
        if excess > 0:
            self._count_dropped(excess)

    def _count_dropped(self, count: int) -> None:
        before = self.dropped
        self.dropped += count
        if before == 0 or before // 10_000 != self.dropped // 10_000:
            logger.error(
                "audit events dropped: the database has not taken them",
                extra={"dropped": self.dropped},
            )

    def _checkpoint(self) -> None:
        try:
            self.log.checkpoint()
        except AuditLogTampered as exc:
            self._alarm(exc.message, exc)
        except Exception as exc:
            logger.error(
                "an audit checkpoint was not signed", extra={"exc_type": type(exc).__name__}
            )


def _verify_failed(problems: int, first: str) -> Event:
    return Event(
        kind=AUDIT_VERIFY_FAILED,
        outcome="failure",
        actor="system",
        detail={"problems": problems, "first": first[:256]},
    )


def _looks_unavailable(exc: Exception) -> bool:
    """A database that cannot be used now (locked, gone), rather than refusing the data."""
    name = type(exc).__name__
    text = str(exc).lower()
    # Two writers racing for the same sequence number or the first key (PostgreSQL, before
    # the key row exists to lock) is a retry, not bad data.
    racing = "unique" in text or "duplicate key" in text
    return name == "OperationalError" or "locked" in text or "busy" in text or racing
