"""The Docker sandbox: each worker in its own container, with no network and a file system
holding only what it needs.

A worker started by :class:`DockerSandbox` runs as ``python -m bastion.worker.main`` in a
container created through the Docker SDK:

- network mode ``none`` (a loopback and nothing else), its own PID, IPC, UTS and mount
  namespaces, host name ``bastion-worker``; a non-root user (a host uid of its own from
  :mod:`bastion.sandboxes.uids` when the gateway runs as root, otherwise the gateway's own
  uid), every capability dropped, ``no-new-privileges``, and the same seccomp allow-list
  as bubblewrap's (:mod:`bastion.sandboxes.policy`) in place of Docker's default;
- a read-only root from a tiny image built here from files (no registry): empty mount
  points and the links a merged-``/usr`` system has. Read-only binds of the host's
  ``/usr``, the Python runtime (the same :func:`~bastion.sandboxes.policy.runtime_paths` as
  bubblewrap), the linker cache, the time zone, the model's directory and the private IPC
  directory; a size-limited tmpfs ``/tmp`` (also its HOME) is its only writable place;
- memory (no swap), CPU and PID limits from the container's cgroup; open-file, file-size
  and core-dump ulimits; a small init (``docker-init``) as PID 1 that forwards signals.

The SDK blocks, so every call to it runs in a thread. Containers carry the label
``bastion.worker`` and the gateway they belong to; those of a gateway that is gone are
removed when a new one starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import logging
import os
import signal
import tarfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bastion.errors import ConfigurationError
from bastion.sandboxes.base import (
    OUTPUT_LOGGER,
    WorkerLaunch,
    check_readable,
    forward_output,
    hand_over,
    worker_environment,
)
from bastion.sandboxes.policy import WORKER_TMP, docker_profile, runtime_paths
from bastion.sandboxes.uids import WorkerUid, WorkerUids

logger = logging.getLogger("bastion.sandboxes.docker")
T = TypeVar("T")

LABEL = "bastion.worker"
GATEWAY_LABEL = "bastion.gateway"
IMAGE_REPOSITORY = "bastion-worker-root"
# How long a call to the engine may take before the SDK gives up on it. (Stopping a
# worker is the supervisor's: SIGTERM, then SIGKILL after its own grace period.)
_ENGINE_TIMEOUT_S = 30
_OUTPUT_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class ContainerLimits:
    """Per-container limits (0: no limit of that kind)."""

    memory_bytes: int = 8 * 1024**3
    cpus: float = 0.0
    processes: int = 512
    open_files: int = 4096
    file_bytes: int = 1024**3
    tmp_bytes: int = 256 * 1024**2


def image_context() -> bytes:
    """The build context (a tar) of the worker's root: a Dockerfile and empty mount points.

    Deterministic (fixed times and owners), so its hash names the image.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:

        def add(
            name: str, kind: bytes, *, data: bytes = b"", target: str = "", mode: int = 0o755
        ) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = mode if kind == tarfile.DIRTYPE else 0o644
            info.mtime = 0
            info.linkname = target
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("Dockerfile", tarfile.REGTYPE, data=b"FROM scratch\nCOPY rootfs/ /\n")
        add("rootfs", tarfile.DIRTYPE)
        # /sbin stays an empty directory of the image: Docker mounts its init there.
        for name in ("dev", "etc", "proc", "sbin", "sys", "usr"):
            add(f"rootfs/{name}", tarfile.DIRTYPE)
        # The engine gives the tmpfs mounted here the mode of the image's directory.
        add("rootfs/tmp", tarfile.DIRTYPE, mode=0o1777)
        for name in ("bin", "lib", "lib32", "lib64"):
            path = Path("/") / name
            if path.is_symlink():
                add(f"rootfs/{name}", tarfile.SYMTYPE, target=os.readlink(path))
            elif path.is_dir():
                add(f"rootfs/{name}", tarfile.DIRTYPE)
    return buffer.getvalue()


class DockerSandbox:
    """Starts each worker in a Docker container; see the module documentation."""

    name = "docker"

    def __init__(
        self,
        limits: ContainerLimits | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        client: Any = None,
        uids: WorkerUids | None = None,
    ) -> None:
        self._limits = limits or ContainerLimits()
        self._environ = environ
        # As root, each worker runs as a host uid of its own; otherwise as the gateway's.
        if os.geteuid() == 0 and uids is None:
            raise ConfigurationError("A root gateway needs a range of worker uids.")
        self._uids = uids
        self._client = client if client is not None else connect()
        self._gateway = _gateway_label()
        self._image: str | None = None

    def check(self) -> None:
        """Build the worker image if needed and remove containers of gateways now gone."""
        self._ensure_image()
        self.remove_stale()

    def remove_stale(self) -> None:
        """Remove the worker containers whose gateway no longer runs."""
        for container in self._client.containers.list(all=True, filters={"label": LABEL}):
            owner = container.labels.get(GATEWAY_LABEL, "")
            if owner == self._gateway or _gateway_alive(owner):
                continue
            logger.info("removing a stale worker container", extra={"container": container.name})
            _ignore_gone(lambda c=container: c.remove(force=True))

    async def launch(self, launch: WorkerLaunch) -> DockerWorker:
        from docker.errors import DockerException

        parent = os.environ if self._environ is None else self._environ
        if self._image is None:
            await asyncio.to_thread(self._ensure_image)
        user = self._uids.claim() if self._uids is not None else None
        try:
            if user is not None:
                if launch.model_dir != Path("/"):
                    check_readable(launch.model_dir, user.uid, user.gid, (user.group,))
                hand_over(launch.ipc_dir, user.uid, user.gid)
            spec = self.container_spec(launch, parent, user=user)
            container = await asyncio.to_thread(self._client.containers.create, **spec)
        except BaseException as exc:
            if user is not None:
                user.release()
            if isinstance(exc, DockerException):
                raise _refused(exc) from None
            raise
        try:
            # Attached before the start, so that no early output is lost.
            stream = await asyncio.to_thread(
                container.attach, stdout=True, stderr=True, stream=True, logs=False
            )
            await asyncio.to_thread(container.start)
            await asyncio.to_thread(container.reload)
        except BaseException as exc:
            await asyncio.to_thread(_ignore_gone, lambda: container.remove(force=True))
            if user is not None:
                user.release()
            if isinstance(exc, DockerException):
                raise _refused(exc) from None
            raise
        return DockerWorker(container, launch.worker_id, stream, user)

    def container_spec(
        self, launch: WorkerLaunch, environ: Mapping[str, str], *, user: WorkerUid | None = None
    ) -> dict[str, Any]:
        """The keyword arguments of ``containers.create`` for `launch`, run as `user`
        (None: the gateway's own uid)."""
        from docker.types import LogConfig, Mount, Ulimit

        limits = self._limits
        mounts = [Mount(str(p), str(p), type="bind", read_only=True) for p in _system_paths()]
        for path in runtime_paths(environ):
            if not (path == Path("/usr") or path.is_relative_to("/usr")):
                mounts.append(Mount(str(path), str(path), type="bind", read_only=True))
        if launch.model_dir != Path("/"):
            model = str(launch.model_dir)
            mounts.append(Mount(model, model, type="bind", read_only=True))
        # Read-only: the worker only connects to its socket; it writes to its tmpfs only.
        ipc = str(launch.ipc_dir)
        mounts.append(Mount(ipc, ipc, type="bind", read_only=True))
        ulimits = [Ulimit(name="core", soft=0, hard=0)]
        if limits.open_files:
            ulimits.append(Ulimit(name="nofile", soft=limits.open_files, hard=limits.open_files))
        if limits.file_bytes:
            ulimits.append(Ulimit(name="fsize", soft=limits.file_bytes, hard=limits.file_bytes))
        tmp_size = f"size={limits.tmp_bytes}," if limits.tmp_bytes else ""
        uid, gid = (user.uid, user.gid) if user is not None else (os.getuid(), os.getgid())
        spec: dict[str, Any] = {
            "image": self._image or image_tag(),
            "command": launch.argv,
            "name": f"bastion-{self._gateway.split(':')[0]}-{launch.worker_id}",
            "labels": {LABEL: launch.worker_id, GATEWAY_LABEL: self._gateway},
            "environment": worker_environment(launch, environ, home=WORKER_TMP),
            "working_dir": ipc,
            "user": f"{uid}:{gid}",
            "group_add": [str(user.group)] if user is not None else [],
            "hostname": "bastion-worker",
            "network_mode": "none",
            "read_only": True,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges", f"seccomp={docker_profile()}"],
            "init": True,
            "ipc_mode": "private",
            "mounts": mounts,
            "tmpfs": {"/tmp": f"{tmp_size}mode=1777,nosuid,nodev"},  # noqa: S108 - its own
            "shm_size": limits.tmp_bytes or None,
            "pids_limit": limits.processes or None,
            "ulimits": ulimits,
            # Output goes to the gateway's log through the attached stream; nothing is
            # kept on the engine's disk, which a chatty worker could otherwise fill.
            "log_config": LogConfig(type="none"),
            "stdin_open": False,
            "tty": False,
            "detach": True,
        }
        if limits.memory_bytes:
            spec["mem_limit"] = limits.memory_bytes
            spec["memswap_limit"] = limits.memory_bytes
        if limits.cpus:
            spec["nano_cpus"] = int(limits.cpus * 1e9)
        return spec

    def _ensure_image(self) -> None:
        from docker.errors import ImageNotFound

        tag = image_tag()
        try:
            self._client.images.get(tag)
        except ImageNotFound:
            logger.info("building the worker image", extra={"image": tag})
            self._client.images.build(
                fileobj=io.BytesIO(image_context()),
                custom_context=True,
                tag=tag,
                rm=True,
                pull=False,
                labels={LABEL: "image"},
            )
        self._image = tag


class DockerWorker:
    """A worker running in a container; it is removed once it has exited."""

    def __init__(
        self, container: Any, worker_id: str, stream: Any, user: WorkerUid | None = None
    ) -> None:
        self._container = container
        # Given back once the container is gone: nothing runs as this uid any more.
        self._user = user
        state = container.attrs["State"]
        self._pid = int(state["Pid"])
        self._returncode: int | None = None
        self._signals: set[asyncio.Future[None]] = set()
        #: What the sandbox knows of why the worker exited (e.g. its memory limit), if any.
        self.exit_note: str | None = None
        reader = asyncio.StreamReader(limit=_OUTPUT_CHUNK * 4)
        loop = asyncio.get_running_loop()
        # Its own thread, as for the wait below: these calls last as long as the worker,
        # and would hold the event loop's shared thread pool that much.
        threading.Thread(
            target=_pump,
            args=(stream, reader, loop),
            name=f"docker-output-{worker_id}",
            daemon=True,
        ).start()
        logger_ = logging.getLogger(OUTPUT_LOGGER)
        self._output = asyncio.create_task(forward_output(reader, logger_, worker_id))

    @property
    def pid(self) -> int:
        """The host pid of the container's init."""
        return self._pid

    @property
    def peer_pid(self) -> int:
        # The worker is the child of the container's init: only they may connect.
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        if self._returncode is not None:
            return self._returncode
        container = self._container
        try:
            result = await _in_own_thread(container.wait)
            code = int(result.get("StatusCode", -1))
            await asyncio.to_thread(container.reload)
            if container.attrs["State"].get("OOMKilled"):
                self.exit_note = "killed at its memory limit"
        except Exception as exc:
            logger.warning("lost track of a worker container", extra={"exc": repr(exc)})
            code = -signal.SIGKILL
        finally:
            await asyncio.to_thread(_ignore_gone, lambda: container.remove(force=True))
            if self._user is not None:
                self._user.release()
        # docker-init reports a worker killed by signal N as 128 + N; as for a child
        # process, a negative status says "killed by that signal".
        if 128 < code <= 128 + 64:
            code = 128 - code
        self._returncode = code
        try:
            await asyncio.wait_for(asyncio.shield(self._output), 1.0)
        except TimeoutError:
            self._output.cancel()
        return code

    def terminate(self) -> None:
        self._signal("SIGTERM")

    def kill(self) -> None:
        self._signal("SIGKILL")

    def _signal(self, name: str) -> None:
        if self._returncode is not None:
            return
        container = self._container
        sent = asyncio.ensure_future(
            asyncio.to_thread(_ignore_gone, lambda: container.kill(signal=name))
        )
        self._signals.add(sent)
        sent.add_done_callback(self._signals.discard)


def connect() -> Any:
    """A Docker client for the engine the environment names; ConfigurationError if none."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise ConfigurationError(
            "the docker sandbox needs the 'docker' Python package (pip install docker)"
        ) from None
    try:
        client = docker.from_env(timeout=_ENGINE_TIMEOUT_S)
        client.ping()
    except DockerException as exc:
        reason = str(exc).split("\n")[0][:200]
        raise ConfigurationError(
            f"the docker sandbox needs a running Docker engine, and none answers ({reason}); "
            "start dockerd (`make docker-deps` as root) or choose another sandbox."
        ) from None
    return client


def image_tag() -> str:
    """The worker image's name: its build context's hash, so a change rebuilds it."""
    digest = hashlib.sha256(image_context()).hexdigest()[:16]
    return f"{IMAGE_REPOSITORY}:{digest}"


def _system_paths() -> list[Path]:
    """/usr, the top-level directories of a system without merged /usr (not /sbin, where
    Docker puts its init), and the linker cache and time zone."""
    paths = [Path("/usr")]
    for name in ("bin", "lib", "lib32", "lib64"):
        path = Path("/") / name
        if path.is_dir() and not path.is_symlink():
            paths.append(path)
    paths += [p for p in (Path("/etc/ld.so.cache"), Path("/etc/localtime")) if p.exists()]
    return paths


def _refused(exc: Exception) -> ConfigurationError:
    reason = str(exc).split("\n")[0][:200]
    return ConfigurationError(f"the Docker engine could not start the worker ({reason})")


async def _in_own_thread(call: Callable[[], T]) -> T:
    """Run a call that may block for long in a thread of its own, not the shared pool."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="docker-wait", daemon=True).start()
    return await asyncio.wrap_future(future)


def _pump(stream: Any, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
    """Copy the container's attached output into `reader` (runs in a thread)."""
    try:
        for chunk in stream:
            loop.call_soon_threadsafe(reader.feed_data, chunk)
    except Exception:  # noqa: S110 - the stream ends when the container goes, one way or another
        pass
    finally:
        loop.call_soon_threadsafe(reader.feed_eof)


def _ignore_gone(call: Any) -> None:
    """Run `call`; a container that is already gone or stopped is not an error."""
    from docker.errors import APIError, NotFound

    try:
        call()
    except NotFound:
        pass
    except APIError as exc:
        if exc.status_code not in (404, 409):
            raise


def _gateway_label() -> str:
    """This gateway, as "pid:start time": a reused pid does not look like the same one."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _gateway_alive(label: str) -> bool:
    pid, _, started = label.partition(":")
    if not pid.isdigit():
        return False
    return _start_time(int(pid)) == started


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""
