"""Starts, watches, restarts and stops the workers of every loaded model.

The supervisor is what the gateway talks to: it keeps one :class:`ModelSlot` per replica
of each model (the model's ``replicas`` option, one by default), hands each to the
:class:`~bastion.supervision.lifecycle.WorkerLifecycle` that runs its worker (launch, load,
heartbeats, restart with backoff, drain), and sends each request to the least busy ready
replica. One model's trouble never touches another model's workers, and one replica's
crash fails only the requests it held: the others keep serving while it restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path

from bastion.audit.events import MODEL_FAILED, MODEL_UNLOADED, EventSink
from bastion.config import MAX_REPLICAS, REPLICAS_OPTION, Settings, replica_count
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

__all__ = [
    "MAX_REPLICAS",
    "REPLICAS_OPTION",
    "ModelSpec",
    "ModelState",
    "ModelStatus",
    "Supervisor",
    "replica_count",
]

logger = logging.getLogger("bastion.supervision.supervisor")

# Unix socket paths hold at most 107 bytes; a worker's socket adds 18 to the runtime dir.
_MAX_RUNTIME_DIR_CHARS = 80

# Which state of a replica that cannot answer promises an answer soonest: a model none of
# whose replicas is ready describes itself by that one (its state, its Retry-After).
_AVAILABILITY = {
    ModelState.READY: 0,
    ModelState.LOADING: 1,
    ModelState.RESTARTING: 2,
    ModelState.FAILED: 3,
    ModelState.STOPPING: 4,
    ModelState.INTEGRITY_FAILED: 5,
    ModelState.UNLOADED: 6,
}


class _Replicas:
    """The slots of one model, one per replica, all running the same spec."""

    __slots__ = ("primary", "single", "slots", "spec", "turn")

    def __init__(self, spec: ModelSpec, slots: tuple[ModelSlot, ...]) -> None:
        self.spec = spec
        self.slots = slots
        self.primary = slots[0]
        self.single = len(slots) == 1
        # Where the next search for the least busy replica starts, so that replicas that
        # are equally busy take turns.
        self.turn = 0

    def stop_requested(self) -> bool:
        return any(slot.stop_requested.is_set() for slot in self.slots)


class Supervisor:
    """Runs each model's workers (its replicas) through a sandbox backend, keeps them
    running, and routes each request to the least busy ready one."""

    def __init__(self, settings: Settings, sandbox: Sandbox | Sandboxes, events: EventSink) -> None:
        self._settings = settings
        self._models: dict[str, _Replicas] = {}
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
        """Start the workers of `spec` unless they run already; replace them all if `spec`
        changed (its number of replicas included)."""
        if self._runtime_dir is None:
            raise RuntimeError("Supervisor.start() was not called")
        if self._closing:
            raise ModelUnavailable("The server is shutting down.")
        async with self._lock(spec.name):
            replicas = self._models.get(spec.name)
            if (
                replicas is not None
                and _same_spec(replicas.spec, spec)
                and not replicas.stop_requested()
            ):
                return
            if replicas is not None:
                await self._stop_replicas(replicas, self._settings.drain_timeout_s)
                self._models.pop(spec.name, None)
            if self._closing:
                raise ModelUnavailable("The server is shutting down.")
            self._models[spec.name] = self._start_replicas(spec, self._runtime_dir)

    async def unload(self, name: str) -> None:
        """Drain the model's requests (up to the drain timeout) and stop its workers."""
        async with self._lock(name):
            replicas = self._models.get(name)
            if replicas is None:
                return
            await self._stop_replicas(replicas, self._settings.drain_timeout_s)
            self._models.pop(name, None)

    def set_sealing_keys(self, keys: SealingKeys) -> None:
        """Hand every worker, running and future, the OHTTP keys in force."""
        self._sealing_keys = keys
        for replicas in self._models.values():
            for slot in replicas.slots:
                if slot.channel is not None:
                    slot.channel.send_nowait(keys)

    def _noticed(self, model: str, notice: Notice) -> None:
        if self.on_notice is not None:
            self.on_notice(model, notice)

    def clear_risk(self, model: str, key: str) -> None:
        """Tell the model's workers, those that run, to forget API key `key`'s history."""
        replicas = self._models.get(model)
        if replicas is None:
            return
        message = ClearRisk(key=key)
        for slot in replicas.slots:
            if slot.channel is not None:
                slot.channel.send_nowait(message)

    def status(self, name: str) -> ModelStatus:
        """The model's status: ready if any replica is (see :meth:`replica_statuses`)."""
        replicas = self._models.get(name)
        if replicas is None:
            return ModelStatus(name=name, state=ModelState.UNLOADED, since=time.time())
        return _status_of(replicas)

    def replica_statuses(self, name: str) -> list[ModelStatus]:
        """The status of each of the model's replicas, in a stable order (empty if the
        model is not loaded)."""
        replicas = self._models.get(name)
        return [] if replicas is None else [slot.status() for slot in replicas.slots]

    def replica_in_flight(self, name: str) -> list[int]:
        """Requests sent to each replica's worker and not yet answered, in the order of
        :meth:`replica_statuses`."""
        replicas = self._models.get(name)
        if replicas is None:
            return []
        return [0 if s.channel is None else s.channel.in_flight for s in replicas.slots]

    def ready_metadata(self, name: str) -> ModelMetadata | None:
        """The metadata of the model if it is ready (its status says so), else None: what a
        request asks, without building the whole status."""
        replicas = self._models.get(name)
        if replicas is None:
            return None
        slot = replicas.primary
        if slot.state is ModelState.READY:
            return slot.metadata
        if not replicas.single:
            for slot in replicas.slots:
                if slot.state is ModelState.READY:
                    return slot.metadata
        return None

    def statuses(self) -> dict[str, ModelStatus]:
        return {name: _status_of(replicas) for name, replicas in self._models.items()}

    async def wait_ready(self, name: str, timeout: float) -> ModelStatus:
        """Wait until a replica of the model is ready or the model has failed to load, or
        `timeout` passes.

        Returns the status at that moment; the caller checks its state.
        """
        deadline = time.monotonic() + timeout
        while True:
            replicas = self._models.get(name)
            if replicas is None:
                return self.status(name)
            status = _status_of(replicas)
            if status.state in (ModelState.READY, ModelState.FAILED):
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return status
            await _any_change(replicas.slots, remaining)

    def stream(
        self, name: str, message: WorkRequest, settle: Settle | None = None
    ) -> AsyncGenerator[Reply, None]:
        """Send `message` to a worker of the model; yields TextDeltas, then the final reply.

        Raises ModelUnavailable (503 with Retry-After) at once if no replica is ready,
        and WorkerCrashed from the iterator if the worker dies while answering.
        """
        return self._channel(name).request(message, settle)

    async def call(self, name: str, message: WorkRequest, settle: Settle | None = None) -> Reply:
        """Send `message` and return the final reply (a result or RequestFailed)."""
        return await self._channel(name).call(message, settle)

    def _channel(self, name: str) -> WorkerChannel:
        """The channel of the model's least busy ready worker; ModelUnavailable if none."""
        if self._closing:
            raise ModelUnavailable("The server is shutting down.")
        replicas = self._models.get(name)
        if replicas is None:
            raise self._unavailable(None)
        if replicas.single:
            slot = replicas.primary
            channel = slot.channel
            if slot.state is not ModelState.READY or channel is None:
                raise self._unavailable(slot)
            return channel
        return self._least_busy(replicas)

    def _least_busy(self, replicas: _Replicas) -> WorkerChannel:
        """The ready replica with the fewest requests in flight; the search starts after
        the last one chosen, so equally busy replicas take turns."""
        slots = replicas.slots
        count = len(slots)
        index = replicas.turn
        chosen: WorkerChannel | None = None
        chosen_index = fewest = 0
        for _ in range(count):
            slot = slots[index]
            channel = slot.channel
            if slot.state is ModelState.READY and channel is not None:
                load = channel.in_flight
                if chosen is None or load < fewest:
                    chosen, chosen_index, fewest = channel, index, load
                    if load == 0:
                        break
            index = index + 1 if index + 1 < count else 0
        if chosen is None:
            raise self._unavailable(_most_available(slots))
        replicas.turn = chosen_index + 1 if chosen_index + 1 < count else 0
        return chosen

    def in_flight(self, name: str) -> int:
        """Requests sent to the model's workers and not yet answered."""
        replicas = self._models.get(name)
        if replicas is None:
            return 0
        return sum(s.channel.in_flight for s in replicas.slots if s.channel is not None)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Refuse new requests, let in-flight ones finish (up to the timeout), stop workers."""
        self._closing = True
        timeout = self._settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        models = list(self._models.values())
        await asyncio.gather(*(self._stop_replicas(replicas, timeout) for replicas in models))
        self._models.clear()
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None

    def _start_replicas(self, spec: ModelSpec, runtime_dir: Path) -> _Replicas:
        backoff_s = self._settings.restart_backoff_initial_s
        try:
            count = replica_count(spec.options)
        except ConfigurationError as exc:
            # Options written past the registry's checks (an older server, the database
            # edited by hand): the model fails to load, and says why.
            slot = ModelSlot(spec, backoff_s)
            slot.set_state(ModelState.FAILED, exc.message)
            logger.warning(
                "model failed to load", extra={"model": spec.name, "reason": exc.message}
            )
            self._lifecycle.emit(MODEL_FAILED, slot, outcome="failure", reason=type(exc).__name__)
            return _Replicas(spec, (slot,))
        slots = tuple(ModelSlot(spec, backoff_s) for _ in range(count))
        for index, slot in enumerate(slots):
            task_name = f"supervise:{spec.name}" if count == 1 else f"supervise:{spec.name}#{index}"
            slot.task = asyncio.create_task(
                self._lifecycle.supervise(slot, runtime_dir), name=task_name
            )
        return _Replicas(spec, slots)

    async def _stop_replicas(self, replicas: _Replicas, drain_timeout_s: float) -> None:
        # Every replica refuses new requests before any is waited for.
        deadline = time.monotonic() + drain_timeout_s
        for slot in replicas.slots:
            slot.set_state(ModelState.STOPPING)
            slot.drain_deadline = deadline
            if slot.channel is not None:
                slot.channel.start_draining()
            slot.stop_requested.set()
        tasks = [slot.task for slot in replicas.slots if slot.task is not None]
        if tasks:
            # Shielded: a caller that is cancelled must not cut a worker's drain short.
            await asyncio.shield(asyncio.gather(*tasks))
        for slot in replicas.slots:
            if slot.task is None:
                slot.set_state(ModelState.UNLOADED)
        # One event per model, however many workers served it.
        primary = replicas.primary
        if not primary.unload_reported:
            primary.unload_reported = True
            self._lifecycle.emit(MODEL_UNLOADED, primary)

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


def _same_spec(current: ModelSpec, wanted: ModelSpec) -> bool:
    """Whether `wanted` is `current`, options compared with their types: `2.0`, `True` and
    `2` are equal in Python but not to the checks of an option (a bad `replicas: 2.0`
    fixed to `2` must replace the failed model)."""
    return current == wanted and _typed(current.options) == _typed(wanted.options)


def _typed(value: object) -> object:
    """`value` with the type of every scalar in it, for a comparison that keeps them."""
    if isinstance(value, Mapping):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return (type(value), [_typed(item) for item in value])
    return (type(value), value)


def _most_available(slots: tuple[ModelSlot, ...]) -> ModelSlot:
    """The replica that promises an answer soonest: by state, then by its next restart."""
    return min(slots, key=lambda slot: (_AVAILABILITY[slot.state], slot.retry_at))


def _status_of(replicas: _Replicas) -> ModelStatus:
    """A model's status: that of its first ready replica, else of its most available one,
    with the restarts of all; the detail says how many replicas are ready when not all."""
    slots = replicas.slots
    if replicas.single:
        return replicas.primary.status()
    ready = [slot for slot in slots if slot.state is ModelState.READY]
    if not ready:
        lead = _most_available(slots)
        detail = lead.detail
    elif len(ready) == len(slots):
        lead = ready[0]
        detail = replicas.primary.detail
    else:
        lead = ready[0]
        lagging = _most_available(tuple(slot for slot in slots if slot not in ready))
        detail = f"{len(ready)} of {len(slots)} replicas ready; one is {lagging.state}"
        if lagging.detail:
            detail += f": {lagging.detail}"
    return ModelStatus(
        name=replicas.spec.name,
        state=lead.state,
        detail=detail,
        pid=lead.pid,
        restarts=sum(slot.restarts for slot in slots),
        metadata=lead.metadata,
        since=lead.since,
    )


async def _any_change(slots: tuple[ModelSlot, ...], timeout: float) -> None:
    """Wait until a state of one of `slots` changes, or `timeout` passes."""
    if len(slots) == 1:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(slots[0].changed.wait(), timeout)
        return
    waiters = [asyncio.ensure_future(slot.changed.wait()) for slot in slots]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


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
