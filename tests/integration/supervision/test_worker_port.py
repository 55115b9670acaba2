"""The gateway's worker port for replicas on other hosts (mutual TLS 1.3), facing peers the
test plays by hand over real TCP connections on loopback: the replica it launched (with
the certificate issued for it), and everything an attacker on the cluster's network could
try instead. Only the first may reach the channel, and only once; the others get nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Coroutine
from typing import Any

import pytest
import uvloop

from bastion.crypto.cluster_ca import (
    ClusterAuthority,
    client_context,
    replica_key_and_request,
    server_context,
)
from bastion.supervision.channel import WorkerChannel
from bastion.supervision.remote import WorkerPort
from bastion.wire.framing import MAX_MESSAGE_BYTES, FrameDecoder, encode_frame
from bastion.wire.protocol import (
    LoadModel,
    ModelMetadata,
    Ready,
    decode_to_worker,
)

pytestmark = pytest.mark.integration

HOUR = dt.timedelta(hours=1)


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(coro, 30))


class Cluster:
    """A CA, the gateway's port on loopback, and a channel waiting for replica `r1`."""

    def __init__(self) -> None:
        self.authority = ClusterAuthority.generate()
        certificate, key = self.authority.issue_server("127.0.0.1")
        self.context = server_context(self.authority.certificate_pem, certificate.pem, key)
        self.key, request = replica_key_and_request("r1")
        self.issued = self.authority.issue_replica(request, "r1", HOUR)

    async def start(self) -> tuple[WorkerPort, WorkerChannel, list[str]]:
        port = WorkerPort(self.context, "127.0.0.1", 0)
        await port.start()
        faults: list[str] = []
        channel = WorkerChannel("unused.sock", on_fault=faults.append)
        channel.expect_certificate(port, self.issued.fingerprint)
        return port, channel, faults

    def replica_context(self, certificate: bytes | None = None, key: bytes | None = None) -> Any:
        return client_context(
            self.authority.certificate_pem, certificate or self.issued.pem, key or self.key
        )


async def _connect(port: WorkerPort, context: ssl.SSLContext | None) -> tuple[Any, Any]:
    host, number = port.address
    return await asyncio.open_connection(
        host, number, ssl=context, server_hostname=host if context else None
    )


async def _nothing_comes_back(reader: asyncio.StreamReader) -> bytes:
    """What the port sends before it closes the connection (it must be nothing)."""
    try:
        return await asyncio.wait_for(reader.read(1024), 5)
    except (ConnectionError, ssl.SSLError):
        return b""


def test_the_launched_replica_is_handed_to_its_channel_and_frames_flow() -> None:
    cluster = Cluster()

    async def scenario() -> None:
        port, channel, faults = await cluster.start()
        reader, writer = await _connect(port, cluster.replica_context())
        # The gateway's first frame (LoadModel) reaches the replica over TLS ...
        load = LoadModel(model="m", runtime="echo", path="/nowhere")
        await channel.send(load)
        decoder = FrameDecoder(MAX_MESSAGE_BYTES)
        bodies: list[bytes] = []
        while not bodies:
            bodies = decoder.feed(await asyncio.wait_for(reader.read(65536), 5))
        assert decode_to_worker(bodies[0]) == load
        # ... and the replica's answer reaches the channel.
        writer.write(
            encode_frame(
                Ready(
                    model="m", metadata=ModelMetadata(runtime="echo", capabilities=["chat"]), pid=1
                )
            )
        )
        await writer.drain()
        answer = await asyncio.wait_for(asyncio.shield(channel.control), 5)
        assert isinstance(answer, Ready)
        assert faults == [] and port.refused == 0
        writer.close()
        port.close()
        await channel.close()

    run(scenario())


@pytest.mark.parametrize("attempt", ["plain_tcp", "tls_without_certificate", "foreign_ca"])
def test_a_peer_without_the_clusters_certificate_cannot_connect_or_read(attempt: str) -> None:
    cluster = Cluster()

    async def scenario() -> None:
        port, channel, faults = await cluster.start()
        # Held until the replica's own connection arrives: nobody else may read it.
        sending = asyncio.ensure_future(
            channel.send(LoadModel(model="m", runtime="echo", path="/secret-path"))
        )
        received = b""
        try:
            if attempt == "plain_tcp":
                reader, writer = await _connect(port, None)
                writer.write(b"\x00\x00\x00\x10" + b"A" * 16)
                await writer.drain()
                received = await _nothing_comes_back(reader)
            else:
                if attempt == "tls_without_certificate":
                    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                    context.load_verify_locations(cadata=cluster.authority.certificate_pem.decode())
                else:
                    other = ClusterAuthority.generate("someone else's CA")
                    key, request = replica_key_and_request("r1")
                    forged = other.issue_replica(request, "r1", HOUR)
                    context = client_context(cluster.authority.certificate_pem, forged.pem, key)
                # TLS 1.3: the server checks the client's certificate after the client
                # thinks the handshake is done; the refusal shows on the first read.
                reader, writer = await _connect(port, context)
                writer.write(b"hello")
                await writer.drain()
                received = await _nothing_comes_back(reader)
        except (ssl.SSLError, ConnectionError):
            pass
        assert received == b""
        # The replica's own connection is still awaited: the attempts took nothing from it.
        assert not channel.faulted.done() and faults == []
        reader, writer = await _connect(port, cluster.replica_context())
        decoder = FrameDecoder(MAX_MESSAGE_BYTES)
        bodies: list[bytes] = []
        while not bodies:
            bodies = decoder.feed(await asyncio.wait_for(reader.read(65536), 5))
        assert decode_to_worker(bodies[0]).path == "/secret-path"  # type: ignore[union-attr]
        await sending
        writer.close()
        port.close()
        await channel.close()

    run(scenario())


def test_a_valid_certificate_for_a_replica_not_awaited_is_refused_and_counted() -> None:
    """A certificate from the real CA, but not the one issued for the awaited replica
    (another replica's, say): the port aborts it and sends nothing."""
    cluster = Cluster()

    async def scenario() -> None:
        port, channel, _ = await cluster.start()
        sending = asyncio.ensure_future(
            channel.send(LoadModel(model="m", runtime="echo", path="/secret-path"))
        )
        key, request = replica_key_and_request("r2")
        other = cluster.authority.issue_replica(request, "r2", HOUR)
        reader, writer = await _connect(port, cluster.replica_context(other.pem, key))
        assert await _nothing_comes_back(reader) == b""
        assert port.refused == 1 and not sending.done()
        sending.cancel()
        writer.close()
        port.close()
        await channel.close()

    run(scenario())


def test_the_certificate_works_once_a_second_connection_with_it_gets_nothing() -> None:
    cluster = Cluster()

    async def scenario() -> None:
        port, channel, _ = await cluster.start()
        _, first = await _connect(port, cluster.replica_context())
        await asyncio.sleep(0.2)
        await channel.send(LoadModel(model="m", runtime="echo", path="/secret-path"))
        reader, writer = await _connect(port, cluster.replica_context())
        assert await _nothing_comes_back(reader) == b""
        assert port.refused == 1
        for stream in (first, writer):
            stream.close()
        port.close()
        await channel.close()

    run(scenario())


def test_the_port_speaks_tls_1_3_only() -> None:
    cluster = Cluster()

    async def scenario() -> None:
        port, channel, _ = await cluster.start()
        context = cluster.replica_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _connect(port, context)
        port.close()
        await channel.close()

    run(scenario())
