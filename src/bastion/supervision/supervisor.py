"""Starts, watches, restarts and stops the worker process of every loaded model.

The supervisor is what the gateway talks to: it keeps one :class:`ModelSlot` per model,
hands each to the :class:`~bastion.supervision.lifecycle.WorkerLifecycle` that runs its worker
(launch, load, heartbeats, restart with backoff, drain), and sends requests to the worker
of a ready model. One model's trouble never touches another model's worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from bastion.audit.events import MODEL_UNLOADED, EventSink
from bastion.config import Settings
from bastion.errors import ConfigurationError, ModelUnavailable
from bastion.sandboxes.base import Sandbox
from bastion.sandboxes.factory import Sandboxes
from bastion.supervision.channel import Reply, Settle, WorkerChannel
from bastion.supervision.lifecycle import (
    ModelSlot,
    ModelSpec,
    ModelState,
    ModelStatus,
    WorkerLifecycle,
)
from bastion.wire.protocol import ClearRisk, ModelMetadata, Notice, SealingKeys, WorkRequest

__all__ = ["ModelSpec", "ModelState", "ModelStatus", "Supervisor"]

# Unix socket paths hold at most 107 bytes; a worker's socket adds 18 to the runtime dir.
_MAX_RUNTIME_DIR_CHARS = 80


class Supervisor:
    """Runs one worker per model through a sandbox backend, and keeps it running."""

    def __init__(self, settings: Settings, sandbox: Sandbox | Sandboxes, events: EventSink) -> None:
        self._settings = settings
        self._slots: dict[str, ModelSlot] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._runtime_dir: Path | None = None
        self._closing = False
        self._sealing_keys: SealingKeys | None = None
        sandboxes = sandbox if isinstance(sandbox, Sandboxes) else Sandboxes(sandbox)
        #: Where the workers' protection notices go: (model, notice).
        self.on_notice: Callable[[str, Notice], None] | None = None
        self._lifecycle = WorkerLifecycle(
            settings, sandboxes, events, lambda: self._sealing_keys, self._noticed
        )
        #: How workers are isolated: the server's backend, and those models asked for.
        self.sandboxes = sandboxes
        self.sandbox = sandboxes.default

    @property
    def runtime_dir(self) -> Path:
        """The private (0700) directory holding one subdirectory per worker."""
        if self._runtime_dir is None:
            raise RuntimeError("Supervisor.start() was not called")
        return self._runtime_dir

    async def start(self) -> None:
        """Create the runtime directory."""
        self._runtime_dir = _make_runtime_dir()

    # ------------------------------------------------------------------ public API

    async def ensure(self, spec: ModelSpec) -> None:
        """Start a worker for `spec` unless one runs already; restart it if `spec` changed."""
        if self._runtime_dir is None:
            raise RuntimeError("Supervisor.start() was not called")
        if self._closing:
            raise ModelUnavailable("The server is shutting down.")
        async with self._lock(spec.name):
            slot = self._slots.get(spec.name)
            if slot is not None and slot.spec == spec and not slot.stop_requested.is_set():
                return
            if slot is not None:
                await self._stop_slot(slot, self._settings.drain_timeout_s)
                self._slots.pop(spec.name, None)
            if self._closing:
                raise ModelUnavailable("The server is shutting down.")
            slot = ModelSlot(spec, self._settings.restart_backoff_initial_s)
            self._slots[spec.name] = slot
            slot.task = asyncio.create_task(
                self._lifecycle.supervise(slot, self._runtime_dir), name=f"supervise:{spec.name}"
            )

    async def unload(self, name: str) -> None:
        """Drain the model's requests (up to the drain timeout) and stop its worker."""
        async with self._lock(name):
            slot = self._slots.get(name)
            if slot is None:
                return
            await self._stop_slot(slot, self._settings.drain_timeout_s)
            self._slots.pop(name, None)

    def set_sealing_keys(self, keys: SealingKeys) -> None:
        """Hand every worker, running and future, the OHTTP keys in force."""
        self._sealing_keys = keys
        for slot in self._slots.values():
            if slot.channel is not None:
                slot.channel.send_nowait(keys)

    def _noticed(self, model: str, notice: Notice) -> None:
        if self.on_notice is not None:
            self.on_notice(model, notice)

    def clear_risk(self, model: str, key: str) -> None:
        """Tell the model's worker, if one runs, to forget API key `key`'s history."""
        slot = self._slots.get(model)
        if slot is not None and slot.channel is not None:
            slot.channel.send_nowait(ClearRisk(key=key))

    def status(self, name: str) -> ModelStatus:
        slot = self._slots.get(name)
        if slot is None:
            return ModelStatus(name=name, state=ModelState.UNLOADED, since=time.time())
        return slot.status()

    def ready_metadata(self, name: str) -> ModelMetadata | None:
        """The metadata of the model if it is ready (its status says so), else None: what a
        request asks, without building the whole status."""
        slot = self._slots.get(name)
        if slot is None or slot.state is not ModelState.READY:
            return None
        return slot.metadata

    def statuses(self) -> dict[str, ModelStatus]:
        return {name: slot.status() for name, slot in self._slots.items()}

    async def wait_ready(self, name: str, timeout: float) -> ModelStatus:
        """Wait until the model is ready or has failed to load, or `timeout` passes.

        Returns the status at that moment; the caller checks its state.
        """
        deadline = time.monotonic() + timeout
        while True:
            slot = self._slots.get(name)
            if slot is None or slot.state in (ModelState.READY, ModelState.FAILED):
                return self.status(name)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return slot.status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.changed.wait(), remaining)

    def stream(
        self, name: str, message: WorkRequest, settle: Settle | None = None
    ) -> AsyncGenerator[Reply, None]:
        """Send `message` to the model's worker; yields TextDeltas, then the final reply.

        Raises ModelUnavailable (503 with Retry-After) at once if the model is not ready,
        and WorkerCrashed from the iterator if the worker dies while answering.
        """
        return self._channel(name).request(message, settle)

    async def call(self, name: str, message: WorkRequest, settle: Settle | None = None) -> Reply:
        """Send `message` and return the final reply (a result or RequestFailed)."""
        return await self._channel(name).call(message, settle)

    def _channel(self, name: str) -> WorkerChannel:
        """The channel of a ready model's worker; ModelUnavailable otherwise."""
        slot = self._slots.get(name)
        if self._closing:
            raise ModelUnavailable("The server is shutting down.")
        if slot is None or slot.state is not ModelState.READY or slot.channel is None:
            raise self._unavailable(slot)
        return slot.channel

    def in_flight(self, name: str) -> int:
        """Requests sent to the model's worker and not yet answered."""
        slot = self._slots.get(name)
        return slot.channel.in_flight if slot is not None and slot.channel is not None else 0

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Refuse new requests, let in-flight ones finish (up to the timeout), stop workers."""
        self._closing = True
        timeout = self._settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        slots = list(self._slots.values())
        await asyncio.gather(*(self._stop_slot(slot, timeout) for slot in slots))
        self._slots.clear()
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None

    async def _stop_slot(self, slot: ModelSlot, drain_timeout_s: float) -> None:
        slot.set_state(ModelState.STOPPING)
        slot.drain_deadline = time.monotonic() + drain_timeout_s
        if slot.channel is not None:
            slot.channel.start_draining()
        slot.stop_requested.set()
        if slot.task is not None:
            await asyncio.shield(slot.task)
        if not slot.unload_reported:
            slot.unload_reported = True
            self._lifecycle.emit(MODEL_UNLOADED, slot)

    def _unavailable(self, slot: ModelSlot | None) -> ModelUnavailable:
        if slot is None:
            return ModelUnavailable("The model is not loaded.")
        wait_s = max(0, math.ceil(slot.retry_at - time.monotonic())) + 1
        if slot.state is ModelState.LOADING:
            return ModelUnavailable("The model is loading; retry shortly.", retry_after_s=1)
        if slot.state is ModelState.RESTARTING:
            return ModelUnavailable(
                "The model's worker is restarting; retry shortly.", retry_after_s=wait_s
            )
        if slot.state is ModelState.INTEGRITY_FAILED:
            return ModelUnavailable(
                "The model's files failed their integrity check; an operator must replace them.",
                code="integrity_failed",
                retry_after_s=60,
            )
        if slot.state is ModelState.FAILED:
            return ModelUnavailable(
                "The model failed to load; it will be retried.", retry_after_s=wait_s
            )
        return ModelUnavailable("The model is being stopped.")

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


def _make_runtime_dir() -> Path:
    """A fresh 0700 directory with a path short enough for Unix socket names."""
    path = Path(tempfile.mkdtemp(prefix="bastion-"))
    if len(str(path)) > _MAX_RUNTIME_DIR_CHARS:
        # TMPDIR is too deep for socket paths; /tmp always exists on the systems we run on.
        path.rmdir()
        path = Path(tempfile.mkdtemp(prefix="bastion-", dir="/tmp"))
    if len(str(path)) > _MAX_RUNTIME_DIR_CHARS:
        path.rmdir()
        raise ConfigurationError("No temporary directory with a path short enough for sockets.")
    os.chmod(path, 0o700)
    return path
