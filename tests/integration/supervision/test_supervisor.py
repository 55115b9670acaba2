"""The supervisor with real worker processes serving the `echo` runtime.

Each test runs its own event loop (uvloop, as the gateway does) with `uvloop.run`; the echo
runtime's test hooks (`__crash__`, `__sleep__:S`, `__fail__`) make workers misbehave on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvloop

from bastion.audit.alerts import DEFAULT_RULES, Alert, AlertRules
from bastion.audit.events import (
    MODEL_FAILED,
    MODEL_LOADED,
    MODEL_UNLOADED,
    WORKER_CRASHED,
    WORKER_RESTARTED,
    MemoryEventSink,
)
from bastion.config import Settings
from bastion.errors import ModelUnavailable, WorkerCrashed
from bastion.sandboxes.unconfined import SubprocessSandbox
from bastion.supervision.supervisor import ModelSpec, ModelState, ModelStatus, Supervisor
from bastion.wire.protocol import (
    Embed,
    EmbedResult,
    Generate,
    GenerateResult,
    Infer,
    InferResult,
    RequestFailed,
    TensorData,
    TextDelta,
)

pytestmark = pytest.mark.integration

SETTINGS = Settings(
    heartbeat_interval_s=0.1,
    heartbeat_timeout_s=3.0,
    restart_backoff_initial_s=0.1,
    restart_backoff_max_s=0.5,
    load_timeout_s=30.0,
    drain_timeout_s=10.0,
)
WAIT_S = 30.0


def echo_spec(name: str = "echo-a", **options: Any) -> ModelSpec:
    return ModelSpec(name, "echo", Path("unused"), {"test_hooks": True, **options})


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(coro, 90))


@contextlib.asynccontextmanager
async def supervisor(
    settings: Settings = SETTINGS,
) -> AsyncIterator[tuple[Supervisor, MemoryEventSink]]:
    events = MemoryEventSink()
    sup = Supervisor(settings, SubprocessSandbox(), events)
    await sup.start()
    try:
        yield sup, events
    finally:
        await sup.stop(drain_timeout_s=1.0)


async def load(sup: Supervisor, spec: ModelSpec) -> ModelStatus:
    await sup.ensure(spec)
    status = await sup.wait_ready(spec.name, WAIT_S)
    assert status.state is ModelState.READY, status
    return status


async def wait_until(
    sup: Supervisor, name: str, check: Callable[[ModelStatus], bool]
) -> ModelStatus:
    async with asyncio.timeout(WAIT_S):
        while not check(status := sup.status(name)):
            await asyncio.sleep(0.05)
    return status


def generate(prompt: str, **fields: Any) -> Generate:
    return Generate(id=0, prompt=prompt, max_tokens=fields.pop("max_tokens", 16), **fields)


def process_exists(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def test_serves_generate_embed_and_infer() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, events):
            status = await load(sup, echo_spec())
            assert status.metadata is not None
            assert status.metadata.runtime == "echo"
            assert status.metadata.embedding_dim == 8
            assert status.pid is not None and process_exists(status.pid)
            assert MODEL_LOADED in events.kinds()

            result = await sup.call("echo-a", generate("one two three"))
            assert isinstance(result, GenerateResult)
            assert result.choices[0].text == "one two three"
            assert result.prompt_tokens == 3

            replies = [m async for m in sup.stream("echo-a", generate("a b c", stream=True))]
            deltas = [m for m in replies if isinstance(m, TextDelta)]
            assert "".join(d.text for d in deltas) == "a b c"
            assert isinstance(replies[-1], GenerateResult)
            assert replies[:-1] == deltas

            embedded = await sup.call("echo-a", Embed(id=0, texts=["abc", "abcdefghij"]))
            assert isinstance(embedded, EmbedResult)
            vectors = np.frombuffer(embedded.vectors, dtype="<f4").reshape(2, 8)
            assert list(vectors.argmax(axis=1)) == [3, 10 % 8]

            tensor = TensorData(
                name="input", datatype="FP32", shape=[1, 2], raw=b"\x00\x00\x80?\x00\x00\x00@"
            )
            inferred = await sup.call("echo-a", Infer(id=0, inputs=[tensor]))
            assert isinstance(inferred, InferResult)
            assert inferred.outputs[0].raw == tensor.raw
            assert inferred.outputs[0].shape == [1, 2]
            assert sup.in_flight("echo-a") == 0

    run(scenario())


def test_worker_gets_a_private_directory_and_a_minimal_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BASTION_SECRET_TEST", "must-not-leak")

    async def scenario() -> None:
        async with supervisor() as (sup, _):
            runtime_dir = sup.runtime_dir
            status = await load(sup, echo_spec())
            assert status.pid is not None
            assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
            (worker_dir,) = runtime_dir.iterdir()
            assert stat.S_IMODE(worker_dir.stat().st_mode) == 0o700
            # The gateway stops listening once its worker connected: nothing else can.
            assert not (worker_dir / "ipc.sock").exists()

            raw = Path(f"/proc/{status.pid}/environ").read_bytes()
            env = dict(item.split("=", 1) for item in raw.decode().split("\0") if item)
            assert "BASTION_SECRET_TEST" not in env
            assert not any(name.startswith("BASTION_") for name in env)
            assert env["HOME"] == str(worker_dir)
            assert env["HF_HUB_OFFLINE"] == "1"
            assert env["TRANSFORMERS_OFFLINE"] == "1"
            assert env["OMP_NUM_THREADS"] == "1"
            pid = status.pid
        assert not runtime_dir.exists()
        assert not process_exists(pid)

    run(scenario())


def test_crash_fails_its_requests_at_once_and_restarts_without_touching_other_models() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, events):
            first = await load(sup, echo_spec("echo-a"))
            other = await load(sup, echo_spec("echo-b"))

            crash = asyncio.ensure_future(sup.call("echo-a", generate("__crash__")))
            queued = asyncio.ensure_future(sup.call("echo-a", generate("queued behind")))
            for request in (crash, queued):
                with pytest.raises(WorkerCrashed) as caught:
                    await request
                assert caught.value.status == 503
                assert int(caught.value.headers["retry-after"]) >= 1
            # Right after the crash the model refuses requests instead of looking ready.
            with pytest.raises(ModelUnavailable):
                sup.stream("echo-a", generate("too soon"))

            served = await sup.call("echo-b", generate("still here"))
            assert isinstance(served, GenerateResult)
            assert served.choices[0].text == "still here"

            back = await wait_until(
                sup, "echo-a", lambda s: s.state is ModelState.READY and s.restarts >= 1
            )
            assert back.pid != first.pid
            again = await sup.call("echo-a", generate("back again"))
            assert isinstance(again, GenerateResult)

            assert sup.status("echo-b").pid == other.pid
            assert sup.status("echo-b").restarts == 0
            crashes = [e for e in events.events if e.kind == WORKER_CRASHED]
            assert [e.target for e in crashes] == ["echo-a"]
            assert crashes[0].outcome == "failure"
            assert crashes[0].detail["exit_code"] == 3
            # It exited by itself: no signal, and no limit's alert.
            assert crashes[0].detail["signal"] is None
            assert crashes[0].detail["killed_by_gateway"] is False
            assert crashes[0].detail["pid"] == first.pid
            restarted = [e.target for e in events.events if e.kind == WORKER_RESTARTED]
            assert restarted == ["echo-a"]
            loaded = [e.target for e in events.events if e.kind == MODEL_LOADED]
            assert loaded.count("echo-a") == 2 and loaded.count("echo-b") == 1

    run(scenario())


def test_runtime_errors_become_request_failures_and_the_worker_keeps_serving() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, _):
            status = await load(sup, echo_spec(context_length=3))

            failed = await sup.call("echo-a", generate("__fail__ secret words"))
            assert isinstance(failed, RequestFailed)
            assert (failed.status, failed.code) == (500, "runtime_error")
            assert "secret" not in failed.message

            too_long = await sup.call("echo-a", generate("w1 w2 w3 w4 w5"))
            assert isinstance(too_long, RequestFailed)
            assert (too_long.status, too_long.code) == (400, "invalid_input")

            fine = await sup.call("echo-a", generate("short"))
            assert isinstance(fine, GenerateResult)
            assert sup.status("echo-a").pid == status.pid
            assert sup.status("echo-a").restarts == 0

    run(scenario())


def test_closing_a_stream_cancels_the_request_in_the_worker() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, _):
            status = await load(sup, echo_spec())
            replies = sup.stream("echo-a", generate("__sleep__:60", stream=True))
            waiting = asyncio.ensure_future(anext(replies))
            await asyncio.sleep(0.5)  # let the worker start sleeping
            assert sup.in_flight("echo-a") == 1
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            await replies.aclose()
            assert sup.in_flight("echo-a") == 0

            # The worker runs one request at a time: this one is only answered well before
            # the 60 s sleep would end if the sleep was cancelled.
            after = await asyncio.wait_for(sup.call("echo-a", generate("next")), 20)
            assert isinstance(after, GenerateResult)
            assert after.choices[0].text == "next"
            assert sup.status("echo-a").pid == status.pid

    run(scenario())


def test_unknown_runtime_fails_with_a_reason_and_is_retried() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, events):
            spec = ModelSpec("broken", "no-such-runtime", Path("unused"), {})
            await sup.ensure(spec)
            status = await sup.wait_ready("broken", WAIT_S)
            assert status.state is ModelState.FAILED
            assert status.detail is not None
            assert status.detail.startswith("ValueError: unknown runtime")
            assert "Traceback" not in status.detail
            with pytest.raises(ModelUnavailable) as caught:
                sup.stream("broken", generate("hello"))
            assert "failed" in caught.value.message
            assert caught.value.status == 503

            failures = [e for e in events.events if e.kind == MODEL_FAILED]
            assert failures[0].target == "broken"
            # The event (kept in the audit log) names the exception's type only: the
            # worker's message may quote the model's files.
            assert failures[0].detail["reason"] == "ValueError"
            # Failed loads are retried with backoff.
            await wait_until(sup, "broken", lambda s: s.restarts >= 1)
            assert MODEL_LOADED not in events.kinds()

    run(scenario())


def test_worker_without_heartbeats_is_killed_and_replaced() -> None:
    settings = SETTINGS.with_changes(heartbeat_timeout_s=1.0)

    async def scenario() -> None:
        async with supervisor(settings) as (sup, events):
            first = await load(sup, echo_spec())
            assert first.pid is not None
            os.kill(first.pid, signal.SIGSTOP)
            back = await wait_until(
                sup, "echo-a", lambda s: s.state is ModelState.READY and s.restarts >= 1
            )
            assert back.pid != first.pid
            assert not process_exists(first.pid)
            crash = next(e for e in events.events if e.kind == WORKER_CRASHED)
            assert "heartbeat" in str(crash.detail["reason"])
            assert crash.detail["exit_code"] == -signal.SIGKILL
            # The gateway's own SIGKILL is no sandbox limit's.
            assert crash.detail["killed_by_gateway"] is True and crash.detail["signal"] is None
            assert sandbox_alerts(events) == []

    run(scenario())


def sandbox_alerts(events: MemoryEventSink) -> list[str]:
    """The models the default rule of sandbox-limit kills fires for, over `events`."""
    fired: list[Alert] = []
    rules = AlertRules(DEFAULT_RULES, [fired.append])
    for event in events.events:
        rules.emit(event)
    return [a.group["target"] for a in fired if a.rule == "worker_killed_by_sandbox_limit"]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGXCPU])
def test_a_worker_killed_by_a_limits_signal_says_so_and_raises_the_alert(
    signum: signal.Signals,
) -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, events):
            first = await load(sup, echo_spec())
            assert first.pid is not None
            # What the kernel does at a limit (the OOM killer, RLIMIT_CPU): not the gateway.
            os.kill(first.pid, signum)
            await wait_until(
                sup, "echo-a", lambda s: s.state is ModelState.READY and s.restarts >= 1
            )
            crash = next(e for e in events.events if e.kind == WORKER_CRASHED)
            assert crash.detail["exit_code"] == -signum
            assert crash.detail["signal"] == signum.name
            assert crash.detail["killed_by_gateway"] is False
            assert sandbox_alerts(events) == ["echo-a"]

    run(scenario())


def test_stop_drains_in_flight_requests_and_removes_the_runtime_dir() -> None:
    async def scenario() -> None:
        events = MemoryEventSink()
        sup = Supervisor(SETTINGS, SubprocessSandbox(), events)
        await sup.start()
        runtime_dir = sup.runtime_dir
        status = await load(sup, echo_spec())
        assert status.pid is not None

        slow = asyncio.ensure_future(sup.call("echo-a", generate("__sleep__:1 done")))
        async with asyncio.timeout(WAIT_S):
            while sup.in_flight("echo-a") == 0:
                await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(sup.stop(drain_timeout_s=20))
        await asyncio.sleep(0.1)
        with pytest.raises(ModelUnavailable):
            sup.stream("echo-a", generate("refused"))

        result = await slow
        assert isinstance(result, GenerateResult)
        assert result.choices[0].text == "__sleep__:1 done"
        await stopping
        assert sup.status("echo-a").state is ModelState.UNLOADED
        assert not runtime_dir.exists()
        assert not process_exists(status.pid)
        assert MODEL_UNLOADED in events.kinds()
        assert WORKER_CRASHED not in events.kinds()

    run(scenario())


def test_ensure_restarts_a_worker_only_when_its_spec_changes() -> None:
    async def scenario() -> None:
        async with supervisor() as (sup, events):
            first = await load(sup, echo_spec(embedding_dim=8))
            await sup.ensure(echo_spec(embedding_dim=8))
            assert sup.status("echo-a").pid == first.pid

            second = await load(sup, echo_spec(embedding_dim=4))
            assert second.pid != first.pid
            assert second.metadata is not None and second.metadata.embedding_dim == 4

            await sup.unload("echo-a")
            assert sup.status("echo-a").state is ModelState.UNLOADED
            assert sup.statuses() == {}
            assert events.kinds().count(MODEL_UNLOADED) == 2

    run(scenario())


def test_worker_exits_when_its_gateway_dies() -> None:
    # A gateway that dies without stopping its workers (SIGKILL, OOM) must not leave a
    # worker behind holding a model in memory.
    gateway = textwrap.dedent(
        """
        import asyncio, os
        from pathlib import Path
        from bastion.audit.events import MemoryEventSink
        from bastion.config import Settings
        from bastion.sandboxes.unconfined import SubprocessSandbox
        from bastion.supervision.supervisor import ModelSpec, Supervisor

        async def main():
            settings = Settings(heartbeat_interval_s=0.1)
            sup = Supervisor(settings, SubprocessSandbox(), MemoryEventSink())
            await sup.start()
            await sup.ensure(ModelSpec("echo-a", "echo", Path("unused"), {}))
            status = await sup.wait_ready("echo-a", 30)
            print(status.state, status.pid, sup.runtime_dir, flush=True)
            os._exit(0)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", gateway], capture_output=True, text=True, timeout=60, check=True
    )
    state, pid_text, runtime_dir = done.stdout.split()
    try:
        assert state == "ready"
        pid = int(pid_text)
        deadline = time.monotonic() + WAIT_S
        while process_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_exists(pid)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
