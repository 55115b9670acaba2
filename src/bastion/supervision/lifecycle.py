"""The life of one model's worker, from launch to exit, and of its replacements.

:class:`WorkerLifecycle` runs one supervising task per model (a :class:`ModelSlot`): it
starts a worker through the sandbox, sends LoadModel, waits for Ready, then watches the
process, the channel and the heartbeats. A worker that exits, stops sending heartbeats or
breaks the protocol is killed, its pending requests fail at once with
:class:`~bastion.errors.WorkerCrashed`, and a new worker starts after an exponential
backoff. On a stop request it drains the worker's requests, sends Shutdown and reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from bastion.audit.events import (
    MODEL_FAILED,
    MODEL_INTEGRITY_FAILED,
    MODEL_LOADED,
    WORKER_CRASHED,
    WORKER_RESTARTED,
    Event,
    EventSink,
)
from bastion.config import Settings
from bastion.errors import ConfigurationError
from bastion.sandboxes.base import (
    Sandbox,
    WorkerLaunch,
    WorkerProcess,
    worker_argv,
)
from bastion.sandboxes.factory import Sandboxes
from bastion.supervision.channel import WorkerChannel
from bastion.wire.protocol import (
    EXIT_RUNTIME_FAULT,
    EXIT_STUCK,
    LoadModel,
    ModelMetadata,
    Notice,
    Ready,
    SealingKeys,
    Shutdown,
)

logger = logging.getLogger("bastion.supervision.supervisor")

# After Shutdown, how long an idle worker may take to exit before it is terminated, and
# how long SIGTERM may take before SIGKILL.
_SHUTDOWN_GRACE_S = 5.0
_TERMINATE_GRACE_S = 2.0
# How long a dying worker may take to be reaped after SIGKILL.
_KILL_GRACE_S = 5.0
# A worker that failed to load exits by itself; it gets this long before it is killed.
_LOAD_FAILED_EXIT_GRACE_S = 2.0
_EXIT_STATUS_GRACE_S = 0.5


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    # The model's files failed their integrity check (signature, decryption): not retried.
    INTEGRITY_FAILED = "integrity_failed"
    STOPPING = "stopping"
    UNLOADED = "unloaded"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What to load: a model name, the runtime that serves it, its directory and options."""

    name: str
    runtime: str
    path: Path
    options: dict[str, Any] = field(default_factory=dict)
    # A bundle's unsealed data key and trusted signing keys (see LoadModel); or, when the
    # gateway could not even read the bundle, why (the model is then integrity_failed).
    bundle_key: bytes | None = field(default=None, repr=False)
    trusted_keys: tuple[bytes, ...] = ()
    publisher_keys: tuple[bytes, ...] = ()
    bundle_error: str | None = None
    # The model's watermark key (see LoadModel).
    watermark_key: bytes | None = field(default=None, repr=False)
    marks_public_key: bytes | None = None


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
    kind: Literal["crashed", "load_failed", "integrity_failed"]
    reason: str


class ModelSlot:
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

    def set_state(self, state: ModelState, detail: str | None = None) -> None:
        """Move to `state` and wake whoever waits for a change."""
        # Once stopping, a model only moves on to unloaded: a crash while draining must not
        # make it look like it is coming back.
        if self.state is ModelState.STOPPING and state is not ModelState.UNLOADED:
            return
        self.state = state
        self.detail = detail
        self.since = time.time()
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class WorkerLifecycle:
    """Runs the workers of the models handed to :meth:`supervise`, one task per model."""

    def __init__(
        self,
        settings: Settings,
        sandbox: Sandbox | Sandboxes,
        events: EventSink,
        sealing_keys: Callable[[], SealingKeys | None] = lambda: None,
        on_notice: Callable[[str, Notice], None] = lambda model, notice: None,
    ) -> None:
        self._settings = settings
        self._sandboxes = sandbox if isinstance(sandbox, Sandboxes) else Sandboxes(sandbox)
        self._events = events
        # The OHTTP keys in force, read when a worker starts (rotations reach running
        # workers through the supervisor).
        self._sealing_keys = sealing_keys
        # The workers' protection notices (extraction risk, watermark records), by model.
        self._on_notice = on_notice
        self._extra_runtimes = settings.runtime_modules()
        self._check_interval_s = min(
            1.0, max(0.05, min(settings.heartbeat_interval_s, settings.heartbeat_timeout_s / 4))
        )

    async def supervise(self, slot: ModelSlot, runtime_dir: Path) -> None:
        """Keep a worker running for `slot` until it is stopped."""
        settings = self._settings
        previous: _Failure | None = None
        try:
            if slot.spec.bundle_error is not None:
                self._load_failed(slot, slot.spec.bundle_error, integrity=True)
                await slot.stop_requested.wait()
            while not slot.stop_requested.is_set():
                failure = await self._run_worker(slot, runtime_dir, previous)
                if failure is None or slot.stop_requested.is_set():
                    break
                if failure.kind == "integrity_failed":
                    # Altered files stay altered: no retry until the model is changed.
                    await slot.stop_requested.wait()
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
            slot.set_state(ModelState.FAILED, "internal error in the supervisor")
            return
        slot.set_state(ModelState.UNLOADED)

    async def _run_worker(
        self, slot: ModelSlot, runtime_dir: Path, previous: _Failure | None
    ) -> _Failure | None:
        """Run one worker from launch to exit; returns why it ended (None: it was stopped)."""
        name = slot.spec.name
        worker_id = secrets.token_hex(4)
        worker_dir = runtime_dir / worker_id
        worker_dir.mkdir(mode=0o700)
        channel = WorkerChannel(
            worker_dir / "ipc.sock",
            retry_after_s=self._restart_retry_after(slot),
            on_fault=lambda reason: self._channel_faulted(slot, channel, reason),
            on_notice=lambda notice: self._on_notice(name, notice),
        )
        process: WorkerProcess | None = None
        exit_task: asyncio.Future[int] | None = None
        if previous is not None and previous.kind == "crashed":
            slot.set_state(ModelState.RESTARTING, previous.reason)
        else:
            slot.set_state(ModelState.LOADING)
        try:
            try:
                sandbox = await asyncio.to_thread(self._sandboxes.for_options, slot.spec.options)
                # A worker on another host dials the sandbox's worker port (mutual TLS);
                # a local one connects to its own Unix socket.
                remote = getattr(sandbox, "port", None) is not None
                if not remote:
                    await channel.open()
                slot.channel = channel
                launch = WorkerLaunch(
                    worker_id=worker_id,
                    argv=worker_argv(channel.endpoint, log_level=self._settings.log_level),
                    ipc_dir=worker_dir,
                    model_dir=slot.spec.path,
                    options=slot.spec.options,
                    expect_certificate=channel.expect_certificate if remote else None,
                )
                process = await sandbox.launch(launch)
            except ConfigurationError as exc:
                # The model's sandbox cannot run here (Docker is not running, say).
                failure = _Failure("load_failed", exc.message)
                self._load_failed(slot, failure.reason)
                return failure
            except OSError as exc:
                failure = _Failure(
                    "load_failed", f"could not start a worker ({type(exc).__name__})"
                )
                self._load_failed(slot, failure.reason)
                return failure
            slot.pid = process.pid
            if not remote:
                channel.expect_peer(process.peer_pid)
            exit_task = asyncio.ensure_future(process.wait())
            logger.info(
                "worker started", extra={"model": name, "worker": worker_id, "pid": process.pid}
            )
            if previous is not None:
                self.emit(WORKER_RESTARTED, slot, pid=process.pid, restarts=slot.restarts)

            loaded = await self._load(slot, channel, exit_task)
            if loaded is None:
                process.terminate()
                await asyncio.wait({exit_task}, timeout=_TERMINATE_GRACE_S)
                return None
            if isinstance(loaded, _Failure):
                if loaded.kind in ("load_failed", "integrity_failed"):
                    self._load_failed(slot, loaded.reason, integrity=loaded.kind != "load_failed")
                    # A worker that answered LoadFailed exits by itself; one that timed out
                    # is still busy loading and is killed at once.
                    answered = channel.control.done()
                    grace_s = _LOAD_FAILED_EXIT_GRACE_S if answered else 0.0
                    await self._reap(process, exit_task, grace_s=grace_s)
                else:
                    await self._crashed(slot, channel, process, exit_task, loaded.reason)
                return loaded

            slot.metadata = loaded.metadata
            slot.set_state(ModelState.READY)
            self.emit(MODEL_LOADED, slot, runtime=slot.spec.runtime, pid=process.pid)
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
        self, slot: ModelSlot, channel: WorkerChannel, exit_task: asyncio.Future[int]
    ) -> Ready | _Failure | None:
        """Send LoadModel and wait for the answer; None means a stop was requested."""
        settings = self._settings
        spec = slot.spec
        load = LoadModel(
            model=spec.name,
            runtime=spec.runtime,
            path=str(spec.path),
            options=dict(spec.options),
            runtime_module=self._extra_runtimes.get(spec.runtime),
            heartbeat_interval_s=settings.heartbeat_interval_s,
            bundle_key=spec.bundle_key,
            watermark_key=spec.watermark_key,
            marks_public_key=spec.marks_public_key,
            trusted_keys=list(spec.trusted_keys),
            publisher_keys=list(spec.publisher_keys),
        )
        sender = asyncio.ensure_future(self._send_load(channel, load))
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
                    if answer.integrity:
                        return _Failure("integrity_failed", answer.reason)
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

    async def _send_load(self, channel: WorkerChannel, load: LoadModel) -> None:
        await channel.send(load)
        # Private keys go over the control channel only: never argv, environment or files.
        keys = self._sealing_keys()
        if keys is not None:
            await channel.send(keys)

    async def _watch(
        self, slot: ModelSlot, channel: WorkerChannel, exit_task: asyncio.Future[int]
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
        slot: ModelSlot,
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
        slot: ModelSlot,
        channel: WorkerChannel,
        process: WorkerProcess,
        exit_task: asyncio.Future[int],
        reason: str,
    ) -> None:
        # Refuse new requests and fail pending ones before the (slower) kill and reap.
        slot.set_state(ModelState.RESTARTING, reason)
        channel.fail(reason, retry_after_s=self._restart_retry_after(slot))
        pid = process.pid
        # A worker whose connection closed is usually exiting: a moment lets its own
        # exit status (which may say why) arrive before it is killed.
        await asyncio.wait({exit_task}, timeout=_EXIT_STATUS_GRACE_S)
        # One still running is killed here (no heartbeat, a broken protocol): a SIGKILL in
        # its status is then the gateway's own, not a limit's.
        killed_by_gateway = not exit_task.done()
        exit_code = await self._reap(process, exit_task)
        # What the exit says: a job that ignored its cancellation, or what the sandbox
        # knows, such as a cgroup's out-of-memory kill.
        found = (_exit_meaning(exit_code), getattr(process, "exit_note", None))
        notes: list[str] = [note for note in found if note and note not in reason]
        if notes:
            reason = ": ".join([reason, *notes])
            slot.set_state(ModelState.RESTARTING, reason)
        logger.warning(
            "worker crashed",
            extra={"model": slot.spec.name, "pid": pid, "reason": reason, "exit_code": exit_code},
        )
        self.emit(
            WORKER_CRASHED,
            slot,
            outcome="failure",
            reason=reason,
            exit_code=exit_code,
            # The signal that ended it (SIGKILL, SIGXFSZ: a sandbox's limit, or the kernel's
            # out-of-memory killer; SIGSEGV: a crash), unless the gateway sent it.
            signal=None if killed_by_gateway else _signal_name(exit_code),
            killed_by_gateway=killed_by_gateway,
            pid=pid,
            restarts=slot.restarts,
        )

    def _channel_faulted(self, slot: ModelSlot, channel: WorkerChannel, reason: str) -> None:
        # Called the moment a channel faults, before the watcher wakes up: a client that
        # just got WorkerCrashed and retries must find the model restarting, not ready.
        if slot.state is ModelState.READY and slot.channel is channel:
            slot.set_state(ModelState.RESTARTING, reason)

    def _load_failed(self, slot: ModelSlot, reason: str, *, integrity: bool = False) -> None:
        if integrity:
            slot.set_state(ModelState.INTEGRITY_FAILED, reason)
            logger.warning(
                "model failed its integrity check",
                extra={"model": slot.spec.name, "reason": reason},
            )
            self.emit(MODEL_INTEGRITY_FAILED, slot, outcome="failure", reason=reason)
            return
        slot.set_state(ModelState.FAILED, reason)
        logger.warning("model failed to load", extra={"model": slot.spec.name, "reason": reason})
        # The worker's reason quotes its runtime's exception, which may quote the model's
        # files: the event (kept in the audit log) carries the exception's type only.
        kind = reason.partition(":")[0][:80]
        self.emit(MODEL_FAILED, slot, outcome="failure", reason=kind, restarts=slot.restarts)

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

    def emit(
        self,
        kind: str,
        slot: ModelSlot,
        outcome: str = "success",
        **detail: str | int | bool | None,
    ) -> None:
        self._events.emit(Event(kind=kind, outcome=outcome, target=slot.spec.name, detail=detail))

    def _stale(self, channel: WorkerChannel) -> bool:
        # Until its first message a worker is still starting; load_timeout_s covers that.
        if channel.last_seen is None:
            return False
        return time.monotonic() - channel.last_seen > self._settings.heartbeat_timeout_s

    def _stale_reason(self) -> str:
        return f"no heartbeat for {self._settings.heartbeat_timeout_s:g} s"

    def _restart_retry_after(self, slot: ModelSlot) -> int:
        return math.ceil(slot.backoff_s) + 1


def _exit_status(exit_task: asyncio.Future[int]) -> str:
    if exit_task.cancelled() or exit_task.exception() is not None:
        return "status unknown"
    code = exit_task.result()
    status = f"signal {-code}" if code < 0 else f"status {code}"
    meaning = _exit_meaning(code)
    return f"{status}: {meaning}" if meaning else status


def _signal_name(code: int | None) -> str | None:
    """The name of the signal a negative exit status says killed the process (None for an
    exit of its own, or an unknown status)."""
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _exit_meaning(code: int | None) -> str | None:
    """What a worker's own exit status says of why it left, where it says something."""
    if code == EXIT_STUCK:
        return "a job ignored its cancellation"
    if code == EXIT_RUNTIME_FAULT:
        return "the model's runtime failed in a way that may leave it corrupt (a panic)"
    return None


def _retrieve_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
