"""The worker entry point: ``python -m bastion.worker.main --endpoint /path/to/ipc.sock``.

A worker connects to the Unix socket its gateway listens on, loads the one model named by
the first message (:class:`LoadModel`), then answers requests. Three threads share the
socket, which stays in blocking mode:

- the main thread reads frames and dispatches them: requests go on a queue, cancels mark
  their job, Shutdown lets the queue drain and then ends the process;
- one runtime thread loads the model, then runs the queued requests one at a time in
  arrival order and sends their deltas and results itself;
- a heartbeat thread reports liveness, and ends the process if the gateway is gone.

Writers hold one lock for each whole frame, so frames never interleave. Nothing that
reaches the gateway or the log quotes a request: failures are reported by exception type
and a fixed message.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, cast

import msgspec

from bastion.models.bundle.reader import (
    BUNDLE_OPTION,
    IntegrityError,
    expect_identity,
    open_bundle_with_key,
    read_bundle,
)
from bastion.observability.logging import configure_logging
from bastion.protection.guards import GuardChain, guards_of
from bastion.protection.monitor import REFERENCE_FILE, load_reference
from bastion.protection.shield import ModelShield
from bastion.protection.squeeze import AdversarialInput
from bastion.protection.textmark import TextWatermark
from bastion.runtimes.base import (
    Cancelled,
    CancelToken,
    GenerationEngine,
    ModelFiles,
    Runtime,
    RuntimeInputError,
    load_runtime,
)
from bastion.wire.batching import MAX_BATCH_SIZE, BatchPolicy, model_batch_policy
from bastion.wire.framing import (
    HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    FrameDecoder,
    FrameTooLarge,
    encode_frame,
)
from bastion.wire.protocol import (
    EXIT_RUNTIME_FAULT,
    EXIT_STUCK,
    Cancel,
    ClearRisk,
    Embed,
    EmbedResult,
    Generate,
    GenerateResult,
    Heartbeat,
    Infer,
    InferResult,
    LoadFailed,
    LoadModel,
    Message,
    ModelMetadata,
    Notice,
    Ready,
    RequestFailed,
    SealedRequest,
    SealingKeys,
    Shutdown,
    TextDelta,
    cancelled,
    decode_to_worker,
)
from bastion.worker.inner import JobHandle, SealedPipeline
from bastion.worker.sealed import SealedServer

logger = logging.getLogger("bastion.worker")

Work = Generate | Embed | Infer
Outcome = GenerateResult | EmbedResult | InferResult | RequestFailed

# Exit statuses, so the supervisor's crash report says why a worker left.
EXIT_OK = 0
EXIT_LOAD_FAILED = 1
EXIT_BAD_START = 2
EXIT_GATEWAY_GONE = 3
# The gateway broke the protocol (an oversized frame), or the worker itself failed.
EXIT_WORKER_ERROR = 4
# A job went on running long after it was cancelled (EXIT_STUCK, in protocol.py).
# How long a cancelled job may take to notice before the worker gives up on it and exits:
# the supervisor then starts a fresh worker.
CANCEL_GRACE_S = 5.0
# On Shutdown, how long sequences still decoding may take to finish (the gateway has
# drained what it could before sending Shutdown, and waits a few seconds more).
ENGINE_DRAIN_S = 4.0

_RECEIVE_CHUNK = 256 * 1024
# The extraction monitor accounts requests in batches of this many (one vectorised pass),
# or as soon as the worker has been idle this long.
MONITOR_BATCH = 16
MONITOR_IDLE_S = 0.02
_REASON_LIMIT = 200
_RESULT_TYPES: Mapping[type[Work], type[Outcome]] = {
    Generate: GenerateResult,
    Embed: EmbedResult,
    Infer: InferResult,
}


class _Job:
    """One request from arrival until its answer is sent or it is cancelled."""

    __slots__ = ("arrived", "cancel", "cancelled", "deliver", "request")

    def __init__(
        self, request: Work | SealedRequest, deliver: Callable[[Message], None] | None = None
    ) -> None:
        self.request = request
        # When it reached the worker (its wait in the queue is reported with its answer).
        self.arrived = time.perf_counter()
        self.cancel = CancelToken()
        # Set by the main thread; once set, nothing more is sent for this request.
        self.cancelled = False
        # Where replies go; None: straight to the gateway. Sealed requests take them back.
        self.deliver = deliver


class Worker:
    """Serves one model over one gateway connection."""

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._parent_pid = os.getppid()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._send_lock = threading.Lock()
        self._decoder = FrameDecoder(MAX_MESSAGE_BYTES)
        self._bodies: collections.deque[bytes] = collections.deque()
        # Requests received and not yet answered or cancelled; the heartbeat counts them.
        self._jobs: dict[int, _Job] = {}
        # Jobs for the runtime thread; None tells it to finish after the jobs before it.
        self._queue: queue.SimpleQueue[_Job | ClearRisk | None] = queue.SimpleQueue()
        self._shutting_down = False
        # Set by the runtime thread when it is done; the main thread then exits with it.
        self._exit_code: int | None = None
        self._exiting = threading.Event()
        self._sealed: SealedServer | None = None
        # The jobs the runtime thread is running (one, or a batch), and the batch's own
        # cancellation (set once all its requests are cancelled).
        self._running: tuple[_Job, ...] = ()
        self._batch_cancel = CancelToken()
        # Jobs taken from the queue while forming a batch that did not fit it: next in line.
        self._held: collections.deque[_Job | ClearRisk | None] = collections.deque()
        # How the model's requests are batched (its options over its runtime's default),
        # and, for text generation, the engine that decodes sequences together.
        self._batch = BatchPolicy()
        self._engine: GenerationEngine | None = None
        # The request types the runtime can run in batches (infer_batch, embed_batch).
        self._batch_kinds: tuple[type[Work], ...] = ()
        # Whole sealed requests go through the sealed server's loop too (so that their
        # inner jobs join batches), not inline on the runtime thread.
        self._sealed_via_loop = False
        self._pipeline: SealedPipeline | None = None
        self._early_keys: SealingKeys | None = None
        # Set when runtime code raised a BaseException that is not an Exception: the
        # runtime may be corrupt, so the worker leaves once that request is answered.
        self._runtime_fault: str | None = None
        # Its answers' protection: output policy and extraction monitor (set once loaded).
        self._shield: ModelShield | None = None
        # Protection work to do once the current answer has been sent (runtime thread).
        self._later: list[Callable[[], list[Notice]]] = []
        # Input and output guards of a text model (protect.guards; none by default).
        self._guards = GuardChain([])

    def run(self) -> int:
        """Load the model and serve it; returns the process exit status."""
        try:
            self._socket.connect(self._endpoint)
        except OSError as exc:
            if self._parent_died():
                return EXIT_GATEWAY_GONE
            logger.error("could not connect to the gateway", extra={"exc_type": type(exc).__name__})
            return EXIT_BAD_START
        try:
            load = self._receive_load()
            if isinstance(load, int):
                return load
            self._start_sealed_server(load.model, load.options)
            interval = max(0.05, load.heartbeat_interval_s)
            threading.Thread(
                target=self._heartbeat, args=(interval,), name="bastion-heartbeat", daemon=True
            ).start()
            threading.Thread(
                target=self._run_runtime, args=(load,), name="bastion-runtime", daemon=True
            ).start()
            return self._receive_requests()
        except FrameTooLarge:
            logger.error("the gateway sent a message over the size limit")
            return EXIT_WORKER_ERROR
        finally:
            self._exiting.set()

    # ------------------------------------------------------------------ main thread

    def _receive_load(self) -> LoadModel | int:
        """Wait for LoadModel, which must come first (OHTTP keys may come before it);
        an int is an exit status."""
        while True:
            body = self._next_body()
            if body is None:
                return EXIT_GATEWAY_GONE
            try:
                message = decode_to_worker(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                logger.error("first message from the gateway is not a valid message")
                return EXIT_BAD_START
            if isinstance(message, SealingKeys):
                self._early_keys = message
                continue
            if not isinstance(message, LoadModel):
                logger.error("first message from the gateway is not LoadModel")
                return EXIT_BAD_START
            return message

    def _receive_requests(self) -> int:
        """Dispatch the gateway's messages until the connection ends; returns the status."""
        while (body := self._next_body()) is not None:
            try:
                message = decode_to_worker(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                logger.warning("ignored an undecodable message from the gateway")
                continue
            if isinstance(message, Generate | Embed | Infer):
                self._accept(message)
            elif isinstance(message, SealedRequest):
                self._accept_sealed(message)
            elif isinstance(message, SealingKeys):
                assert self._sealed is not None
                self._sealed.set_keys(message)
            elif isinstance(message, Cancel):
                self._cancel(message.id)
            elif isinstance(message, ClearRisk):
                # The runtime thread may be using the monitor: it resets between jobs.
                self._queue.put(message)
            elif isinstance(message, Shutdown):
                if not self._shutting_down:
                    self._shutting_down = True
                    # Sealed requests still running may yet queue jobs: wait for them.
                    assert self._sealed is not None
                    self._sealed.when_idle(lambda: self._queue.put(None))
            else:
                logger.warning("ignored an unexpected %s message", type(message).__name__)
        # The runtime thread ends the stream itself when it is done (see _finish).
        return self._exit_code if self._exit_code is not None else EXIT_GATEWAY_GONE

    def _next_body(self) -> bytes | None:
        """The next frame's body; None once the connection is closed."""
        while not self._bodies:
            try:
                chunk = self._socket.recv(_RECEIVE_CHUNK)
            except OSError:
                return None
            if not chunk:
                return None
            self._bodies.extend(self._decoder.feed(chunk))
        return self._bodies.popleft()

    def _accept(self, request: Work) -> None:
        if self._shutting_down:
            self._refuse_shutting_down(request.id)
            return
        job = _Job(request)
        self._jobs[request.id] = job
        self._queue.put(job)

    def _accept_sealed(self, request: SealedRequest) -> None:
        if self._shutting_down:
            self._refuse_shutting_down(request.id)
            return
        if request.chunked or self._sealed_via_loop:
            # Streamed answers need an event loop that runs while the model generates; a
            # batching model's requests are opened there and their inner jobs queued.
            assert self._sealed is not None
            self._sealed.submit(request)
            return
        # A whole answer: opened, served and sealed on the runtime thread, like any job.
        job = _Job(request)
        self._jobs[request.id] = job
        self._queue.put(job)

    def _refuse_shutting_down(self, request_id: int) -> None:
        self._send(
            RequestFailed(
                id=request_id,
                status=503,
                code="shutting_down",
                message="The model's worker is shutting down.",
            )
        )

    def _start_sealed_server(self, model: str, options: Mapping[str, Any]) -> None:
        from bastion.api.sealed_app import create_sealed_app

        self._pipeline = SealedPipeline(model, self._submit_inner, options)
        self._sealed = SealedServer(create_sealed_app(), self._pipeline, self._send)
        if self._early_keys is not None:
            self._sealed.set_keys(self._early_keys)

    def _submit_inner(self, request: Work, deliver: Callable[[Message], None]) -> JobHandle:
        """Queue a job for the inner request of a sealed request; its replies go to `deliver`."""
        job = _Job(msgspec.structs.replace(request, id=0), deliver)
        self._queue.put(job)

        def cancel() -> None:
            job.cancelled = True
            job.cancel.cancel()
            self._watch_cancelled(job)

        return JobHandle(cancel)

    def _cancel(self, request_id: int) -> None:
        if self._sealed is not None and self._sealed.cancel(request_id):
            return
        # A queued job stays in the queue; the runtime thread skips it.
        job = self._jobs.pop(request_id, None)
        if job is not None:
            job.cancelled = True
            job.cancel.cancel()
            self._watch_cancelled(job)

    def _watch_cancelled(self, job: _Job) -> None:
        """A running job that ignores its cancellation (a runtime spinning in code that
        never checks) holds the worker: past the grace period, the worker exits. A batch
        is stopped (and watched) only once every request in it is cancelled: one client
        leaving never cuts its batch-mates' work short."""
        running = self._running
        if job not in running or not all(member.cancelled for member in running):
            return
        self._batch_cancel.cancel()

        def check() -> None:
            if job in self._running:
                logger.error("a cancelled job is still running; the worker exits")
                _exit_now(EXIT_STUCK)

        timer = threading.Timer(CANCEL_GRACE_S, check)
        timer.daemon = True
        timer.start()

    # ------------------------------------------------------------------ runtime thread

    def _run_runtime(self, load: LoadModel) -> None:
        """Load the model here, so the runtime runs in the thread that set it up."""
        try:
            try:
                runtime, files = _load_model(load)
                # Its answers' protection: enforced here, declared to clients.
                reference = load_reference(files.read_optional(REFERENCE_FILE))
                self._shield = ModelShield(
                    load.options,
                    runtime.metadata(),
                    reference,
                    watermark_key=load.watermark_key,
                    marks_public_key=load.marks_public_key,
                )
                metadata = self._shield.declare(runtime.metadata())
                metadata = _arm_watermark(runtime, load, metadata)
                self._guards = GuardChain(guards_of(load.options))
                metadata = self._arm_batching(runtime, load, metadata)
            except IntegrityError as exc:
                self._send(
                    LoadFailed(model=load.model, reason=str(exc)[:_REASON_LIMIT], integrity=True)
                )
                self._finish(EXIT_LOAD_FAILED)
                return
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:_REASON_LIMIT]
                self._send(LoadFailed(model=load.model, reason=reason))
                self._finish(EXIT_LOAD_FAILED)
                return
            except BaseException as exc:
                # A panic in a native library, SystemExit from model code: the type only.
                reason = f"the runtime raised {type(exc).__name__} while loading"
                self._send(LoadFailed(model=load.model, reason=reason[:_REASON_LIMIT]))
                self._finish(EXIT_LOAD_FAILED)
                return
            if self._pipeline is not None:
                self._pipeline.metadata = metadata
            self._send(Ready(model=load.model, metadata=metadata, pid=os.getpid()))
            while (job := self._next_job()) is not None:
                if isinstance(job, ClearRisk):
                    if self._shield is not None:
                        self._run_later(idle=True)
                        self._shield.reset(job.key)
                    continue
                if job.cancelled:
                    self._answer_cancelled(job)
                    continue
                if self._engine is not None and isinstance(job.request, Generate):
                    # Decoded with the other sequences on the engine's thread.
                    self._submit_generate(self._engine, job)
                    continue
                batch = self._collect(job)
                for member in [m for m in batch if m.cancelled]:
                    # Cancelled while the batch formed: it never runs.
                    batch.remove(member)
                    self._answer_cancelled(member)
                if not batch:
                    continue
                job = batch[0]
                self._batch_cancel = CancelToken()
                self._running = tuple(batch)
                try:
                    outcomes: list[Message]
                    if len(batch) > 1:
                        outcomes = list(self._execute_batch(runtime, batch))
                    elif isinstance(job.request, SealedRequest):
                        outcomes = [self._serve_sealed(runtime, job)]
                    else:
                        outcomes = [self._execute(runtime, job)]
                finally:
                    self._running = ()
                if len(batch) == 1:
                    self._answer(job, outcomes[0])
                else:
                    self._answer_batch(batch, outcomes)
                self._run_later()
                if self._runtime_fault is not None:
                    # The runtime may be corrupt: no more work (see below).
                    break
            self._run_later(idle=True)
            if self._engine is not None:
                if self._runtime_fault is None:
                    # Shutdown lets in-flight work finish: the sequences decoding do.
                    deadline = time.monotonic() + ENGINE_DRAIN_S
                    while self._engine.active and time.monotonic() < deadline:
                        time.sleep(0.01)
                self._engine.close()
            if self._runtime_fault is not None:
                logger.error(
                    "the runtime raised %s; the worker leaves for a fresh one",
                    self._runtime_fault,
                )
                self._finish(EXIT_RUNTIME_FAULT)
                return
            self._finish(EXIT_OK)
        except BaseException as exc:
            # The type only: messages and tracebacks can quote a request.
            logger.error("the runtime thread failed", extra={"exc_type": type(exc).__name__})
            self._finish(EXIT_WORKER_ERROR)

    def _run_later(self, *, idle: bool = False) -> None:
        """The protection work that waited for the answer to leave (sealing watermark
        records; the extraction monitor, in batches of MONITOR_BATCH requests or when the
        worker is idle): its notices go to the gateway."""
        try:
            while self._later:
                for notice in self._later.pop(0)():
                    self._send(notice)
            shield = self._shield
            if shield is not None and shield.pending and (idle or shield.pending >= MONITOR_BATCH):
                for notice in shield.drain():
                    self._send(notice)
        except Exception as exc:
            # Protection bookkeeping must never take the model down: this batch is lost.
            self._later.clear()
            logger.error(
                "the protection bookkeeping failed", extra={"exc_type": type(exc).__name__}
            )

    def _answer(self, job: _Job, outcome: Message) -> None:
        if job.deliver is not None:
            # Even when cancelled: the sealed side charges the work done.
            job.deliver(outcome)
        else:
            self._jobs.pop(job.request.id, None)
            # Sent even when cancelled: the gateway settles the work done.
            self._send(outcome)

    def _answer_batch(self, jobs: list[_Job], outcomes: list[Message]) -> None:
        """A batch's answers: those for the gateway leave in one write."""
        frames = bytearray()
        for job, outcome in zip(jobs, outcomes, strict=True):
            if job.deliver is not None:
                job.deliver(outcome)
            else:
                self._jobs.pop(job.request.id, None)
                frames += self._frame(outcome)
        if frames:
            self._send_frame(frames)

    def _answer_cancelled(self, job: _Job) -> None:
        """End a job cancelled before it ran (at the gateway, or for the sealed request
        waiting on it) with no work done, so its usage can be settled."""
        if job.deliver is None:
            self._jobs.pop(job.request.id, None)
        (job.deliver or self._send)(cancelled(job.request.id))

    # ------------------------------------------------------------------ batching

    def _arm_batching(
        self, runtime: Runtime, load: LoadModel, metadata: ModelMetadata
    ) -> ModelMetadata:
        """Batch as the model's options (or its runtime's default) say, where the runtime
        can: its requests then run together (see bastion.wire.batching)."""
        policy = model_batch_policy(load.runtime, load.options)
        if not policy.enabled:
            return metadata
        start_engine = getattr(runtime, "start_engine", None)
        if "chat" in metadata.capabilities or "completions" in metadata.capabilities:
            if start_engine is None:
                return metadata
            self._engine = start_engine(policy.max_size)
            declared: dict[str, Any] = {"continuous": True, "max_sequences": policy.max_size}
        else:
            if not any(
                getattr(runtime, name, None) is not None for name in ("infer_batch", "embed_batch")
            ):
                return metadata
            self._batch = policy
            self._batch_kinds = tuple(
                kind
                for kind, name in ((Infer, "infer_batch"), (Embed, "embed_batch"))
                if getattr(runtime, name, None) is not None
            )
            declared = policy.describe()
        self._sealed_via_loop = True
        return msgspec.structs.replace(metadata, batching=declared)

    def _batchable(self, job: _Job) -> bool:
        return type(job.request) in self._batch_kinds

    def _collect(self, first: _Job) -> list[_Job]:
        """`first` and the requests waiting with it that can run in the same call, as
        Triton's dynamic batcher forms them: up to max_size, a preferred size as soon as
        one is reached, waiting up to max_queue_delay_us from `first`'s arrival for more."""
        policy = self._batch
        if not policy.enabled or not self._batchable(first):
            return [first]
        batch = [first]
        kind = type(first.request)
        deadline = first.arrived + policy.max_queue_delay_us / 1e6
        while len(batch) < policy.max_size:
            item = self._poll(deadline, ready=policy.ready(len(batch)))
            if item is None:
                break
            if isinstance(item, ClearRisk | _EndOfWork) or type(item.request) is not kind:
                # Not for this batch (or the end): it goes next, in its turn.
                self._held.appendleft(None if isinstance(item, _EndOfWork) else item)
                break
            if item.cancelled:
                self._answer_cancelled(item)
                continue
            batch.append(item)
        take = policy.take(len(batch))
        for extra in reversed(batch[take:]):
            self._held.appendleft(extra)
        return batch[:take]

    def _poll(self, deadline: float, *, ready: bool) -> _Job | ClearRisk | _EndOfWork | None:
        """The next queued item if one is waiting (or comes before `deadline`, unless the
        batch is `ready`); None if none. _END stands for the end-of-work marker."""
        if self._held:
            item = self._held.popleft()
            return _END if item is None else item
        wait = 0.0 if ready else deadline - time.perf_counter()
        try:
            item = self._queue.get_nowait() if wait <= 0 else self._queue.get(timeout=wait)
        except queue.Empty:
            return None
        return _END if item is None else item

    def _execute_batch(self, runtime: Runtime, jobs: list[_Job]) -> list[Outcome]:
        """Run a batch of Infer or Embed jobs in one runtime call; each gets its own answer
        (a request the runtime refused fails alone), its share of the batch's time by rows,
        and its wait in the queue."""
        started = time.perf_counter()
        requests: list[Any] = [job.request for job in jobs]
        wanted: list[list[str]] = [[] for _ in jobs]
        try:
            if isinstance(requests[0], Infer):
                for index, request in enumerate(requests):
                    requests[index], wanted[index] = self._prepare_infer(request)
                results: list[Any] = runtime.infer_batch(  # type: ignore[attr-defined]
                    requests, self._batch_cancel
                )
            else:
                results = runtime.embed_batch(requests, self._batch_cancel)  # type: ignore[attr-defined]
            if len(results) != len(jobs):
                raise TypeError("the runtime returned the wrong number of results")
        except Cancelled:
            # Every request of the batch was cancelled (see _watch_cancelled).
            return [cancelled(job.request.id) for job in jobs]
        except Exception as exc:
            # The batch as a whole failed: each request runs alone, so that a request
            # that breaks the runtime fails by itself.
            logger.warning(
                "a batch failed; its requests run one by one",
                extra={"exc_type": type(exc).__name__},
            )
            alone: list[Outcome] = []
            for job in jobs:
                # A request that broke the runtime ends the batch: the worker leaves.
                ran = self._runtime_fault is None
                alone.append(self._execute(runtime, job) if ran else _runtime_error(job.request.id))
            return alone
        except BaseException as exc:
            logger.error("the runtime failed a batch", extra={"exc_type": type(exc).__name__})
            self._runtime_fault = type(exc).__name__
            return [_runtime_error(job.request.id) for job in jobs]
        elapsed = time.perf_counter() - started
        rows = [max(1, _rows_of(request)) for request in requests]
        total = sum(rows)
        outcomes: list[Outcome] = []
        for job, request, outputs, result, size in zip(
            jobs, requests, wanted, results, rows, strict=True
        ):
            begun = time.perf_counter()
            outcome = self._complete(
                lambda: self._finish_batched(runtime, job, request, outputs, result),  # noqa: B023
                request,
            )
            share = elapsed * size / total + time.perf_counter() - begun
            outcomes.append(
                msgspec.structs.replace(
                    outcome,
                    compute_s=share,
                    queue_s=max(0.0, started - job.arrived),
                    batch_size=len(jobs),
                )
            )
        return outcomes

    def _finish_batched(
        self, runtime: Runtime, job: _Job, request: Work, wanted: list[str], result: Any
    ) -> Outcome:
        """One request's answer out of its batch's results (an exception: its own failure)."""
        if isinstance(result, BaseException):
            raise result
        if isinstance(request, Infer):
            return self._finish_infer(runtime, job, request, wanted, result)
        return cast(Outcome, result)

    def _submit_generate(self, engine: GenerationEngine, job: _Job) -> None:
        """Hand a Generate job to the continuous-batching engine; its answer is sent from
        the engine's thread when its sequences are done."""
        request = job.request
        assert isinstance(request, Generate)
        send = job.deliver or self._send
        started = time.perf_counter()
        try:
            self._guard_input(request)
        except GuardRefusal as exc:
            self._answer(job, self._failure(request.id, exc))
            return
        guarded = time.perf_counter()

        def emit(index: int, text: str) -> None:
            if not job.cancelled:
                send(TextDelta(id=request.id, index=index, text=text))

        def done(result: GenerateResult | BaseException) -> None:
            # Metered by the engine: its share of the batch's compute (not the time it
            # spent decoding beside others), and its wait for a place in the batch. A
            # failure (or an engine that does not meter) is charged its time in the
            # engine, as a request outside continuous batching is.
            compute, queued = guarded - started, 0.0
            if isinstance(result, GenerateResult) and result.compute_s > 0:
                compute += result.compute_s
                queued = result.queue_s
            else:
                compute += time.perf_counter() - guarded
            if isinstance(result, BaseException):
                outcome: Outcome = self._failure(request.id, result)
            else:
                checked = time.perf_counter()
                outcome = self._complete(lambda: self._finish_generate(request, result), request)
                compute += time.perf_counter() - checked
            # Its batch: the sequences decoding (or waiting) with it when it joined.
            outcome = msgspec.structs.replace(
                outcome,
                compute_s=compute,
                queue_s=max(0.0, started - job.arrived) + queued,
                batch_size=min(MAX_BATCH_SIZE, max(1, joined)),
            )
            self._answer(job, outcome)
            if self._runtime_fault is not None:
                # The runtime may be corrupt: the runtime thread ends the worker.
                self._queue.put(None)

        # Counted before it goes in (its answer may come before submit returns).
        joined = engine.active + max(1, request.n)
        engine.submit(request, job.cancel, emit, done)

    def _next_job(self) -> _Job | ClearRisk | None:
        """The next job; while the monitor has requests waiting, an idle moment drains it."""
        if self._held:
            return self._held.popleft()
        while self._shield is not None and self._shield.pending:
            try:
                return self._queue.get(timeout=MONITOR_IDLE_S)
            except queue.Empty:
                self._run_later(idle=True)
        return self._queue.get()

    def _serve_sealed(self, runtime: Runtime, job: _Job) -> Message:
        """Open a sealed request, run its inner request here, return the sealed answer."""
        request = job.request
        assert isinstance(request, SealedRequest) and self._sealed is not None

        def run_inner(work: Work, deliver: Callable[[Message], None]) -> Outcome:
            inner = _Job(msgspec.structs.replace(work, id=0), deliver)
            # A Cancel for the sealed request stops the model's work on its inner request;
            # its wait in the queue is the sealed request's.
            inner.cancel = job.cancel
            inner.arrived = job.arrived
            return self._execute(runtime, inner)

        return self._sealed.serve_inline(request, run_inner)

    def _execute(self, runtime: Runtime, job: _Job) -> Outcome:
        """Run one request and return its answer (any failure is RequestFailed), with the
        seconds its model code took, which the gateway meters."""
        started = time.perf_counter()
        outcome = self._run_model(runtime, job)
        return msgspec.structs.replace(
            outcome,
            compute_s=time.perf_counter() - started,
            queue_s=max(0.0, started - job.arrived),
        )

    def _run_model(self, runtime: Runtime, job: _Job) -> Outcome:
        request = job.request
        assert not isinstance(request, SealedRequest)
        send = job.deliver or self._send

        def run() -> Outcome:
            if isinstance(request, Generate):

                def emit(index: int, text: str) -> None:
                    if not job.cancelled:
                        send(TextDelta(id=request.id, index=index, text=text))

                self._guard_input(request)
                return self._finish_generate(request, runtime.generate(request, job.cancel, emit))
            if isinstance(request, Embed):
                return runtime.embed(request, job.cancel)
            model_request, wanted = self._prepare_infer(request)
            outcome = runtime.infer(model_request, job.cancel)
            return self._finish_infer(runtime, job, model_request, wanted, outcome)

        return self._complete(run, request)

    def _complete(self, run: Callable[[], Outcome], request: Work) -> Outcome:
        """`run`'s answer to `request`, checked; whatever it raises becomes its failure."""
        try:
            outcome = run()
            if not isinstance(outcome, _RESULT_TYPES[type(request)]):
                raise TypeError("the runtime returned the wrong result type")
            if outcome.id != request.id:
                outcome = msgspec.structs.replace(outcome, id=request.id)
            return outcome
        except BaseException as exc:
            return self._failure(request.id, exc)

    def _failure(self, request_id: int, exc: BaseException) -> RequestFailed:
        """The failure answer for what a request's model code (or its checks) raised."""
        if isinstance(exc, RuntimeInputError):
            return RequestFailed(id=request_id, status=400, code=exc.code, message=exc.message)
        if isinstance(exc, GuardRefusal):
            return RequestFailed(id=request_id, status=400, code="guard_refused", message=str(exc))
        if isinstance(exc, AdversarialInput):
            return RequestFailed(
                id=request_id, status=400, code="adversarial_input", message=str(exc)
            )
        if isinstance(exc, Cancelled):
            return cancelled(request_id, prompt_tokens=exc.prompt_tokens)
        # Whatever runtime code raises, a Rust panic (pyo3's PanicException is a
        # BaseException) or sys.exit() included, fails this request only; the type is
        # all that is told. Past Exception, the runtime may be corrupt: see _run_runtime.
        logger.error("the runtime failed a request", extra={"exc_type": type(exc).__name__})
        if not isinstance(exc, Exception):
            self._runtime_fault = type(exc).__name__
        return _runtime_error(request_id)

    def _finish_generate(self, request: Generate, result: GenerateResult) -> GenerateResult:
        if not request.stream and isinstance(result, GenerateResult):
            self._guard_output(result)
        return result

    def _prepare_infer(self, request: Infer) -> tuple[Infer, list[str]]:
        """The request the model runs, and the outputs its caller asked for."""
        shield = self._shield
        wanted = request.outputs
        if shield is not None and shield.guard.scores and wanted:
            # Asking for the labels alone must not hide the scores from the protection:
            # the model gives every output, the caller what it asked.
            request = msgspec.structs.replace(request, outputs=[])
        return request, wanted

    def _finish_infer(
        self, runtime: Runtime, job: _Job, request: Infer, wanted: list[str], outcome: Outcome
    ) -> Outcome:
        """The model's answer through its protection (squeezing, watermark, output policy),
        as the caller asked for it; the monitor's work is kept for after the answer."""
        shield = self._shield
        if shield is None or not isinstance(outcome, InferResult):
            return outcome
        protected, later = shield.infer(
            request, outcome, lambda again: runtime.infer(again, job.cancel)
        )
        if wanted and shield.guard.scores:
            kept = [t for t in protected.outputs if t.name in wanted]
            protected = msgspec.structs.replace(protected, outputs=kept)
        if later is not None:
            # Done once the answer has left (see _run_runtime).
            self._later.append(later)
        return protected

    def _guard_input(self, request: Generate) -> None:
        if not self._guards.guards:
            return
        texts = [m.content for m in request.messages or []] or [request.prompt or ""]
        verdict = self._guards.check_input(texts)
        if verdict is not None:
            raise GuardRefusal(
                f"The request was refused by the model's {verdict.guard} guard ({verdict.reason})."
            )

    def _guard_output(self, result: GenerateResult) -> None:
        """Whole answers only: a streamed answer has left before it could be judged."""
        if not self._guards.guards:
            return
        for choice in result.choices:
            verdict = self._guards.check_output(choice.text)
            if verdict is not None:
                raise GuardRefusal(
                    f"The answer was withheld by the model's {verdict.guard} guard "
                    f"({verdict.reason})."
                )

    def _finish(self, code: int) -> None:
        """Hand `code` to the main thread and wake it: its next read sees the end."""
        self._exit_code = code
        try:
            self._socket.shutdown(socket.SHUT_RD)
        except OSError:
            _exit_now(code)

    # ------------------------------------------------------------------ heartbeat thread

    def _heartbeat(self, interval: float) -> None:
        while not self._exiting.is_set():
            if self._parent_died():
                logger.warning("the gateway process is gone; exiting")
                _exit_now(EXIT_GATEWAY_GONE)
            sealed = self._sealed.in_flight if self._sealed is not None else 0
            self._send(Heartbeat(in_flight=len(self._jobs) + sealed))
            self._exiting.wait(interval)

    def _parent_died(self) -> bool:
        return os.getppid() != self._parent_pid

    # ------------------------------------------------------------------ sending

    def _send(self, message: Message) -> None:
        self._send_frame(self._frame(message))

    def _frame(self, message: Message) -> bytearray:
        """`message` as one frame; an answer too large for the channel becomes a failure."""
        frame = encode_frame(message)
        if len(frame) - HEADER_BYTES > MAX_MESSAGE_BYTES:
            # The gateway would treat a bigger frame as a fault and kill this worker:
            # refuse this one answer instead.
            request_id = getattr(message, "id", None)
            if request_id is None:
                raise ValueError("an oversized message that answers no request")
            logger.warning("an answer was too large for the IPC channel")
            frame = encode_frame(
                RequestFailed(
                    id=request_id,
                    status=500,
                    code="answer_too_large",
                    message="The answer is too large to send.",
                )
            )
        return frame

    def _send_frame(self, frame: bytearray) -> None:
        """Write whole frames (one, or a batch's answers); any thread may call it."""
        try:
            with self._send_lock:
                self._socket.sendall(frame)
        except OSError:
            if self._exiting.is_set():
                return
            logger.warning("the connection to the gateway is gone; exiting")
            _exit_now(EXIT_GATEWAY_GONE)


class _EndOfWork:
    """Stands for the end-of-work marker (None in the queue) while a batch is formed."""


_END = _EndOfWork()


def _runtime_error(request_id: int) -> RequestFailed:
    return RequestFailed(
        id=request_id,
        status=500,
        code="runtime_error",
        message="The model failed to process the request.",
    )


def _rows_of(request: Work) -> int:
    """A request's size in a batch: its first input's rows, or its texts."""
    if isinstance(request, Embed):
        return len(request.texts)
    if isinstance(request, Infer) and request.inputs and request.inputs[0].shape:
        return max(0, request.inputs[0].shape[0])
    return 1


def _exit_now(code: int) -> NoReturn:
    """Leave at once from any thread; the other threads may be inside the runtime."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(code)


class GuardRefusal(Exception):
    """A guard refused a request or withheld its answer (a 400 naming the guard)."""


def _arm_watermark(runtime: Runtime, load: LoadModel, metadata: ModelMetadata) -> ModelMetadata:
    """Give a text model's sampling its keyed watermark (KGW) when the gateway sent a key,
    and declare it in the metadata."""
    set_bias = getattr(runtime, "set_logits_bias", None)
    if load.watermark_key is None or set_bias is None:
        return metadata
    mark = TextWatermark(load.watermark_key, int(getattr(runtime, "vocab_size", 0)))
    set_bias(mark.bias)
    declared = {
        **(metadata.output_policy or {}),
        "watermark": {"scheme": "kgw", "gamma": mark.gamma, "delta": mark.delta},
    }
    return msgspec.structs.replace(metadata, output_policy=declared)


def _load_model(load: LoadModel) -> tuple[Runtime, ModelFiles]:
    threads = _thread_count(load.options)
    if threads is not None:
        # Set before the runtime imports its libraries, which read these once.
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(threads)
        if importlib.util.find_spec("torch") is not None:
            import torch

            torch.set_num_threads(threads)
    if load.bundle_key is None:
        path = Path(load.path)
        runtime = load_runtime(load.runtime, path, load.options, load.runtime_module)
        return runtime, ModelFiles(directory=path if path.is_dir() else path.parent)
    # A bundle: decrypted and checked against its signed manifest here, in memory.
    bundle = read_bundle(Path(load.path))
    expect_identity(bundle, load.model, load.options.get(BUNDLE_OPTION))
    _, files = open_bundle_with_key(
        bundle, load.bundle_key, load.trusted_keys, publisher_keys=load.publisher_keys
    )
    model_files = ModelFiles(memory=files)
    return load_runtime(load.runtime, model_files, load.options, load.runtime_module), model_files


def _thread_count(options: Mapping[str, Any]) -> int | None:
    value = options.get("threads")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bastion.worker.main")
    parser.add_argument("--endpoint", required=True, help="Unix socket the gateway listens on")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def contain_output(log_level: str) -> None:
    """Keep what runtime code writes out of the gateway's log, and tracebacks everywhere.

    The worker's own JSON log lines go to (a copy of) the stderr the gateway reads. File
    descriptors 1 and 2, which libraries, model code and a Rust panic's message write to,
    are a pipe whose lines are counted and withheld: they may quote a request. Uncaught
    exceptions in any thread, and unraisable ones, are logged by type only.
    """
    log_stream = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    configure_logging(log_level, stream=log_stream)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    threading.Thread(target=_withhold, args=(read_end,), name="bastion-output", daemon=True).start()

    def uncaught(kind: type[BaseException], *_: object) -> None:
        logger.error("an uncaught exception", extra={"exc_type": kind.__name__})

    sys.excepthook = lambda kind, value, tb: uncaught(kind)
    threading.excepthook = lambda hook: uncaught(hook.exc_type)
    sys.unraisablehook = lambda hook: uncaught(hook.exc_type)


# How often the count of withheld output lines is logged, at most.
_WITHHELD_REPORT_S = 60.0


def _withhold(fd: int) -> None:
    """Read the runtime's output and drop it, logging now and then how much there was."""
    lines = 0
    reported = 0.0
    while chunk := os.read(fd, 65536):
        lines += chunk.count(b"\n") or 1
        now = time.monotonic()
        if now - reported >= _WITHHELD_REPORT_S:
            logger.warning(
                "the model's runtime wrote to its output; withheld, as it may quote requests",
                extra={"lines": lines},
            )
            reported, lines = now, 0


def main(argv: list[str] | None = None) -> None:
    """Run a worker until it is told to stop, its model fails to load, or its gateway dies."""
    args = _parse_args(argv)
    contain_output(args.log_level)
    code = Worker(args.endpoint).run()
    logging.shutdown()
    sys.stderr.flush()
    # The runtime thread may still be inside a cancelled request; leave without joining it.
    os._exit(code)


if __name__ == "__main__":
    main()
