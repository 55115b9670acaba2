"""The control plane: keeps the gateway's view of the database current, and the workers in
line with it.

The gateway (:mod:`bastion.gateway.gateway`) serves requests from what it holds in memory;
this module is the one that changes what it holds. On start and then every
``refresh_interval_s`` (and at once after an admin change; on PostgreSQL also at once when
any process commits one, told by the database's notification) it re-reads keys, quotas,
models and OHTTP keys when the database revision moved, hands them to the gateway, and
reconciles the workers with the models' desired states (a bundle's data key unsealed for
its worker). Between refreshes it retires expired OHTTP keys, gives back fair-queue places
whose requests vanished, publishes the workers' states for ``bastion models list``, and
writes metered usage to the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bastion.audit.events import SERVER_STOPPED, Event, EventSink
from bastion.audit.writer import AuditWriter
from bastion.config import Settings
from bastion.errors import ConfigurationError
from bastion.gateway.auth import Authenticator
from bastion.gateway.gateway import Gateway
from bastion.gateway.ohttp_keys import OhttpKeyStore
from bastion.models.bundle.reader import (
    IntegrityError,
    expect_identity,
    read_bundle,
    unseal_data_key,
)
from bastion.models.bundle_store import BUNDLE_OPTION, BundleStore
from bastion.models.marks import MarksStore
from bastion.models.overrides import OverrideStore
from bastion.models.registry import ModelRecord, ModelRegistry
from bastion.models.risk import RiskBoard
from bastion.models.status import PublishedStatus, StatusBoard, gateway_name
from bastion.models.watermark_secret import WatermarkSecret
from bastion.protection.policy import watermark_on
from bastion.quotas.store import QuotaStore
from bastion.quotas.usage import UsageMeter
from bastion.sandboxes.uids import grant_group_read
from bastion.store.db import Database
from bastion.supervision.supervisor import ModelSpec, Supervisor

if TYPE_CHECKING:
    from bastion.store.watch import RevisionWatcher

logger = logging.getLogger("bastion.gateway")

# How often watermark records past their retention are deleted.
MARKS_EXPIRY_INTERVAL_S = 3600.0
# The actor of changes the server makes by itself (first OHTTP key, key retirement).
SYSTEM_ACTOR = "system"


class ControlPlane:
    """Refreshes the gateway's view and reconciles the workers; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        gateway: Gateway,
        authenticator: Authenticator,
        registry: ModelRegistry,
        quotas: QuotaStore,
        supervisor: Supervisor,
        ohttp_keys: OhttpKeyStore,
        meter: UsageMeter,
        events: EventSink,
        bundles: BundleStore | None = None,
        watermarks: WatermarkSecret | None = None,
        audit: AuditWriter | None = None,
        closers: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.settings = settings
        self.db = db
        self.gateway = gateway
        self.authenticator = authenticator
        self.registry = registry
        self.quotas = quotas
        self.supervisor = supervisor
        self.ohttp_keys = ohttp_keys
        self.meter = meter
        self.events = events
        self.bundles = bundles
        self.watermarks = watermarks
        self.audit = audit
        # Run (in a thread) once the server has stopped: e.g. the alert webhook's delivery.
        self._closers = tuple(closers)
        # Publishes this gateway's model states under a name of its own, beside those of
        # the other gateways sharing the database.
        self.status_board = StatusBoard(db, gateway_name(settings.port))
        self.risk_board = RiskBoard(db, events)
        self.marks = MarksStore(db, settings.watermark_retention_days)
        self.overrides = OverrideStore(db, events)
        self._expired_at = -MARKS_EXPIRY_INTERVAL_S
        self._revision = -1
        self._refresher: asyncio.Task[None] | None = None
        # On PostgreSQL: hears committed changes at once (the poll above stays).
        self._watcher: RevisionWatcher | None = None
        self._listener: asyncio.Task[None] | None = None
        self._flushed_at = time.monotonic()
        self.started = False

    async def start(self) -> None:
        if self.audit is not None:
            # From now on events are queued and written from a thread (group commit).
            self.audit.start_background()
        recovered = await asyncio.to_thread(self.meter.recover)
        if recovered:
            logger.info(
                "added the usage a stopped gateway had not written", extra={"records": recovered}
            )
        await self.supervisor.start()
        await asyncio.to_thread(self.ohttp_keys.ensure_current, SYSTEM_ACTOR)
        await self.refresh()
        await self._publish_statuses()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="bastion-refresh")
        self._watch_changes()
        self.started = True

    async def stop(self) -> None:
        self.gateway.drain()
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.close)
        for task in (self._refresher, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.supervisor.stop(self.settings.drain_timeout_s)
        await self._flush_usage()
        await self._flush_risks()
        self.meter.close()
        try:
            await asyncio.to_thread(self.status_board.clear)
        except Exception as exc:
            logger.warning(
                "could not clear the model states", extra={"exc_type": type(exc).__name__}
            )
        self.events.emit(Event(kind=SERVER_STOPPED))
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)
        for close in self._closers:
            try:
                await asyncio.to_thread(close)
            except Exception as exc:
                logger.warning("could not close cleanly", extra={"exc_type": type(exc).__name__})

    async def refresh(self) -> None:
        """Re-read keys and models when the database changed, and reconcile the workers."""
        revision = await asyncio.to_thread(self.db.revision)
        if revision == self._revision:
            return
        await asyncio.to_thread(self.authenticator.refresh)
        quotas = await asyncio.to_thread(self.quotas.table)
        records = await asyncio.to_thread(self.registry.list)
        overrides = await asyncio.to_thread(self.overrides.table)
        self.gateway.update(quotas=quotas, records=records, overrides=overrides)
        active_keys = await asyncio.to_thread(self.ohttp_keys.active)
        self.supervisor.set_sealing_keys(self.gateway.sealing.update(active_keys))
        if self.gateway.protection is not None:
            blocked, present = await asyncio.to_thread(self.risk_board.pairs)
            self.gateway.protection.update_blocked(blocked, present)
        self._revision = revision
        await self._reconcile(records)

    async def _reconcile(self, records: list[ModelRecord]) -> None:
        for record in records:
            if record.desired_state == "loaded":
                spec = ModelSpec(
                    name=record.name,
                    runtime=record.runtime,
                    path=self.resolve_model_path(record.path),
                    options=dict(record.options),
                )
                if BUNDLE_OPTION in record.options:
                    spec = await asyncio.to_thread(self._with_bundle_key, spec)
                if self.watermarks is not None and watermark_on(record.options):
                    spec = await self._with_watermark(spec)
                await self.supervisor.ensure(spec)
            elif self.supervisor.status(record.name).state != "unloaded":
                await self.supervisor.unload(record.name)
        known = {record.name for record in records}
        for name in list(self.supervisor.statuses()):
            if name not in known:
                await self.supervisor.unload(name)

    async def _with_watermark(self, spec: ModelSpec) -> ModelSpec:
        """The spec with the model's watermark keys; without them (and a warning) when the
        key ring cannot give them now: the model still loads, unmarked."""
        assert self.watermarks is not None
        try:
            key = await asyncio.to_thread(self.watermarks.model_key, spec.name)
            public = await asyncio.to_thread(self.watermarks.marks_public_key)
        except Exception as exc:
            logger.warning(
                "the watermark keys are unavailable; the model loads without its watermark",
                extra={"model": spec.name, "exc_type": type(exc).__name__},
            )
            return spec
        return replace(spec, watermark_key=key, marks_public_key=public)

    def _with_bundle_key(self, spec: ModelSpec) -> ModelSpec:
        """The spec of a bundle, with its data key unsealed for the worker (or why not)."""
        if self.bundles is None:
            return replace(spec, bundle_error="This server has no bundle store.")
        publishers: tuple[bytes, ...] = ()
        try:
            if self.settings.require_publisher:
                publishers = tuple(self.settings.publisher_keys())
                if not publishers:
                    raise ConfigurationError(
                        "The trust policy requires a publisher, but lists no publisher keys."
                    )
            bundle = read_bundle(spec.path)
            expect_identity(bundle, spec.name, spec.options.get(BUNDLE_OPTION))
            key = unseal_data_key(bundle, self.bundles.keyring)
            trusted = tuple(self.bundles.trusted_keys())
        except OSError:
            return replace(spec, bundle_error="A trusted publisher key file cannot be read.")
        except (IntegrityError, ConfigurationError) as exc:
            return replace(spec, bundle_error=str(exc)[:200])
        if os.geteuid() == 0:
            # A root gateway's workers run as users of their own, in the workers' group:
            # that group, and no one else, may read the (encrypted) bundle.
            try:
                grant_group_read(spec.path, self.settings.worker_uid_base)
            except OSError as exc:
                reason = f"The bundle cannot be shared with its worker ({exc.strerror})."
                return replace(spec, bundle_error=reason)
        return replace(spec, bundle_key=key, trusted_keys=trusted, publisher_keys=publishers)

    def resolve_model_path(self, path: str) -> Path:
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.settings.home / candidate
        # Workers start in their own directory: hand them an absolute path.
        return candidate.absolute()

    def _watch_changes(self) -> None:
        """On PostgreSQL, refresh as soon as the database says a change committed: the
        watcher's thread sets an event on the loop, so a burst of changes costs one or two
        refreshes, never one each."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def on_change(_revision: int | None) -> None:  # on the watcher's thread
            loop.call_soon_threadsafe(changed.set)

        self._watcher = self.db.watch(on_change)
        if self._watcher is not None:
            self._listener = asyncio.create_task(
                self._refresh_when_told(changed), name="bastion-refresh-notified"
            )

    async def _refresh_when_told(self, changed: asyncio.Event) -> None:
        while True:
            await changed.wait()
            changed.clear()
            try:
                await self.refresh()
            except Exception as exc:  # the poll tries again
                logger.warning("refresh failed", extra={"exc_type": type(exc).__name__})

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval_s)
            await self._flush_risks()
            try:
                retirement = self.gateway.sealing.next_retirement
                if retirement is not None and retirement <= time.time():
                    # Erases the retired private keys and bumps the revision: refresh reloads.
                    await asyncio.to_thread(self.ohttp_keys.retire_expired, SYSTEM_ACTOR)
                await self.refresh()
                self.gateway.reclaim_leaked()
                self.authenticator.flush_failures()
                await self._publish_statuses()
                if time.monotonic() - self._flushed_at >= self.settings.usage_flush_interval_s:
                    await self._flush_usage()
            except Exception as exc:  # keep serving from the cache if the store hiccups
                logger.warning("refresh failed", extra={"exc_type": type(exc).__name__})

    async def _flush_risks(self) -> None:
        """Write the extraction scores reported since the last tick (and any new block,
        which bumps the revision so that every gateway refuses the key), the sealed
        watermark records, and, hourly, delete the records past their retention. Each on
        its own: one failing never holds up the others, nor the refresh."""
        desk = self.gateway.protection
        if desk is None:
            return
        steps: list[Callable[[], object]] = [
            lambda: desk.flush(self.risk_board),
            lambda: desk.flush_records(self.marks),
        ]
        if time.monotonic() - self._expired_at >= MARKS_EXPIRY_INTERVAL_S:
            self._expired_at = time.monotonic()
            steps.append(self.marks.expire)
        for step in steps:
            try:
                await asyncio.to_thread(step)
            except Exception as exc:
                logger.warning(
                    "writing protection records failed", extra={"exc_type": type(exc).__name__}
                )

    async def _flush_usage(self) -> None:
        """Write metered usage to the database (kept in memory if that fails)."""
        self._flushed_at = time.monotonic()
        try:
            await asyncio.to_thread(self.meter.flush)
        except Exception as exc:
            logger.warning("writing usage failed", extra={"exc_type": type(exc).__name__})

    async def _publish_statuses(self) -> None:
        """Copy the workers' states to the database (this gateway's rows) for `bastion
        models list` and the admin API."""
        statuses = [
            PublishedStatus(
                name=status.name,
                state=str(status.state),
                detail=status.detail,
                restarts=status.restarts,
                since=datetime.fromtimestamp(status.since, UTC),
            )
            for status in self.supervisor.statuses().values()
        ]
        await asyncio.to_thread(self.status_board.publish, statuses)
