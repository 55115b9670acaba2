"""Starts, watches, restarts and stops the worker process of every loaded model.

Each model gets one supervising task that owns its worker from launch to exit: it sends
LoadModel, waits for Ready, then watches the process, the channel and the heartbeats. A
worker that exits, stops sending heartbeats or breaks the protocol is killed, its pending
requests fail at once with :class:`~bastion.errors.WorkerCrashed`, and a new worker starts
after an exponential backoff. One model's trouble never touches another model's worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import zmq
import zmq.asyncio

from bastion.audit.events import (
    MODEL_FAILED,
    MODEL_LOADED,
    MODEL_UNLOADED,
    WORKER_CRASHED,
    WORKER_RESTARTED,
    Event,
    EventSink,
)
from bastion.config import Settings
from bastion.errors import ConfigurationError, ModelUnavailable
from bastion.workers.channel import Reply, WorkerChannel, WorkRequest
from bastion.workers.protocol import LoadModel, ModelMetadata, Ready, Shutdown
from bastion.workers.sandbox import Sandbox, WorkerLaunch, WorkerProcess, worker_argv

logger = logging.getLogger("bastion.workers.supervisor")

# Unix socket paths hold at most 107 bytes; a worker's socket adds 18 to the runtime dir.
_MAX_RUNTIME_DIR_CHARS = 80
# After Shutdown, how long an idle worker may take to exit before it is terminated, and
# how long SIGTERM may take before SIGKILL.
_SHUTDOWN_GRACE_S = 5.0
_TERMINATE_GRACE_S = 2.0
# How long a dying worker may take to be reaped after SIGKILL.
_KILL_GRACE_S = 5.0
# A worker that failed to load exits by itself; it gets this long before it is killed.
_LOAD_FAILED_EXIT_GRACE_S = 2.0


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPING = "stopping"
    UNLOADED = "unloaded"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What to load: a model name, the runtime that serves it, its directory and options."""

    name: str
    runtime: str
    path: Path
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """A snapshot of one model's worker; `detail` is an operator-safe reason, never a payload."""

    name: str
    state: ModelState
    detail: str | None = None
    pid: int | None = None
    restarts: int = 0
    metadata: ModelMetadata | None = None
    # Wall-clock time of the last state change.
    since: float = 0.0


@dataclass(frozen=True, slots=True)
class _Failure:
    kind: Literal["crashed", "load_failed"]
    reason: str


class _Slot:
    """The supervisor's mutable record of one model."""

    def __init__(self, spec: ModelSpec, initial_backoff_s: float) -> None:
        self.spec = spec
        self.state = ModelState.LOADING
        self.detail: str | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.metadata: ModelMetadata | None = None
        self.since = time.time()
        self.channel: WorkerChannel | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_requested = asyncio.Event()
        self.drain_deadline = 0.0
        self.backoff_s = initial_backoff_s
        # Monotonic time at which the next worker starts, while waiting to restart.
        self.retry_at = 0.0
        self.unload_reported = False
        # Set and replaced on every state change, so waiters wake up.
        self.changed = asyncio.Event()

    def status(self) -> ModelStatus:
        return ModelStatus(
            name=self.spec.name,
            state=self.state,
            detail=self.detail,
            pid=self.pid,
            restarts=self.restarts,
            metadata=self.metadata,
            since=self.since,
        )


class Supervisor:
    """Runs one worker per model through a sandbox backend, and keeps it running."""

    def __init__(self, settings: Settings, sandbox: Sandbox, events: EventSink) -> None:
        self._settings = settings
        self._sandbox = sandbox
        self._events = events
        self._slots: dict[str, _Slot] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._context: zmq.asyncio.Context | None = None
        self._runtime_dir: Path | None = None
        self._closing = False
        self._check_interval_s = min(
            1.0, max(0.05, min(settings.heartbeat_interval_s, settings.heartbeat_timeout_s / 4))
        )

    @property
    def runtime_dir(self) -> Path:
        """The private (0700) directory holding one subdirectory per worker."""
        if self._runtime_dir is None:
            raise RuntimeError("Supervisor.start() was not called")
        return self._runtime_dir

    async def start(self) -> None:
        """Create the runtime directory and the ZeroMQ context."""
        self._runtime_dir = _make_runtime_dir()
        self._context = zmq.asyncio.Context()

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
            slot = _Slot(spec, self._settings.restart_backoff_initial_s)
            self._slots[spec.name] = slot
            slot.task = asyncio.create_task(self._supervise(slot), name=f"supervise:{spec.name}")

    async def unload(self, name: str) -> None:
        """Drain the model's requests (up to the drain timeout) and stop its worker."""
        async with self._lock(name):
            slot = self._slots.get(name)
            if slot is None:
                return
            await self._stop_slot(slot, self._settings.drain_timeout_s)
            self._slots.pop(name, None)

    def status(self, name: str) -> ModelStatus:
        slot = self._slots.get(name)
        if slot is None:
            return ModelStatus(name=name, state=ModelState.UNLOADED, since=time.time())
        return slot.status()

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

    def stream(self, name: str, message: WorkRequest) -> AsyncGenerator[Reply, None]:
        """Send `message` to the model's worker; yields TextDeltas, then the final reply.

        Raises ModelUnavailable (503 with Retry-After) at once if the model is not ready,
        and WorkerCrashed from the iterator if the worker dies while answering.
        """
        slot = self._slots.get(name)
        if self._closing:
            raise ModelUnavailable("The server is shutting down.")
        if slot is None or slot.state is not ModelState.READY or slot.channel is None:
            raise self._unavailable(slot)
        return slot.channel.request(message)

    async def call(self, name: str, message: WorkRequest) -> Reply:
        """Send `message` and return the final reply (a result or RequestFailed)."""
        final: Reply | None = None
        async with contextlib.aclosing(self.stream(name, message)) as replies:
            async for reply in replies:
                final = reply
        assert final is not None
        return final

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
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None

    # ------------------------------------------------------------------ lifecycle

    async def _supervise(self, slot: _Slot) -> None:
        """Keep a worker running for `slot` until it is stopped."""
        settings = self._settings
        previous: _Failure | None = None
        try:
            while True:
                failure = await self._run_worker(slot, previous)
                if failure is None or slot.stop_requested.is_set():
                    break
                slot.retry_at = time.monotonic() + slot.backoff_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(slot.stop_requested.wait(), slot.backoff_s)
                if slot.stop_requested.is_set():
                    break
                slot.backoff_s = min(slot.backoff_s * 2, settings.restart_backoff_max_s)
                slot.restarts += 1
                previous = failure
        except Exception:
            logger.exception("model supervision failed", extra={"model": slot.spec.name})
            self._set_state(slot, ModelState.FAILED, "internal error in the supervisor")
            return
        self._set_state(slot, ModelState.UNLOADED)

    async def _run_worker(self, slot: _Slot, previous: _Failure | None) -> _Failure | None:
        """Run one worker from launch to exit; returns why it ended (None: it was stopped)."""
        assert self._context is not None
        name = slot.spec.name
        worker_id = secrets.token_hex(4)
        worker_dir = self.runtime_dir / worker_id
        worker_dir.mkdir(mode=0o700)
        channel = WorkerChannel(
            self._context,
            f"ipc://{worker_dir}/ipc.sock",
            retry_after_s=self._restart_retry_after(slot),
            on_fault=lambda reason: self._channel_faulted(slot, channel, reason),
        )
        process: WorkerProcess | None = None
        exit_task: asyncio.Future[int] | None = None
        if previous is not None and previous.kind == "crashed":
            self._set_state(slot, ModelState.RESTARTING, previous.reason)
        else:
            self._set_state(slot, ModelState.LOADING)
        try:
            channel.open()
            slot.channel = channel
            launch = WorkerLaunch(
                worker_id=worker_id,
                argv=worker_argv(channel.endpoint, log_level=self._settings.log_level),
                ipc_dir=worker_dir,
                model_dir=slot.spec.path,
            )
            try:
                process = await self._sandbox.launch(launch)
            except OSError as exc:
                failure = _Failure(
                    "load_failed", f"could not start a worker ({type(exc).__name__})"
                )
                self._load_failed(slot, failure.reason)
                return failure
            slot.pid = process.pid
            exit_task = asyncio.ensure_future(process.wait())
            logger.info(
                "worker started", extra={"model": name, "worker": worker_id, "pid": process.pid}
            )
            if previous is not None:
                self._emit(WORKER_RESTARTED, slot, pid=process.pid, restarts=slot.restarts)

            loaded = await self._load(slot, channel, exit_task)
            if loaded is None:
                process.terminate()
                await asyncio.wait({exit_task}, timeout=_TERMINATE_GRACE_S)
                return None
            if isinstance(loaded, _Failure):
                if loaded.kind == "load_failed":
                    self._load_failed(slot, loaded.reason)
                    # A worker that answered LoadFailed exits by itself; one that timed out
                    # is still busy loading and is killed at once.
                    answered = channel.control.done()
                    grace_s = _LOAD_FAILED_EXIT_GRACE_S if answered else 0.0
                    await self._reap(process, exit_task, grace_s=grace_s)
                else:
                    await self._crashed(slot, channel, process, exit_task, loaded.reason)
                return loaded

            slot.metadata = loaded.metadata
            self._set_state(slot, ModelState.READY)
            self._emit(MODEL_LOADED, slot, runtime=slot.spec.runtime, pid=process.pid)
            ready_at = time.monotonic()
            reason = await self._watch(slot, channel, exit_task)
            if reason is None:
                await self._drain_and_shut_down(slot, channel, process, exit_task)
                return None
            # A worker that served for a while earned a fresh start of the backoff.
            if time.monotonic() - ready_at >= self._settings.restart_backoff_max_s:
                slot.backoff_s = self._settings.restart_backoff_initial_s
            await self._crashed(slot, channel, process, exit_task, reason)
            return _Failure("crashed", reason)
        finally:
            await self._reap(process, exit_task)
            slot.channel = None
            slot.pid = None
            await channel.close()
            shutil.rmtree(worker_dir, ignore_errors=True)

    async def _load(
        self, slot: _Slot, channel: WorkerChannel, exit_task: asyncio.Future[int]
    ) -> Ready | _Failure | None:
        """Send LoadModel and wait for the answer; None means a stop was requested."""
        settings = self._settings
        spec = slot.spec
        load = LoadModel(
            model=spec.name,
            runtime=spec.runtime,
            path=str(spec.path),
            options=dict(spec.options),
            heartbeat_interval_s=settings.heartbeat_interval_s,
        )
        sender = asyncio.ensure_future(channel.send(load))
        sender.add_done_callback(_retrieve_outcome)
        stop = asyncio.ensure_future(slot.stop_requested.wait())
        deadline = time.monotonic() + settings.load_timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    limit = f"{settings.load_timeout_s:g} s"
                    return _Failure("load_failed", f"the model did not load within {limit}")
                waiting: set[asyncio.Future[Any]] = {
                    channel.control,
                    channel.faulted,
                    exit_task,
                    stop,
                }
                await asyncio.wait(
                    waiting,
                    timeout=min(remaining, self._check_interval_s),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if channel.control.done():
                    answer = channel.control.result()
                    if isinstance(answer, Ready):
                        return answer
                    return _Failure("load_failed", answer.reason)
                if stop.done():
                    return None
                if exit_task.done():
                    status = _exit_status(exit_task)
                    return _Failure("crashed", f"the worker exited ({status}) while loading")
                if channel.faulted.done():
                    return _Failure("crashed", channel.faulted.result())
                if self._stale(channel):
                    return _Failure("crashed", self._stale_reason())
        finally:
            sender.cancel()
            stop.cancel()

    async def _watch(
        self, slot: _Slot, channel: WorkerChannel, exit_task: asyncio.Future[int]
    ) -> str | None:
        """Wait while the worker serves; returns why it must go, or None on a stop request."""
        stop = asyncio.ensure_future(slot.stop_requested.wait())
        try:
            while True:
                waiting: set[asyncio.Future[Any]] = {channel.faulted, exit_task, stop}
                await asyncio.wait(
                    waiting,
                    timeout=self._check_interval_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if exit_task.done():
                    return f"the worker exited ({_exit_status(exit_task)})"
                if channel.faulted.done():
                    return channel.faulted.result()
                if stop.done():
                    return None
                if self._stale(channel):
                    return self._stale_reason()
        finally:
            stop.cancel()

    async def _drain_and_shut_down(
        self,
        slot: _Slot,
        channel: WorkerChannel,
        process: WorkerProcess,
        exit_task: asyncio.Future[int],
    ) -> None:
        channel.start_draining()
        remaining = slot.drain_deadline - time.monotonic()
        if channel.in_flight and remaining > 0:
            idle = asyncio.ensure_future(channel.wait_idle())
            waiting: set[asyncio.Future[Any]] = {idle, exit_task, channel.faulted}
            await asyncio.wait(
                waiting,
                timeout=remaining,
                return_when=asyncio.FIRST_COMPLETED,
            )
            idle.cancel()
        if not exit_task.done() and not channel.faulted.done():
            channel.send_nowait(Shutdown())
            await asyncio.wait({exit_task}, timeout=_SHUTDOWN_GRACE_S)
        if not exit_task.done():
            process.terminate()
            await asyncio.wait({exit_task}, timeout=_TERMINATE_GRACE_S)
        if channel.in_flight:
            logger.warning(
                "stopped a worker with requests in flight",
                extra={"model": slot.spec.name, "in_flight": channel.in_flight},
            )

    async def _crashed(
        self,
        slot: _Slot,
        channel: WorkerChannel,
        process: WorkerProcess,
        exit_task: asyncio.Future[int],
        reason: str,
    ) -> None:
        # Refuse new requests and fail pending ones before the (slower) kill and reap.
        self._set_state(slot, ModelState.RESTARTING, reason)
        channel.fail(reason, retry_after_s=self._restart_retry_after(slot))
        pid = process.pid
        exit_code = await self._reap(process, exit_task)
        logger.warning(
            "worker crashed",
            extra={"model": slot.spec.name, "pid": pid, "reason": reason, "exit_code": exit_code},
        )
        self._emit(
            WORKER_CRASHED,
            slot,
            outcome="failure",
            reason=reason,
            exit_code=exit_code,
            pid=pid,
            restarts=slot.restarts,
        )

    def _channel_faulted(self, slot: _Slot, channel: WorkerChannel, reason: str) -> None:
        # Called the moment a channel faults, before the watcher wakes up: a client that
        # just got WorkerCrashed and retries must find the model restarting, not ready.
        if slot.state is ModelState.READY and slot.channel is channel:
            self._set_state(slot, ModelState.RESTARTING, reason)

    def _load_failed(self, slot: _Slot, reason: str) -> None:
        self._set_state(slot, ModelState.FAILED, reason)
        logger.warning("model failed to load", extra={"model": slot.spec.name, "reason": reason})
        self._emit(MODEL_FAILED, slot, outcome="failure", reason=reason, restarts=slot.restarts)

    async def _reap(
        self,
        process: WorkerProcess | None,
        exit_task: asyncio.Future[int] | None,
        grace_s: float = 0.0,
    ) -> int | None:
        """Make sure the worker is gone; returns its exit status if known."""
        if process is None or exit_task is None:
            return None
        if not exit_task.done() and grace_s > 0:
            await asyncio.wait({exit_task}, timeout=grace_s)
        if not exit_task.done():
            process.kill()
            await asyncio.wait({exit_task}, timeout=_KILL_GRACE_S)
        if not exit_task.done():
            exit_task.cancel()
            return None
        if exit_task.cancelled() or exit_task.exception() is not None:
            return None
        return exit_task.result()

    async def _stop_slot(self, slot: _Slot, drain_timeout_s: float) -> None:
        self._set_state(slot, ModelState.STOPPING)
        slot.drain_deadline = time.monotonic() + drain_timeout_s
        if slot.channel is not None:
            slot.channel.start_draining()
        slot.stop_requested.set()
        if slot.task is not None:
            await asyncio.shield(slot.task)
        if not slot.unload_reported:
            slot.unload_reported = True
            self._emit(MODEL_UNLOADED, slot)

    # ------------------------------------------------------------------ helpers

    def _set_state(self, slot: _Slot, state: ModelState, detail: str | None = None) -> None:
        # Once stopping, a model only moves on to unloaded: a crash while draining must not
        # make it look like it is coming back.
        if slot.state is ModelState.STOPPING and state is not ModelState.UNLOADED:
            return
        slot.state = state
        slot.detail = detail
        slot.since = time.time()
        changed, slot.changed = slot.changed, asyncio.Event()
        changed.set()

    def _emit(
        self, kind: str, slot: _Slot, outcome: str = "success", **detail: str | int | None
    ) -> None:
        self._events.emit(Event(kind=kind, outcome=outcome, target=slot.spec.name, detail=detail))

    def _stale(self, channel: WorkerChannel) -> bool:
        # Until its first message a worker is still starting; load_timeout_s covers that.
        if channel.last_seen is None:
            return False
        return time.monotonic() - channel.last_seen > self._settings.heartbeat_timeout_s

    def _stale_reason(self) -> str:
        return f"no heartbeat for {self._settings.heartbeat_timeout_s:g} s"

    def _restart_retry_after(self, slot: _Slot) -> int:
        return math.ceil(slot.backoff_s) + 1

    def _unavailable(self, slot: _Slot | None) -> ModelUnavailable:
        if slot is None:
            return ModelUnavailable("The model is not loaded.")
        wait_s = max(0, math.ceil(slot.retry_at - time.monotonic())) + 1
        if slot.state is ModelState.LOADING:
            return ModelUnavailable("The model is loading; retry shortly.", retry_after_s=1)
        if slot.state is ModelState.RESTARTING:
            return ModelUnavailable(
                "The model's worker is restarting; retry shortly.", retry_after_s=wait_s
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


def _exit_status(exit_task: asyncio.Future[int]) -> str:
    if exit_task.cancelled() or exit_task.exception() is not None:
        return "status unknown"
    code = exit_task.result()
    return f"signal {-code}" if code < 0 else f"status {code}"


def _retrieve_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
