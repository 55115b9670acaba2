"""A model replica's host side, on a cluster node: the Ray actor that starts Bastion's
sandboxed worker on its node and carries its channel to the gateway over mutual TLS.

The actor makes the replica's private key on its node (it never leaves it; the sandboxed
worker never sees it either), sends the gateway only a certificate request, and gets back a
certificate naming this replica. Then it starts the worker in the node's own sandbox
(bubblewrap by default: the same isolation as on a single machine), accepts the worker's
connection on a private Unix socket (SO_PEERCRED: only the process it launched), dials the
gateway's worker port with TLS 1.3 and its certificate, and relays frames both ways until
either side ends; then the worker is stopped. Frames are not read here: what the worker
and the gateway say to each other is theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import ssl
import tempfile
from pathlib import Path
from typing import Any

from bastion.config import Settings
from bastion.crypto.cluster_ca import client_context, replica_key_and_request
from bastion.sandboxes.base import WorkerLaunch, WorkerProcess, worker_argv
from bastion.sandboxes.factory import make_sandbox
from bastion.supervision.peer import PeerRejected, check_peer, peer_credentials

logger = logging.getLogger("bastion.cluster.replica")
_CHUNK = 256 * 1024
# Exit status reported when the relay ended the worker (the channel to the gateway broke).
EXIT_CHANNEL_LOST = 75
_CONNECT_TIMEOUT_S = 30.0


class ReplicaHost:
    """One replica's host process on a node (the body of a Ray actor, see
    :mod:`bastion.cluster.ray`; async methods run on the actor's event loop)."""

    def __init__(self, replica_id: str, node_sandbox: str) -> None:
        self.replica_id = replica_id
        self._node_sandbox = node_sandbox
        self._dir = Path(tempfile.mkdtemp(prefix="bastion-replica-"))
        os.chmod(self._dir, 0o700)
        self._key_pem, self._request_pem = replica_key_and_request(replica_id)
        self._process: WorkerProcess | None = None
        self._relay: asyncio.Task[None] | None = None
        self._exited: asyncio.Future[int] | None = None

    def node(self) -> str:
        """Where this replica runs (its node's address in the cluster), for the gateway's
        logs and status."""
        import ray

        return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]

    def request(self) -> bytes:
        """The certificate request for this replica's key."""
        return self._request_pem

    async def start(
        self,
        certificate_pem: bytes,
        ca_pem: bytes,
        gateway: tuple[str, int],
        model_dir: str,
        log_level: str,
        env: dict[str, str],
    ) -> int:
        """Start the worker and its relay; returns the worker's pid on this node."""
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        context = client_context(ca_pem, certificate_pem, self._key_pem)
        # The key is in the TLS context now; nothing else here needs it.
        self._key_pem = b""
        settings = Settings.load(sandbox=self._node_sandbox)
        sandbox = make_sandbox(settings, os.environ)
        sandbox.check()
        ipc_dir = self._dir / "worker"
        ipc_dir.mkdir(mode=0o700)
        path = str(ipc_dir / "ipc.sock")
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            loop.create_future()
        )

        async def on_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if accepted.done():
                writer.close()
                return
            accepted.set_result((reader, writer))

        server = await asyncio.start_unix_server(on_worker, path)
        os.chmod(path, 0o600)
        launch = WorkerLaunch(
            worker_id=self.replica_id,
            argv=worker_argv(path, log_level=log_level),
            ipc_dir=ipc_dir,
            model_dir=Path(model_dir),
            env=env,
        )
        process = self._process = await sandbox.launch(launch)
        self._relay = asyncio.create_task(
            self._run(process, server, accepted, context, gateway), name="bastion-relay"
        )
        return process.pid

    async def wait(self) -> int:
        """The worker's exit status, once it has exited (the relay stopped it if the channel
        broke first)."""
        assert self._exited is not None, "start() was not called"
        return await asyncio.shield(self._exited)

    def terminate(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def _run(
        self,
        process: WorkerProcess,
        server: asyncio.AbstractServer,
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
        context: ssl.SSLContext,
        gateway: tuple[str, int],
    ) -> None:
        exit_task = asyncio.ensure_future(process.wait())
        worker_writer: asyncio.StreamWriter | None = None
        gateway_writer: asyncio.StreamWriter | None = None
        try:
            waiting: set[asyncio.Future[Any]] = {accepted, exit_task}
            done, _ = await asyncio.wait(
                waiting, timeout=_CONNECT_TIMEOUT_S, return_when="FIRST_COMPLETED"
            )
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(Path(self._dir / "worker" / "ipc.sock"))
            if accepted not in done:
                return
            worker_reader, to_worker = accepted.result()
            worker_writer = to_worker
            sock = to_worker.get_extra_info("socket")
            check_peer(peer_credentials(sock), pid=process.peer_pid, uid=os.getuid())
            host, port = gateway
            gateway_reader, to_gateway = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, server_hostname=host),
                _CONNECT_TIMEOUT_S,
            )
            gateway_writer = to_gateway
            pumps = [
                asyncio.ensure_future(_pump(worker_reader, to_gateway)),
                asyncio.ensure_future(_pump(gateway_reader, to_worker)),
            ]
            await asyncio.wait({*pumps, exit_task}, return_when="FIRST_COMPLETED")
            for pump in pumps:
                pump.cancel()
        except PeerRejected as exc:
            logger.warning("refused a connection to the replica's socket: %s", exc)
        except (OSError, TimeoutError) as exc:
            logger.warning(
                "the replica's channel to its gateway failed",
                extra={"exc_type": type(exc).__name__},
            )
        finally:
            for writer in (worker_writer, gateway_writer):
                if writer is not None:
                    writer.transport.abort()
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(asyncio.shield(exit_task), 5.0)
                except TimeoutError:
                    process.kill()
            code = await exit_task
            if self._exited is not None and not self._exited.done():
                self._exited.set_result(code if code is not None else EXIT_CHANNEL_LOST)
            shutil.rmtree(self._dir, ignore_errors=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(_CHUNK):
        writer.write(chunk)
        await writer.drain()
