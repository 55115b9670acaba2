"""The gateway side of a worker channel, facing a peer that the test plays by hand.

The peer is a real ZeroMQ DEALER on the channel's real `ipc://` socket, so these tests can
send what a hostile worker would: bytes that do not decode, oversized messages, replies of
the wrong kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
import zmq
import zmq.asyncio

from bastion.errors import WorkerCrashed
from bastion.workers.channel import WorkerChannel
from bastion.workers.protocol import (
    Cancel,
    Embed,
    EmbedResult,
    Generate,
    GenerateResult,
    Heartbeat,
    LoadFailed,
    ModelMetadata,
    Ready,
    TextDelta,
    decode_to_worker,
    encode,
)

pytestmark = pytest.mark.integration


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(coro, 30))


@contextlib.asynccontextmanager
async def channel_and_peer(
    max_message_bytes: int = 1 << 20,
) -> AsyncIterator[tuple[WorkerChannel, zmq.asyncio.Socket]]:
    """A bound channel and a connected DEALER standing in for the worker."""
    directory = Path(tempfile.mkdtemp(prefix="bt-"))
    context = zmq.asyncio.Context()
    channel = WorkerChannel(
        context, f"ipc://{directory}/ipc.sock", max_message_bytes=max_message_bytes
    )
    channel.open()
    peer = context.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(channel.endpoint)
    try:
        yield channel, peer
    finally:
        await channel.close()
        peer.close(linger=0)
        context.destroy(linger=0)
        shutil.rmtree(directory, ignore_errors=True)


async def received_by_peer(peer: zmq.asyncio.Socket) -> Any:
    return decode_to_worker(await asyncio.wait_for(peer.recv(), 10))


def test_routes_control_heartbeats_and_replies_by_request_id() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            metadata = ModelMetadata(runtime="echo", capabilities=["chat"])
            await peer.send(encode(Heartbeat(in_flight=2)))
            await peer.send(encode(Ready(model="m", metadata=metadata, pid=1)))
            ready = await asyncio.wait_for(channel.control, 10)
            assert isinstance(ready, Ready) and ready.model == "m"
            assert channel.worker_in_flight == 2
            assert channel.last_seen is not None

            replies = channel.request(Generate(id=999, prompt="x", stream=True))
            first = asyncio.ensure_future(anext(replies))
            sent = await received_by_peer(peer)
            # The channel numbers requests itself.
            assert isinstance(sent, Generate) and sent.id != 999
            await peer.send(encode(TextDelta(id=sent.id + 100, index=0, text="stray")))
            await peer.send(encode(TextDelta(id=sent.id, index=0, text="a")))
            await peer.send(
                encode(GenerateResult(id=sent.id, choices=[], prompt_tokens=1, completion_tokens=1))
            )
            assert await first == TextDelta(id=sent.id, index=0, text="a")
            result = await anext(replies)
            assert isinstance(result, GenerateResult)
            assert channel.in_flight == 0
            with pytest.raises(StopAsyncIteration):
                await anext(replies)
            assert channel.fault_reason is None

    run(scenario())


def test_closing_a_request_early_sends_cancel() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            replies = channel.request(Generate(id=0, prompt="x"))
            waiting = asyncio.ensure_future(anext(replies))
            sent = await received_by_peer(peer)
            assert channel.in_flight == 1
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            await replies.aclose()
            assert await received_by_peer(peer) == Cancel(id=sent.id)
            assert channel.in_flight == 0

    run(scenario())


def test_undecodable_message_is_a_fault_that_fails_pending_requests() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            replies = channel.request(Embed(id=0, texts=["x"]))
            waiting = asyncio.ensure_future(anext(replies))
            await received_by_peer(peer)
            await peer.send(b"\xc1 definitely not msgpack")
            with pytest.raises(WorkerCrashed) as caught:
                await waiting
            assert caught.value.status == 503
            assert "retry-after" in caught.value.headers
            assert "decode" in await asyncio.wait_for(channel.faulted, 10)
            # A faulted channel refuses new requests at once.
            with pytest.raises(WorkerCrashed):
                await anext(channel.request(Embed(id=0, texts=["y"])))

    run(scenario())


def test_oversized_message_is_a_fault() -> None:
    async def scenario() -> None:
        async with channel_and_peer(max_message_bytes=1024) as (channel, peer):
            replies = channel.request(Embed(id=0, texts=["x"]))
            waiting = asyncio.ensure_future(anext(replies))
            sent = await received_by_peer(peer)
            huge = EmbedResult(id=sent.id, vectors=b"\0" * 4096, count=1, dim=1024, prompt_tokens=1)
            await peer.send(encode(huge))
            with pytest.raises(WorkerCrashed):
                await waiting
            # ZeroMQ drops a peer that exceeds MAXMSGSIZE; the channel sees the disconnect.
            assert channel.fault_reason == "the worker's connection closed"

    run(scenario())


def test_reply_of_the_wrong_kind_is_a_fault() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            replies = channel.request(Embed(id=0, texts=["x"]))
            waiting = asyncio.ensure_future(anext(replies))
            sent = await received_by_peer(peer)
            # A text delta cannot answer an embedding request.
            await peer.send(encode(TextDelta(id=sent.id, index=0, text="x")))
            with pytest.raises(WorkerCrashed):
                await waiting
            assert "unexpected TextDelta" in (channel.fault_reason or "")

    run(scenario())


def test_second_load_answer_is_a_fault() -> None:
    async def scenario() -> None:
        async with channel_and_peer() as (channel, peer):
            await peer.send(encode(LoadFailed(model="m", reason="r")))
            await peer.send(encode(LoadFailed(model="m", reason="again")))
            reason = await asyncio.wait_for(channel.faulted, 10)
            assert "unexpected LoadFailed" in reason
            assert isinstance(channel.control.result(), LoadFailed)

    run(scenario())
