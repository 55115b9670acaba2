"""The gateway side of a worker channel, facing a peer that the test plays by hand.

The peer is a real Unix stream connection to the channel's real socket, made from the test
process, so these tests can send what a hostile worker would: bytes that do not decode, a
frame header announcing gigabytes, replies of the wrong kind, a second connection, or a
connection from a process that is not the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from bastion.errors import PayloadTooLarge, WorkerCrashed
from bastion.supervision.channel import WorkerChannel
from bastion.wire.framing import MAX_MESSAGE_BYTES, encode_frame
from bastion.wire.protocol import (
    Cancel,
    Embed,
    EmbedResult,
    Generate,
    GenerateResult,
    Heartbeat,
    Infer,
    LoadFailed,
    LoadModel,
    Message,
    ModelMetadata,
    Ready,
    TextDelta,
    ToWorker,
    decode_to_worker,
)

pytestmark = pytest.mark.integration

METADATA = ModelMetadata(runtime="echo", capabilities=["chat"])


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(coro, 30))


class Peer:
    """The test's stand-in for a worker, on a real connection to the channel's socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str) -> Peer:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def send(self, message: Message) -> None:
        await self.send_raw(bytes(encode_frame(message)))

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> ToWorker:
        header = await asyncio.wait_for(self.reader.readexactly(4), 10)
        (size,) = struct.unpack("<I", header)
        return decode_to_worker(await asyncio.wait_for(self.reader.readexactly(size), 10))

    async def receive_request(self) -> Generate | Embed | Infer:
        message = await self.receive()
        assert isinstance(message, Generate | Embed | Infer), message
        return message

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def open_channel(max_message_bytes: int = 1 << 20) -> AsyncIterator[WorkerChannel]:
    directory = Path(tempfile.mkdtemp(prefix="bt-"))
    directory.chmod(0o700)
    channel = WorkerChannel(directory / "ipc.sock", max_message_bytes=max_message_bytes)
    await channel.open()
    try:
        yield channel
    finally:
        await channel.close()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def channel_and_peer(
    max_message_bytes: int = 1 << 20,
) -> AsyncIterator[tuple[WorkerChannel, Peer]]:
    """A listening channel and a connected peer, accepted as the worker (it is this process)."""
    async with open_channel(max_message_bytes) as channel:
        channel.expect_peer(os.getpid())
        peer = await Peer.connect(channel.endpoint)
        try:
            yield channel, peer
        finally:
            peer.close()


async def until_faulted(channel: WorkerChannel) -> str:
    return await asyncio.wait_for(asyncio.shield(channel.faulted), 10)


@contextlib.contextmanager
def other_process() -> Any:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_listens_with_mode_0600_and_removes_the_socket_once_the_worker_connects() -> None:
    async def scenario() -> None:
        async with open_channel() as channel:
            path = Path(channel.endpoint)
            assert path.is_socket()
            assert path.stat().st_mode & 0o777 == 0o600
            channel.expect_peer(os.getpid())
            peer = await Peer.connect(channel.endpoint)
            await channel.send(LoadModel(model="m", runtime="echo", path="/x"))
            assert isinstance(await peer.receive(), LoadModel)
            assert not path.exists()
            # Nothing else can connect once the worker has.
            with pytest.raises(OSError):
                await Peer.connect(channel.endpoint)
            assert channel.fault_reason is None
            peer.close()
        assert not path.exists()

    run(scenario())


def test_routes_control_heartbeats_and_replies_by_request_id() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            await peer.send(Heartbeat(in_flight=2))
            await peer.send(Ready(model="m", metadata=METADATA, pid=1))
            ready = await asyncio.wait_for(channel.control, 10)
            assert isinstance(ready, Ready) and ready.model == "m"
            assert channel.worker_in_flight == 2
            assert channel.last_seen is not None

            replies = channel.request(Generate(id=999, prompt="x", stream=True))
            first = asyncio.ensure_future(anext(replies))
            sent = await peer.receive_request()
            # The channel numbers requests itself.
            assert isinstance(sent, Generate) and sent.id != 999
            # Several frames in one write, the first for a request nobody waits for.
            await peer.send_raw(
                bytes(encode_frame(TextDelta(id=sent.id + 100, index=0, text="stray")))
                + bytes(encode_frame(TextDelta(id=sent.id, index=0, text="a")))
                + bytes(
                    encode_frame(
                        GenerateResult(id=sent.id, choices=[], prompt_tokens=1, completion_tokens=1)
                    )
                )
            )
            assert await first == TextDelta(id=sent.id, index=0, text="a")
            result = await anext(replies)
            assert isinstance(result, GenerateResult)
            assert channel.in_flight == 0
            with pytest.raises(StopAsyncIteration):
                await anext(replies)
            assert channel.fault_reason is None

    run(scenario())


def test_a_frame_split_across_writes_is_reassembled() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            frame = bytes(encode_frame(Ready(model="m", metadata=METADATA, pid=1)))
            for index in range(len(frame)):
                await peer.send_raw(frame[index : index + 1])
            assert isinstance(await asyncio.wait_for(channel.control, 10), Ready)

    run(scenario())


def test_usage_is_settled_even_when_the_caller_stops_reading() -> None:
    """A client that leaves mid-answer (or stops at [DONE]) is still charged for the work."""

    def result(request_id: int, completion: int) -> GenerateResult:
        return GenerateResult(
            id=request_id, choices=[], prompt_tokens=3, completion_tokens=completion
        )

    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            settled: list[Message] = []
            # Read to the end: settled once, when the result arrives.
            replies = channel.request(Generate(id=0, prompt="x"), settled.append)
            first = asyncio.ensure_future(anext(replies))
            sent = await peer.receive_request()
            await peer.send(result(sent.id, 1))
            assert await first == result(sent.id, 1)
            assert settled == [result(sent.id, 1)]
            await replies.aclose()

            # The result arrived but the caller stopped after the last delta: still settled.
            replies = channel.request(Generate(id=0, prompt="x", stream=True), settled.append)
            first = asyncio.ensure_future(anext(replies))
            sent = await peer.receive_request()
            await peer.send(TextDelta(id=sent.id, index=0, text="a"))
            await peer.send(result(sent.id, 2))
            assert await first == TextDelta(id=sent.id, index=0, text="a")
            while len(settled) < 2:
                await asyncio.sleep(0.01)
            await replies.aclose()
            assert settled[1] == result(sent.id, 2)

            # Closed before the worker finished: the worker's late report is settled...
            replies = channel.request(Generate(id=0, prompt="x", stream=True), settled.append)
            waiting = asyncio.ensure_future(anext(replies))
            sent = await peer.receive_request()
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            await replies.aclose()
            assert await peer.receive() == Cancel(id=sent.id)
            await peer.send(TextDelta(id=sent.id, index=0, text="late"))
            await peer.send(result(sent.id, 4))
            while len(settled) < 3:
                await asyncio.sleep(0.01)
            assert settled[2] == result(sent.id, 4)
            # ...once: a repeated report of the same request is ignored.
            await peer.send(result(sent.id, 4))
            await peer.send(Heartbeat(in_flight=0))
            while channel.worker_in_flight != 0:
                await asyncio.sleep(0.01)
            assert len(settled) == 3
            assert channel.fault_reason is None

    run(scenario())


def test_a_failing_settle_callback_does_not_break_the_channel() -> None:
    def settle(reply: Message) -> None:
        raise ValueError("accounting broke")

    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            replies = channel.request(Embed(id=0, texts=["x"]), settle)
            first = asyncio.ensure_future(anext(replies))
            sent = await peer.receive_request()
            result = EmbedResult(id=sent.id, count=1, dim=1, vectors=bytes(4), prompt_tokens=1)
            await peer.send(result)
            assert await first == result
            assert channel.fault_reason is None
            await replies.aclose()

    run(scenario())


def test_closing_a_request_early_sends_cancel() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            replies = channel.request(Generate(id=0, prompt="x"))
            waiting = asyncio.ensure_future(anext(replies))
            sent = await peer.receive_request()
            assert channel.in_flight == 1
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            await replies.aclose()
            assert await peer.receive() == Cancel(id=sent.id)
            assert channel.in_flight == 0

    run(scenario())


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1 definitely not msgpack",
        # Found by the fuzzer: a string that is not UTF-8 (msgspec raised UnicodeDecodeError,
        # which escaped the protocol's callback instead of faulting the channel).
        b"\x82\xa4type\xa9Hear\xa4type\xa9Heartbeat\xa9",
        # Nested far deeper than any message.
        b"\x91" * 100_000,
    ],
)
def test_undecodable_frame_is_a_fault_that_fails_pending_requests(body: bytes) -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            replies = channel.request(Embed(id=0, texts=["x"]))
            waiting = asyncio.ensure_future(anext(replies))
            await peer.receive()
            await peer.send_raw(struct.pack("<I", len(body)) + body)
            with pytest.raises(WorkerCrashed) as caught:
                await waiting
            assert caught.value.status == 503
            assert "retry-after" in caught.value.headers
            assert "decode" in await until_faulted(channel)
            # A faulted channel refuses new requests at once.
            with pytest.raises(WorkerCrashed):
                await anext(channel.request(Embed(id=0, texts=["y"])))

    run(scenario())


def test_a_header_announcing_an_oversized_frame_is_a_fault_before_any_body() -> None:
    async def scenario() -> None:
        async with channel_and_peer(max_message_bytes=1024) as (channel, peer):
            replies = channel.request(Embed(id=0, texts=["x"]))
            waiting = asyncio.ensure_future(anext(replies))
            await peer.receive()
            # Two gigabytes announced and none sent: the channel must not wait for (or
            # allocate) the body to know this is a fault.
            await peer.send_raw(struct.pack("<I", 2**31))
            with pytest.raises(WorkerCrashed):
                await waiting
            reason = await until_faulted(channel)
            assert "2147483648 bytes" in reason
            # The channel drops the connection.
            assert await asyncio.wait_for(peer.reader.read(), 10) == b""

    run(scenario())


def test_an_oversized_frame_with_its_body_is_a_fault() -> None:
    async def scenario() -> None:
        async with channel_and_peer(max_message_bytes=1024) as (channel, peer):
            replies = channel.request(Embed(id=0, texts=["x"]))
            waiting = asyncio.ensure_future(anext(replies))
            sent = await peer.receive_request()
            huge = EmbedResult(id=sent.id, vectors=b"\0" * 4096, count=1, dim=1024, prompt_tokens=1)
            await peer.send(huge)
            with pytest.raises(WorkerCrashed):
                await waiting
            assert "over the limit" in await until_faulted(channel)

    run(scenario())


def test_reply_of_the_wrong_kind_is_a_fault() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            replies = channel.request(Embed(id=0, texts=["x"]))
            waiting = asyncio.ensure_future(anext(replies))
            sent = await peer.receive_request()
            # A text delta cannot answer an embedding request.
            await peer.send(TextDelta(id=sent.id, index=0, text="x"))
            with pytest.raises(WorkerCrashed):
                await waiting
            assert "unexpected TextDelta" in await until_faulted(channel)

    run(scenario())


def test_second_ready_is_a_fault() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            await peer.send(Ready(model="m", metadata=METADATA, pid=1))
            await peer.send(Ready(model="m", metadata=METADATA, pid=2))
            assert "unexpected Ready" in await until_faulted(channel)
            assert isinstance(channel.control.result(), Ready)

    run(scenario())


def test_second_load_answer_is_a_fault() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            await peer.send(LoadFailed(model="m", reason="r"))
            await peer.send(LoadFailed(model="m", reason="again"))
            assert "unexpected LoadFailed" in await until_faulted(channel)
            assert isinstance(channel.control.result(), LoadFailed)

    run(scenario())


def test_the_worker_closing_its_connection_fails_pending_requests_at_once() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            replies = channel.request(Embed(id=0, texts=["x"]))
            waiting = asyncio.ensure_future(anext(replies))
            await peer.receive()
            peer.close()
            with pytest.raises(WorkerCrashed):
                await waiting
            assert await until_faulted(channel) == "the worker's connection closed"

    run(scenario())


def connect_twice(path: str) -> tuple[socket.socket, socket.socket]:
    """Two blocking connections that both wait in the backlog before either is accepted."""
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(path)
    second.connect(path)
    second.settimeout(10)
    return first, second


def refused(sock: socket.socket) -> bool:
    """True if the channel closed `sock` without sending it anything."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_connection_queued_behind_the_workers_is_refused() -> None:
    # uvloop accepts one connection, then the channel stops listening: the kernel resets
    # the one still queued, which never reaches the gateway.
    async def scenario() -> None:
        async with open_channel() as channel:
            channel.expect_peer(os.getpid())
            first, second = connect_twice(channel.endpoint)
            try:
                await channel.send(LoadModel(model="m", runtime="echo", path="/x"))
                assert await asyncio.to_thread(refused, second)
                first.sendall(encode_frame(Ready(model="m", metadata=METADATA, pid=1)))
                assert isinstance(await asyncio.wait_for(channel.control, 10), Ready)
                assert channel.fault_reason is None
            finally:
                first.close()
                second.close()

    run(scenario())


def test_a_second_connection_reaching_the_channel_is_a_fault() -> None:
    # asyncio's own loop accepts every queued connection at once: the second one gets
    # to the channel, which refuses it and faults.
    async def scenario() -> None:
        async with open_channel() as channel:
            channel.expect_peer(os.getpid())
            first, second = connect_twice(channel.endpoint)
            try:
                reason = await until_faulted(channel)
                assert reason == "a second connection reached the worker's socket"
                assert await asyncio.to_thread(refused, second)
                with pytest.raises(WorkerCrashed):
                    await channel.send(LoadModel(model="m", runtime="echo", path="/x"))
            finally:
                first.close()
                second.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_connection_from_another_process_is_refused() -> None:
    async def scenario() -> None:
        async with open_channel() as channel:
            with other_process() as worker:
                channel.expect_peer(worker.pid)
                # The test process is not the worker, nor one of its descendants.
                peer = await Peer.connect(channel.endpoint)
                reason = await until_faulted(channel)
                assert reason == "a process other than the worker connected to its socket"
                assert await asyncio.wait_for(peer.reader.read(), 10) == b""
                peer.close()

    run(scenario())


def test_a_connection_before_the_worker_pid_is_known_waits_for_the_check() -> None:
    async def scenario() -> None:
        async with open_channel() as channel:
            peer = await Peer.connect(channel.endpoint)
            await peer.send(Ready(model="m", metadata=METADATA, pid=1))
            sending = asyncio.ensure_future(
                channel.send(LoadModel(model="m", runtime="echo", path="/x"))
            )
            await asyncio.sleep(0.2)
            # Nothing is read from or written to an unchecked peer.
            assert not channel.control.done()
            assert not sending.done()
            with other_process() as worker:
                channel.expect_peer(worker.pid)
            assert "other than the worker" in await until_faulted(channel)
            with pytest.raises(WorkerCrashed):
                await sending
            assert not channel.control.done()
            peer.close()

    run(scenario())


def test_a_descendant_of_the_launched_process_is_accepted() -> None:
    async def scenario() -> None:
        async with open_channel() as channel:
            peer = await Peer.connect(channel.endpoint)
            await peer.send(Ready(model="m", metadata=METADATA, pid=1))
            # A launcher (bubblewrap) is the parent of the worker; this test process
            # descends from its own parent.
            channel.expect_peer(os.getppid())
            assert isinstance(await asyncio.wait_for(channel.control, 10), Ready)
            assert channel.fault_reason is None
            peer.close()

    run(scenario())


def test_without_a_pid_only_the_expected_uid_is_accepted() -> None:
    async def scenario() -> None:
        async with open_channel() as channel:
            channel.expect_peer(None, uid=os.getuid() + 1)
            peer = await Peer.connect(channel.endpoint)
            assert "another user" in await until_faulted(channel)
            peer.close()
        async with open_channel() as channel:
            channel.expect_peer(None)
            peer = await Peer.connect(channel.endpoint)
            await peer.send(Ready(model="m", metadata=METADATA, pid=1))
            assert isinstance(await asyncio.wait_for(channel.control, 10), Ready)
            peer.close()

    run(scenario())


def test_sending_waits_while_the_worker_does_not_read() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            big = LoadModel(model="m", runtime="echo", path="/x", options={"pad": "x" * 2**20})
            sent = 0
            blocked: asyncio.Future[None] | None = None
            for _ in range(64):
                sending = asyncio.ensure_future(channel.send(big))
                await asyncio.sleep(0.05)
                if not sending.done():
                    blocked = sending
                    break
                sent += 1
            # The kernel and transport buffers hold a few MiB at most.
            assert blocked is not None
            for _ in range(sent + 1):
                assert isinstance(await peer.receive(), LoadModel)
            await asyncio.wait_for(blocked, 10)
            assert channel.fault_reason is None

    run(scenario())


def test_a_request_larger_than_the_worker_accepts_is_refused_alone() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, _):
            with pytest.raises(PayloadTooLarge):
                await anext(channel.request(Embed(id=0, texts=["x" * MAX_MESSAGE_BYTES])))
            assert channel.in_flight == 0
            assert channel.fault_reason is None

    run(scenario())
