"""The gateway's side of the extraction monitor: acting on what the workers report.

A model's worker scores every key's queries (:mod:`bastion.protection.monitor`) and reports
a key's score when its level changes, and every few dozen queries. :class:`ProtectionDesk`
takes those reports (events loop, no I/O), and

- raises an alert (event ``protect.extraction_suspected``, metric) when a key reaches the
  alert level;
- throttles a key at the throttle level: its requests to that model pass at most at the
  policy's rate, others get 429 ``extraction_throttled``;
- blocks a key at the block level: 403 ``extraction_suspected`` on that model, from every
  gateway, until an admin clears it (``bastion protect clear --key``);

and keeps the latest score per (key, model) for the CLI (written by the control plane,
:meth:`flush`). Reports carry scores and counts, never an input.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from bastion.audit.events import (
    PROTECT_EXTRACTION_SUSPECTED,
    PROTECT_KEY_BLOCKED,
    PROTECT_KEY_THROTTLED,
    Event,
    EventSink,
)
from bastion.errors import ExtractionSuspected, RateLimited
from bastion.models.marks import MarksStore, SealedRecord
from bastion.models.risk import RiskBoard, RiskRecord
from bastion.observability.metrics import Metrics
from bastion.protection.monitor import LEVELS, MonitorPolicy
from bastion.wire.protocol import Caller, ExtractionRisk, Notice, WatermarkRecord

logger = logging.getLogger("bastion.gateway")

Pair = tuple[str, str]
# Sealed watermark records waiting to be written, at most (a stalled database drops more).
MAX_PENDING = 10_000
# A record's size and classes, at most; the callers remembered (then forgotten at once).
MAX_RECORD_BYTES = 4 * 1024 * 1024
MAX_CLASSES = 1_000_000
MAX_CALLERS = 100_000
# What a risk report may hold (a worker runs model code: its reports are checked).
MAX_RISK = 1e6
MAX_COUNT = 2**53
SIGNALS = frozenset({"prada_w", "prada", "ood", "outlier_share", "coverage"})


class _Bucket:
    """A token bucket of `rate` requests per second (burst 1)."""

    __slots__ = ("available", "rate", "stamp")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.available = 1.0
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if a request may pass now (and take its token), else seconds to wait."""
        now = time.monotonic()
        self.available = min(1.0, self.available + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.available >= 1.0:
            self.available -= 1.0
            return 0.0
        return (1.0 - self.available) / self.rate


class ProtectionDesk:
    """Acts on the extraction monitors' reports; see the module docstring."""

    def __init__(
        self,
        events: EventSink,
        metrics: Metrics,
        policy_of: Callable[[str, str, str], MonitorPolicy],
        clear_worker: Callable[[str, str], None] = lambda model, key: None,
    ) -> None:
        self._events = events
        self._metrics = metrics
        self._policy_of = policy_of
        self._clear_worker = clear_worker
        self._blocked: frozenset[Pair] = frozenset()
        self._throttled: dict[Pair, _Bucket] = {}
        self._latest: dict[Pair, RiskRecord] = {}
        self._unwritten: dict[Pair, RiskRecord] = {}
        self._records: list[SealedRecord] = []
        # The (key, model) pairs this gateway sent requests for, and each key's tenant: a
        # worker may only report on callers of its own model, attributed by the gateway.
        self._callers: dict[Pair, str] = {}
        # Records each model's worker may still send: two per request it was sent (its
        # marks and its controls), so a worker cannot flood the database.
        self._record_budget: dict[str, int] = {}

    # ------------------------------------------------------------------ the request path

    def check(self, key_id: str, model: str) -> None:
        """403 if the key is blocked on the model, 429 while it is throttled too fast."""
        pair = (key_id, model)
        if pair in self._blocked:
            self._metrics.protect_actions.labels(model, "refused").inc()
            raise ExtractionSuspected(
                "This API key's queries to this model look like an attempt to copy it; "
                "it is blocked until an administrator clears it."
            )
        bucket = self._throttled.get(pair)
        if bucket is not None:
            wait = bucket.take()
            if wait > 0:
                self._metrics.protect_actions.labels(model, "throttled").inc()
                raise RateLimited(
                    "This API key's queries to this model are throttled: they look like "
                    "an attempt to copy it.",
                    code="extraction_throttled",
                    headers={"retry-after": str(max(1, round(wait + 0.5)))},
                )

    # ------------------------------------------------------------------ the workers'

    def saw(self, key_id: str, tenant: str, model: str) -> None:
        """A request of `key_id` (of `tenant`) is going to `model`'s worker."""
        self._record_budget[model] = min(self._record_budget.get(model, 0) + 2, MAX_PENDING)
        pair = (key_id, model)
        if pair not in self._callers:
            if len(self._callers) >= MAX_CALLERS:
                self._callers.clear()
            self._callers[pair] = tenant

    def notice(self, model: str, notice: Notice) -> None:
        """A worker's notice: a risk report, or a sealed record of watermarked answers.
        A worker is model code's process: what it says is checked, never trusted."""
        if isinstance(notice, WatermarkRecord):
            caller = notice.caller
            key = caller.key if caller is not None else None
            tenant = self._callers.get((key, model)) if key is not None else None
            if (
                notice.kind not in ("marks", "controls")
                or not 2 <= notice.classes <= MAX_CLASSES
                or not 1 <= notice.count <= MAX_COUNT
                or len(notice.blob) > MAX_RECORD_BYTES
                or (key is not None and tenant is None)
                or len(self._records) >= MAX_PENDING
                or self._record_budget.get(model, 0) < 1
            ):
                logger.warning("dropped a watermark record", extra={"model": model})
                return
            self._record_budget[model] -= 1
            self._records.append(
                SealedRecord(
                    model=model,
                    key_id=key,
                    tenant=tenant,
                    kind=notice.kind,
                    classes=notice.classes,
                    count=notice.count,
                    blob=notice.blob,
                    created_at=datetime.now(UTC),
                )
            )
            return
        self.reported(model, notice)

    def reported(self, model: str, report: ExtractionRisk) -> None:
        """Take a worker's report on one key (on the event loop; no I/O)."""
        pair = (report.caller.key, model)
        tenant = self._callers.get(pair)
        if (
            report.level not in LEVELS
            or tenant is None
            or not 0 <= report.risk <= MAX_RISK  # also false for NaN
            or not 0 <= report.queries <= MAX_COUNT
            or not set(report.signals) <= SIGNALS
            or not all(math.isfinite(v) for v in report.signals.values())
        ):
            # Malformed, or about a key this gateway never sent to that model.
            logger.warning("ignored a risk report", extra={"model": model})
            return
        caller = Caller(tenant=tenant, key=report.caller.key)
        before = self._latest.get(pair)
        blocked_at = before.blocked_at if before is not None else None
        rising = _rank(report.level) > _rank(before.level if before is not None else "ok")
        # A block decided here and not written yet: the database learns of it as new (a
        # block carried over from an earlier report never overrides an admin's clear).
        unwritten = self._unwritten.get(pair)
        new_block = unwritten is not None and unwritten.new_block
        if report.level == "block" and blocked_at is None:
            blocked_at = datetime.now(UTC)
            new_block = True
            self._blocked = self._blocked | {pair}
        record = RiskRecord(
            key_id=caller.key,
            model=model,
            tenant=caller.tenant,
            risk=report.risk,
            level="block" if blocked_at is not None else report.level,
            queries=report.queries,
            signals=dict(report.signals),
            blocked_at=blocked_at,
            new_block=new_block,
        )
        self._latest[pair] = self._unwritten[pair] = record
        self._metrics.extraction_risk_reports.labels(model).observe(report.risk)
        self._set_top(model)
        if report.level == "throttle" and pair not in self._throttled:
            policy = self._policy_of(model, caller.tenant, caller.key)
            self._throttled[pair] = _Bucket(policy.throttle_rps)
        elif report.level in ("ok", "alert"):
            # Back below the throttle level: the key's rate is its own again.
            self._throttled.pop(pair, None)
        if rising:
            self._act(model, record)

    def _act(self, model: str, record: RiskRecord) -> None:
        kind = {
            "alert": PROTECT_EXTRACTION_SUSPECTED,
            "throttle": PROTECT_KEY_THROTTLED,
            "block": PROTECT_KEY_BLOCKED,
        }[record.level]
        self._metrics.protect_actions.labels(model, record.level).inc()
        logger.warning(
            "suspected model extraction",
            extra={"model": model, "tenant": record.tenant, "action": record.level},
        )
        self._events.emit(
            Event(
                kind=kind,
                outcome="failure",
                actor=record.key_id,
                tenant=record.tenant,
                target=model,
                detail={
                    "risk": record.risk,
                    "queries": record.queries,
                    **{f"signal_{name}": value for name, value in record.signals.items()},
                },
            )
        )

    # ------------------------------------------------------------------ the control plane's

    def flush_records(self, store: MarksStore) -> None:
        """Store the sealed watermark records received since the last call (in a thread)."""
        records, self._records = self._records, []
        try:
            store.add(records)
        except Exception:
            self._records[:0] = records[: MAX_PENDING - len(self._records)]
            raise

    def flush(self, board: RiskBoard) -> None:
        """Write the scores reported since the last call (in a thread: blocking I/O)."""
        unwritten, self._unwritten = self._unwritten, {}
        try:
            board.record(unwritten.values())
        except Exception:
            # Kept for the next flush, unless a newer report replaced it meanwhile.
            for pair, record in unwritten.items():
                self._unwritten.setdefault(pair, record)
            raise

    def update_blocked(self, blocked: frozenset[Pair], present: frozenset[Pair]) -> None:
        """Take the blocks in the database (the control plane's call on a new revision):
        a block lifted there (an admin cleared the key) is lifted here, and the model's
        worker forgets the key's history. `present`: every (key, model) with a row."""
        for pair, record in list(self._latest.items()):
            unwritten = self._unwritten.get(pair)
            if unwritten is not None and unwritten.new_block:
                continue  # a block decided here, not written yet
            gone = pair not in present and unwritten is None
            lifted = record.blocked_at is not None and pair not in blocked
            if not (gone or lifted):
                continue
            # An admin cleared it (its row is gone, or its block lifted).
            self._unwritten.pop(pair, None)
            del self._latest[pair]
            self._throttled.pop(pair, None)
            self._clear_worker(pair[1], pair[0])
            self._set_top(pair[1])
        pending = {p for p, r in self._unwritten.items() if r.new_block}
        self._blocked = blocked | pending
        for pair in self._blocked & self._latest.keys():
            self._throttled.pop(pair, None)

    def _set_top(self, model: str) -> None:
        risks = [r.risk for (_, m), r in self._latest.items() if m == model]
        self._metrics.extraction_risk.labels(model).set(max(risks, default=0.0))

    def snapshot(self) -> list[RiskRecord]:
        return sorted(self._latest.values(), key=lambda r: (-r.risk, r.key_id, r.model))


def _rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else 0
