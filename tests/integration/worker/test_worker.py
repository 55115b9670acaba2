"""The worker entry point, facing a gateway that the test plays by hand.

A real worker process (``python -m bastion.worker.main``) serving the `echo` runtime
connects to a socket the test listens on; the test sends frames and reads what comes back.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.sandboxes.base import worker_argv
from bastion.wire.framing import FrameDecoder, encode_frame
from bastion.wire.protocol import (
    Cancel,
    FromWorker,
    Generate,
    GenerateResult,
    Heartbeat,
    LoadFailed,
    LoadModel,
    Message,
    Ready,
    Shutdown,
    cancelled,
    decode_from_worker,
)
from bastion.worker.main import (
    EXIT_BAD_START,
    EXIT_GATEWAY_GONE,
    EXIT_LOAD_FAILED,
    EXIT_OK,
    EXIT_WORKER_ERROR,
)

pytestmark = pytest.mark.integration

TIMEOUT_S = 30


class Gateway:
    """One accepted worker connection, read frame by frame."""

    def __init__(self, connection: socket.socket, process: subprocess.Popen[bytes]) -> None:
        self.connection = connection
        self.process = process
        self.heartbeats: list[Heartbeat] = []
        self._decoder = FrameDecoder()
        self._bodies: list[bytes] = []

    def send(self, message: Message) -> None:
        self.connection.sendall(encode_frame(message))

    def receive(self) -> FromWorker | None:
        """The next message other than a heartbeat; None once the worker closed."""
        while True:
            while not self._bodies:
                chunk = self.connection.recv(65536)
                if not chunk:
                    return None
                self._bodies.extend(self._decoder.feed(chunk))
            message = decode_from_worker(self._bodies.pop(0))
            if not isinstance(message, Heartbeat):
                return message
            self.heartbeats.append(message)

    def load(self, **options: object) -> Ready:
        self.send(
            LoadModel(
                model="m",
                runtime="echo",
                path="/unused",
                options={"test_hooks": True, **options},
                heartbeat_interval_s=0.05,
            )
        )
        ready = self.receive()
        assert isinstance(ready, Ready)
        return ready

    def exit_status(self) -> int:
        return self.process.wait(TIMEOUT_S)


@contextlib.contextmanager
def worker() -> Iterator[Gateway]:
    directory = Path(tempfile.mkdtemp(prefix="bt-"))
    path = str(directory / "ipc.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(TIMEOUT_S)
    process = subprocess.Popen(
        worker_argv(path, log_level="warning"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        connection, _ = listener.accept()
        connection.settimeout(TIMEOUT_S)
        with connection:
            yield Gateway(connection, process)
    finally:
        process.kill()
        process.wait()
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


def generate(request_id: int, prompt: str) -> Generate:
    return Generate(id=request_id, prompt=prompt)


def text_of(message: FromWorker | None) -> tuple[int, str]:
    assert isinstance(message, GenerateResult), message
    return message.id, message.choices[0].text


def test_shutdown_finishes_running_and_queued_work_then_exits_0() -> None:
    with worker() as gateway:
        ready = gateway.load()
        assert ready.pid == gateway.process.pid
        gateway.send(generate(1, "__sleep__:0.3 first"))
        gateway.send(generate(2, "second"))
        gateway.send(Shutdown())
        assert text_of(gateway.receive()) == (1, "__sleep__:0.3 first")
        assert text_of(gateway.receive()) == (2, "second")
        assert gateway.receive() is None
        assert gateway.exit_status() == EXIT_OK
        # The heartbeat counted the requests the worker held.
        assert max(beat.in_flight for beat in gateway.heartbeats) >= 1


def test_a_cancelled_queued_request_is_not_run_and_is_reported_cancelled() -> None:
    with worker() as gateway:
        gateway.load()
        gateway.send(generate(1, "__sleep__:0.5 running"))
        gateway.send(generate(2, "queued"))
        gateway.send(Cancel(id=2))
        gateway.send(generate(3, "after"))
        gateway.send(Shutdown())
        assert text_of(gateway.receive()) == (1, "__sleep__:0.5 running")
        # The gateway learns the request ended, with no work done (nothing to charge).
        assert gateway.receive() == cancelled(2)
        assert text_of(gateway.receive()) == (3, "after")
        assert gateway.receive() is None
        assert gateway.exit_status() == EXIT_OK


def test_a_cancelled_running_request_stops_and_reports_its_usage() -> None:
    with worker() as gateway:
        gateway.load()
        gateway.send(generate(1, "__sleep__:60 four words here"))
        gateway.send(generate(2, "next"))
        gateway.send(Cancel(id=1))
        # Answered well before 60 s only if the running sleep noticed the cancel. The
        # cancelled request still reports its usage (if it started), so it can be charged.
        report = gateway.receive()
        assert report is not None and report.id == 1
        assert report == cancelled(1) or (
            isinstance(report, GenerateResult) and report.prompt_tokens == 4
        )
        assert text_of(gateway.receive()) == (2, "next")


def test_a_model_that_fails_to_load_reports_why_and_exits_1() -> None:
    with worker() as gateway:
        gateway.send(LoadModel(model="m", runtime="no-such-runtime", path="/unused"))
        failed = gateway.receive()
        assert isinstance(failed, LoadFailed)
        assert failed.reason.startswith("ValueError: unknown runtime")
        assert gateway.exit_status() == EXIT_LOAD_FAILED


def test_a_first_message_other_than_load_model_exits_2() -> None:
    with worker() as gateway:
        gateway.send(Shutdown())
        assert gateway.exit_status() == EXIT_BAD_START


def test_the_gateway_closing_the_connection_makes_the_worker_exit_3() -> None:
    with worker() as gateway:
        gateway.load()
        gateway.send(generate(1, "__sleep__:60"))
        gateway.connection.shutdown(socket.SHUT_RDWR)
        assert gateway.exit_status() == EXIT_GATEWAY_GONE


def test_an_oversized_frame_from_the_gateway_makes_the_worker_exit_4() -> None:
    with worker() as gateway:
        gateway.load()
        gateway.connection.sendall(struct.pack("<I", 2**31))
        assert gateway.exit_status() == EXIT_WORKER_ERROR
