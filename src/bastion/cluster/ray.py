"""Model workers placed on a Ray cluster's nodes (``BASTION_CLUSTER=ray://head:10001``).

A :class:`RaySandbox` is a sandbox backend like bwrap or docker, behind the same
interface: its `launch` asks Ray's scheduler for a place with the model's resources
(options ``cpus``, ``memory``, ``gpus``), creates a small actor there
(:class:`bastion.cluster.replica.ReplicaHost`), signs the certificate request the actor
makes on its node, and lets the actor start Bastion's sandboxed worker on that node, which
dials this gateway's worker port (:mod:`bastion.supervision.remote`) over mutual TLS.
The gateway accepts that connection only with the certificate it just issued.

Each gateway places and owns its replicas: Ray ties an actor's life to its owner, so the
replicas of a gateway that dies go with it and none is orphaned. A replica that dies (its
worker, its actor or its node) is seen by the gateway as a crashed worker: its in-flight
requests get 503 with Retry-After and the supervisor starts another, wherever Ray places it.

Ray calls block, so they run in threads; one thread per replica waits for its exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from bastion.cluster.authority import load_authority
from bastion.cluster.replica import ReplicaHost
from bastion.config import Settings, parse_memory
from bastion.crypto.cluster_ca import CertificateRefused, ClusterAuthority, server_context
from bastion.crypto.keyring import KeyRing
from bastion.errors import ConfigurationError
from bastion.sandboxes.base import WorkerLaunch
from bastion.store.db import Database
from bastion.supervision.remote import WorkerPort

logger = logging.getLogger("bastion.cluster.ray")
# Exit status of a replica whose actor or node died (Ray could not say how the worker ended).
EXIT_REPLICA_LOST = 137
RAY_NAMESPACE = "bastion"
_CALL_TIMEOUT_S = 120.0
_CONNECT_ATTEMPTS = 4
_CONNECT_BACKOFF_S = 1.0


def replica_resources(options: Mapping[str, object]) -> dict[str, Any]:
    """Ray actor options for a model's resource needs (cpus, memory, gpus)."""
    resources: dict[str, Any] = {"num_cpus": 1.0}
    try:
        if "cpus" in options:
            resources["num_cpus"] = float(str(options["cpus"]))
        if "gpus" in options:
            resources["num_gpus"] = float(str(options["gpus"]))
    except ValueError as exc:
        raise ConfigurationError("The cpus and gpus options must be numbers.") from exc
    if resources["num_cpus"] < 0 or resources.get("num_gpus", 0) < 0:
        raise ConfigurationError("The cpus and gpus options cannot be negative.")
    if "memory" in options:
        resources["memory"] = parse_memory(options["memory"])
    return resources


class ClusterConnection:
    """This process's connection to the Ray cluster (one per process, as Ray allows)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._connected = False

    def connect(self) -> None:
        """Connect (blocking) unless connected; ConfigurationError if the cluster cannot be
        reached or refuses this process's token."""
        import ray

        with self._lock:
            if self._connected and ray.is_initialized():
                return
            # Ray's client server now and then loses a new client at once (the server
            # process it starts for it dies: "Starting Ray client server failed"): tried
            # again after a pause, a few times, before the gateway gives up.
            delay_s = _CONNECT_BACKOFF_S
            for attempt in range(1, _CONNECT_ATTEMPTS + 1):
                try:
                    ray.init(
                        address=self.address,
                        namespace=RAY_NAMESPACE,
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                    )
                    break
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    with contextlib.suppress(Exception):
                        ray.shutdown()
                    if attempt == _CONNECT_ATTEMPTS:
                        raise ConfigurationError(
                            "The Ray cluster cannot be reached, or refused this gateway's "
                            f"token ({type(exc).__name__})."
                        ) from exc
                    logger.warning(
                        "could not connect to the Ray cluster; trying again",
                        extra={"exc_type": type(exc).__name__, "attempt": attempt},
                    )
                    time.sleep(delay_s)
                    delay_s *= 2
            self._connected = True

    def close(self) -> None:
        import ray

        with self._lock:
            if self._connected:
                ray.shutdown()
                self._connected = False


class RayReplica:
    """A worker placed on a Ray node, as the lifecycle sees any worker process."""

    def __init__(self, actor: Any, pid: int, node: str) -> None:
        self._actor = actor
        self._pid = pid
        self.node = node
        self._returncode: int | None = None
        self.exit_note: str | None = None
        loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = loop.create_future()
        threading.Thread(
            target=self._wait_for_exit, args=(loop,), name="bastion-replica-wait", daemon=True
        ).start()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def peer_pid(self) -> int | None:
        # The worker's connection is checked by certificate, not by pid.
        return None

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        code = await asyncio.shield(self._exit)
        self._returncode = code
        return code

    def terminate(self) -> None:
        self._actor.terminate.remote()

    def kill(self) -> None:
        import ray

        try:
            ray.kill(self._actor, no_restart=True)
        except Exception as exc:  # the actor may be gone already
            logger.debug("killing a replica failed", extra={"exc_type": type(exc).__name__})

    def _wait_for_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        import ray

        try:
            code = int(ray.get(self._actor.wait.remote()))
        except Exception as exc:
            # RayActorError and friends: the actor, or its whole node, is gone.
            self.exit_note = f"the replica's Ray actor or node was lost ({type(exc).__name__})"
            code = EXIT_REPLICA_LOST
        else:
            # The worker is gone; its host actor has no more to do.
            self.kill()
        loop.call_soon_threadsafe(_resolve, self._exit, code)


def _resolve(future: asyncio.Future[int], code: int) -> None:
    if not future.done():
        future.set_result(code)


class RaySandbox:
    """Workers on Ray nodes, each in its node's own sandbox, connected back over TLS."""

    name = "ray"

    def __init__(
        self,
        settings: Settings,
        cluster: ClusterConnection,
        authority: ClusterAuthority,
        port: WorkerPort,
        advertise: tuple[str, int],
    ) -> None:
        self._settings = settings
        self._cluster = cluster
        self._authority = authority
        self.port = port
        self._advertise = advertise
        self._lifetime = dt.timedelta(seconds=settings.replica_cert_lifetime_s)
        self._actor_class: Any = None

    def check(self) -> None:
        self._cluster.connect()

    async def launch(self, launch: WorkerLaunch) -> RayReplica:
        await self.port.start()
        return await asyncio.to_thread(self._place, launch, asyncio.get_running_loop())

    def _place(self, launch: WorkerLaunch, loop: asyncio.AbstractEventLoop) -> RayReplica:
        import ray

        self._cluster.connect()
        if self._actor_class is None:
            self._actor_class = ray.remote(ReplicaHost)
        options = launch.options
        actor = self._actor_class.options(
            max_restarts=0, max_concurrency=8, **replica_resources(options)
        ).remote(launch.worker_id, self._settings.cluster_node_sandbox)
        try:
            request = ray.get(actor.request.remote(), timeout=_CALL_TIMEOUT_S)
            certificate = self._authority.issue_replica(request, launch.worker_id, self._lifetime)
            if launch.expect_certificate is not None:
                # Before the worker starts: its connection must find the port waiting.
                done = threading.Event()

                def expect() -> None:
                    assert launch.expect_certificate is not None
                    launch.expect_certificate(self.port, certificate.fingerprint)
                    done.set()

                loop.call_soon_threadsafe(expect)
                done.wait(_CALL_TIMEOUT_S)
            pid = ray.get(
                actor.start.remote(
                    certificate.pem,
                    self._authority.certificate_pem,
                    self._advertise,
                    str(launch.model_dir),
                    self._settings.log_level,
                    launch.env,
                ),
                timeout=_CALL_TIMEOUT_S,
            )
            node = ray.get(actor.node.remote(), timeout=_CALL_TIMEOUT_S)
        except CertificateRefused:
            ray.kill(actor, no_restart=True)
            raise ConfigurationError("The replica's certificate request was refused.") from None
        except Exception as exc:
            ray.kill(actor, no_restart=True)
            if isinstance(exc, ConfigurationError):
                raise
            raise ConfigurationError(
                f"Ray could not place the model's worker ({type(exc).__name__})."
            ) from exc
        logger.info("replica placed", extra={"worker": launch.worker_id, "node": node, "pid": pid})
        return _in_loop(loop, actor, int(pid), str(node))


def _in_loop(loop: asyncio.AbstractEventLoop, actor: Any, pid: int, node: str) -> RayReplica:
    """A RayReplica made on the event loop (it needs the running loop)."""
    made: list[RayReplica] = []
    done = threading.Event()

    def make() -> None:
        made.append(RayReplica(actor, pid, node))
        done.set()

    loop.call_soon_threadsafe(make)
    done.wait()
    return made[0]


def split_address(value: str, what: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) as (host, port); ConfigurationError otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{what} must be HOST:PORT, not {value!r}.")
    return host, int(port)


def build_ray_sandbox(
    settings: Settings, db: Database, keyring: KeyRing
) -> tuple[RaySandbox, list[Callable[[], None]]]:
    """The cluster backend the settings describe, and what closes it at shutdown."""
    assert settings.cluster is not None
    if not settings.cluster.startswith("ray://"):
        raise ConfigurationError("BASTION_CLUSTER must be a Ray Client address, ray://HOST:PORT.")
    if settings.worker_listen is None:
        raise ConfigurationError(
            "BASTION_CLUSTER needs BASTION_WORKER_LISTEN, the HOST:PORT where this gateway "
            "listens for its replicas (and BASTION_WORKER_ADVERTISE if they must dial "
            "another address)."
        )
    listen = split_address(settings.worker_listen, "BASTION_WORKER_LISTEN")
    advertise = split_address(
        settings.worker_advertise or settings.worker_listen, "BASTION_WORKER_ADVERTISE"
    )
    if advertise[0] in ("0.0.0.0", "::"):  # noqa: S104 - refusing it, not binding
        raise ConfigurationError(
            "Replicas cannot dial a wildcard address: set BASTION_WORKER_ADVERTISE to this "
            "gateway's address on the cluster's network."
        )
    authority = load_authority(db, keyring)
    certificate, key_pem = authority.issue_server(advertise[0])
    context = server_context(authority.certificate_pem, certificate.pem, key_pem)
    port = WorkerPort(context, *listen)
    cluster = ClusterConnection(settings.cluster)
    sandbox = RaySandbox(settings, cluster, authority, port, advertise)
    return sandbox, [port.close, cluster.close]
