"""The worker entry point: ``python -m bastion.workers.main --endpoint ipc://...``.

A worker connects to the socket its gateway bound, loads the one model named by the first
message (:class:`LoadModel`), then answers requests. The runtime is called from one thread,
one request at a time, in arrival order; only the event loop thread touches the ZeroMQ
socket, because sockets are not thread-safe. Nothing that reaches the gateway or the log
quotes a request: failures are reported by exception type and a fixed message.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import logging
import os
import sys
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from bastion.observability.logging import configure_logging
from bastion.runtimes.base import CancelToken, Runtime, RuntimeInputError, load_runtime
from bastion.workers.protocol import (
    Cancel,
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
    Ready,
    RequestFailed,
    Shutdown,
    TextDelta,
    decode_to_worker,
    encode,
)

logger = logging.getLogger("bastion.worker")

Work = Generate | Embed | Infer
Outcome = GenerateResult | EmbedResult | InferResult | RequestFailed

# Exit statuses, so the supervisor's crash report says why a worker left.
EXIT_OK = 0
EXIT_LOAD_FAILED = 1
EXIT_BAD_START = 2
EXIT_GATEWAY_GONE = 3

_SOCKET_HWM = 10_000
# On an orderly exit, how long the last messages (LoadFailed, final results) may take to
# leave; the socket otherwise drops unsent messages at once.
_FINAL_LINGER_MS = 1000
_REASON_LIMIT = 200
_RESULT_TYPES: Mapping[type[Work], type[Outcome]] = {
    Generate: GenerateResult,
    Embed: EmbedResult,
    Infer: InferResult,
}


class _Job:
    """One request from arrival until its answer is sent or it is cancelled."""

    __slots__ = ("cancel", "cancelled", "request")

    def __init__(self, request: Work) -> None:
        self.request = request
        self.cancel = CancelToken()
        # Set on the loop thread only; once set, nothing more is sent for this request.
        self.cancelled = False


class Worker:
    """Serves one model over one gateway connection."""

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._parent_pid = os.getppid()
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, _SOCKET_HWM)
        self._socket.setsockopt(zmq.RCVHWM, _SOCKET_HWM)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-runtime")
        self._jobs: dict[int, _Job] = {}
        self._queue: collections.deque[_Job] = collections.deque()
        self._outstanding: set[asyncio.Future[Any]] = set()
        self._shutting_down = False
        self._heartbeat_interval = 1.0
        self._wakeup = asyncio.Event()
        self._gateway_gone = asyncio.Event()

    async def run(self) -> int:
        """Load the model and serve it; returns the process exit status."""
        self._socket.connect(self._endpoint)
        try:
            load = await self._receive_load()
            if load is None:
                return EXIT_BAD_START if not self._gateway_gone.is_set() else EXIT_GATEWAY_GONE
            self._heartbeat_interval = max(0.05, load.heartbeat_interval_s)
            heartbeat = asyncio.create_task(self._heartbeat())
            try:
                return await self._load_and_serve(load)
            finally:
                heartbeat.cancel()
        finally:
            self._close()

    async def _load_and_serve(self, load: LoadModel) -> int:
        loop = asyncio.get_running_loop()
        try:
            runtime = await self._race_gateway(
                loop.run_in_executor(self._executor, _load_model, load)
            )
            metadata = runtime.metadata()
        except _GatewayGone:
            return EXIT_GATEWAY_GONE
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:_REASON_LIMIT]
            self._send(LoadFailed(model=load.model, reason=reason))
            await self._flush()
            return EXIT_LOAD_FAILED
        self._send(Ready(model=load.model, metadata=metadata, pid=os.getpid()))
        receiver = asyncio.create_task(self._receive())
        try:
            await self._race_gateway(self._serve(runtime))
        except _GatewayGone:
            return EXIT_GATEWAY_GONE
        finally:
            receiver.cancel()
        await self._flush()
        return EXIT_OK

    # ------------------------------------------------------------------ receiving

    async def _receive_load(self) -> LoadModel | None:
        """Wait for the first message, which must be LoadModel; None means exit."""
        while not await self._socket.poll(1000):
            if self._parent_died():
                self._gateway_gone.set()
                return None
        try:
            message = decode_to_worker(await self._socket.recv())
        except (msgspec.DecodeError, msgspec.ValidationError):
            logger.error("first message from the gateway is not a valid message")
            return None
        if not isinstance(message, LoadModel):
            logger.error("first message from the gateway is not LoadModel")
            return None
        return message

    async def _receive(self) -> None:
        while True:
            data = await self._socket.recv()
            try:
                message = decode_to_worker(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                logger.warning("ignored an undecodable message from the gateway")
                continue
            if isinstance(message, Generate | Embed | Infer):
                self._accept(message)
            elif isinstance(message, Cancel):
                self._cancel(message.id)
            elif isinstance(message, Shutdown):
                self._shutting_down = True
                self._wakeup.set()
            else:
                logger.warning("ignored an unexpected %s message", type(message).__name__)

    def _accept(self, request: Work) -> None:
        if self._shutting_down:
            self._send(
                RequestFailed(
                    id=request.id,
                    status=503,
                    code="shutting_down",
                    message="The model's worker is shutting down.",
                )
            )
            return
        job = _Job(request)
        self._jobs[request.id] = job
        self._queue.append(job)
        self._wakeup.set()

    def _cancel(self, request_id: int) -> None:
        job = self._jobs.pop(request_id, None)
        if job is not None:
            job.cancelled = True
            job.cancel.cancel()

    # ------------------------------------------------------------------ serving

    async def _serve(self, runtime: Runtime) -> None:
        """Run queued jobs one at a time until Shutdown arrives and the queue is empty."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._shutting_down:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self._queue.popleft()
            if job.cancelled:
                continue
            outcome = await loop.run_in_executor(self._executor, self._execute, runtime, job, loop)
            self._jobs.pop(job.request.id, None)
            if not job.cancelled:
                self._send(outcome)

    def _execute(self, runtime: Runtime, job: _Job, loop: asyncio.AbstractEventLoop) -> Outcome:
        """Run one request on the runtime thread and turn any failure into RequestFailed."""
        request = job.request
        try:
            if isinstance(request, Generate):

                def emit(index: int, text: str) -> None:
                    # Deltas are handed to the loop thread, which alone owns the socket; they
                    # are queued before this function returns, so they precede the result.
                    loop.call_soon_threadsafe(self._send_delta, job, index, text)

                outcome: Outcome = runtime.generate(request, job.cancel, emit)
            elif isinstance(request, Embed):
                outcome = runtime.embed(request)
            else:
                outcome = runtime.infer(request)
            if not isinstance(outcome, _RESULT_TYPES[type(request)]):
                raise TypeError("the runtime returned the wrong result type")
            if outcome.id != request.id:
                outcome = msgspec.structs.replace(outcome, id=request.id)
            return outcome
        except RuntimeInputError as exc:
            return RequestFailed(id=request.id, status=400, code=exc.code, message=exc.message)
        except Exception as exc:
            # The type only: messages and tracebacks can quote the request.
            logger.error("the runtime failed a request", extra={"exc_type": type(exc).__name__})
            return RequestFailed(
                id=request.id,
                status=500,
                code="runtime_error",
                message="The model failed to process the request.",
            )

    def _send_delta(self, job: _Job, index: int, text: str) -> None:
        if not job.cancelled:
            self._send(TextDelta(id=job.request.id, index=index, text=text))

    # ------------------------------------------------------------------ liveness

    async def _heartbeat(self) -> None:
        while True:
            if self._parent_died():
                logger.warning("the gateway process is gone; exiting")
                self._gateway_gone.set()
                return
            self._send(Heartbeat(in_flight=len(self._jobs)))
            await asyncio.sleep(self._heartbeat_interval)

    def _parent_died(self) -> bool:
        return os.getppid() != self._parent_pid

    async def _race_gateway(self, work: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> Any:
        """Await `work`, or raise _GatewayGone as soon as the gateway process disappears."""
        task = asyncio.ensure_future(work)
        gone = asyncio.create_task(self._gateway_gone.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not task.done():
            task.cancel()
            raise _GatewayGone
        return task.result()

    # ------------------------------------------------------------------ sending

    def _send(self, message: Message) -> None:
        """Queue a message on the socket; call from the loop thread only."""
        future = asyncio.ensure_future(self._socket.send(encode(message)))
        if not future.done():
            self._outstanding.add(future)
            future.add_done_callback(self._outstanding.discard)
        future.add_done_callback(_ignore_result)

    async def _flush(self) -> None:
        if self._outstanding:
            await asyncio.wait(self._outstanding, timeout=_FINAL_LINGER_MS / 1000)

    def _close(self) -> None:
        linger = 0 if self._gateway_gone.is_set() else _FINAL_LINGER_MS
        self._socket.close(linger=linger)
        self._context.term()


class _GatewayGone(Exception):
    """The gateway process disappeared; the worker must exit."""


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _load_model(load: LoadModel) -> Runtime:
    threads = _thread_count(load.options)
    if threads is not None:
        # Set before the runtime imports its libraries, which read these once.
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(threads)
        if importlib.util.find_spec("torch") is not None:
            import torch

            torch.set_num_threads(threads)
    return load_runtime(load.runtime, Path(load.path), load.options)


def _thread_count(options: Mapping[str, Any]) -> int | None:
    value = options.get("threads")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bastion.workers.main")
    parser.add_argument("--endpoint", required=True, help="ZeroMQ endpoint the gateway bound")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def main(argv: list[str] | None = None) -> None:
    """Run a worker until it is told to stop, its model fails to load, or its gateway dies."""
    args = _parse_args(argv)
    configure_logging(args.log_level)
    code = _run(Worker(args.endpoint).run())
    logging.shutdown()
    sys.stderr.flush()
    # The runtime thread may still be inside a cancelled request; leave without joining it.
    os._exit(code)


if __name__ == "__main__":
    main()
