"""A small cluster on this machine, for the cluster tests: three hosts simulated with
network namespaces (the fixtures that start it are in conftest.py).

Each host is a network namespace (`ip netns`) with one veth link to a bridge in the root
namespace and an address of its own; the root namespace holds the bridge's address, where
PostgreSQL and Redis listen (and 127.0.0.1, where the tests reach them). On the hosts:

- host a: the Ray head (no CPUs of its own: replicas go to the worker nodes) and gateway 1;
- host b: a Ray worker node and gateway 2;
- host c: a Ray worker node.

Both gateways share the PostgreSQL database, Redis and the master key, and place their
model replicas on the Ray nodes, whose workers dial back to each gateway's worker port
over mutual TLS. Everything is started once per session, and torn down at the end (even
after a failure): processes first, then the namespaces and the bridge.

The hosts share this machine's file system and pid namespace: a test may read any host's
files and signal any host's processes directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion_testing import BASTION, BastionServer, clean_env, run_cli, run_threads
from services import PostgresServer, RedisServer

RAY = str(Path(sys.executable).parent / "ray")
GCS_PORT = 6379
RAY_CLIENT_PORT = 10001
# Each host has ports of its own: every gateway uses the same two.
GATEWAY_PORT = 8000
WORKER_PORT = 9100
READY_TIMEOUT_S = 180.0
# Ray's defaults wait ~30 s to declare a node dead; the tests kill one.
RAY_TUNING = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
}


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


def _ip_output(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=30, check=True
    ).stdout


def require_root_and_ip() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the cluster tests simulate hosts with network namespaces and must run as root "
            "(as `make test` does)",
            pytrace=False,
        )
    if shutil.which("ip") is None:
        pytest.fail(
            "the cluster tests need `ip` (iproute2): run `make cluster-deps`", pytrace=False
        )


# ---------------------------------------------------------------------------- network


@dataclass(frozen=True, slots=True)
class Host:
    """A simulated host: a network namespace with one address."""

    name: str
    namespace: str
    address: str

    def command(self, *argv: str) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


class Network:
    """A bridge in the root namespace and one namespace per host, linked to it by a veth
    pair; names and subnet unique to this test session (derived from its pid)."""

    def __init__(self, names: Sequence[str], tag: str | None = None) -> None:
        tag = tag or str(os.getpid())
        self.tag = tag
        self.bridge = f"bst{tag}"[:15]
        prefix = _free_subnet(int(tag) if tag.isdigit() else 0)
        #: The root namespace's address on the bridge (PostgreSQL and Redis listen there).
        self.address = f"{prefix}.1"
        self.cidr = f"{prefix}.0/24"
        self.hosts = {
            name: Host(name, f"bst-{tag}-{name}", f"{prefix}.{11 + i}")
            for i, name in enumerate(names)
        }
        self._links: list[str] = []
        self._namespaces: list[str] = []
        self._iptables_rule: list[str] | None = None

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @staticmethod
    def remove_stale() -> None:
        """What an earlier session that was killed (no teardown) left behind: namespaces,
        the processes in them, bridges and Ray temporary folders named after a test
        process that is gone."""
        for line in _ip_output("netns", "list").splitlines():
            found = re.fullmatch(r"(bst-(\d+)-\w+)(?: \(.*\))?", line.strip())
            if found is None or _pid_alive(int(found.group(2))):
                continue
            for pid in _ip_output("netns", "pids", found.group(1)).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", found.group(1))
        for line in _ip_output("-o", "link", "show", "type", "bridge").splitlines():
            found = re.match(r"\d+: (bst(\d+)):", line)
            if found is not None and not _pid_alive(int(found.group(2))):
                with contextlib.suppress(RuntimeError):
                    _ip("link", "del", found.group(1))
        for folder in Path(tempfile.gettempdir()).glob("rb*-*"):
            tag = folder.name[2:].split("-", 1)[0]
            if tag.isdigit() and not _pid_alive(int(tag)) and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)

    def create(self) -> None:
        self.remove_stale()
        _ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, host in enumerate(self.hosts.values()):
            outside = f"{self.bridge}{host.name}"[:15]
            inside = f"bsp{self.tag}{index}"[:15]
            _ip("netns", "add", host.namespace)
            self._namespaces.append(host.namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self._links.append(outside)
            _ip("link", "set", inside, "netns", host.namespace)
            _ip("link", "set", outside, "master", self.bridge, "up")
            ns = ("-n", host.namespace)
            _ip(*ns, "link", "set", inside, "name", "eth0")
            _ip(*ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip(*ns, "link", "set", "eth0", "up")
            _ip(*ns, "link", "set", "lo", "up")
            _ip(*ns, "route", "add", "default", "via", self.address)
        self._allow_bridged_traffic()

    def _allow_bridged_traffic(self) -> None:
        """Bridged frames go through iptables' FORWARD chain when br_netfilter is loaded:
        if its policy drops them (a Docker engine's does), let this bridge's through."""
        nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if not nf.exists() or nf.read_text().strip() != "1" or shutil.which("iptables") is None:
            return
        rules = subprocess.run(
            ["iptables", "-S", "FORWARD"], capture_output=True, text=True, timeout=30
        )
        if rules.returncode != 0 or "-P FORWARD ACCEPT" in rules.stdout:
            return
        rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True, timeout=30)
        self._iptables_rule = rule

    def destroy(self) -> None:
        """Remove whatever was created (each step even if another failed)."""
        if self._iptables_rule is not None:
            subprocess.run(["iptables", "-D", *self._iptables_rule], capture_output=True)
        for namespace in self._namespaces:
            # Whatever still runs on a host (a namespace outlives its name while it does).
            pids = subprocess.run(
                ["ip", "netns", "pids", namespace], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for namespace in reversed(self._namespaces):
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", namespace)
        for link in reversed(self._links):
            # A veth pair goes with its namespace; the bridge is removed here.
            if subprocess.run(["ip", "link", "show", link], capture_output=True).returncode == 0:
                with contextlib.suppress(RuntimeError):
                    _ip("link", "del", link)
        self._namespaces.clear()
        self._links.clear()


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _free_subnet(seed: int) -> str:
    """A 10.77.N.0/24 that no route or address of this machine touches."""
    taken = _ip_output("-4", "route", "show", "table", "all") + _ip_output("-4", "addr")
    for step in range(200):
        prefix = f"10.77.{20 + (seed + step) % 200}"
        if f"{prefix}." not in taken:
            return prefix
    raise RuntimeError("no free 10.77.N.0/24 subnet for the simulated hosts")


# ---------------------------------------------------------------------------- processes


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (a snapshot of /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process, every descendant (taken before any dies, so that orphans are
    not missed) and its process group; then reap it."""
    if proc.poll() is None:
        pids = process_tree(proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


class RayNode:
    """`ray start --block` on a host: the process whose tree is the whole node."""

    # What `ray start --block` prints once its node has joined the cluster.
    STARTED = "This command will now block forever"

    def __init__(
        self, name: str, host: Host, args: Sequence[str], env: dict[str, str], logs: Path
    ) -> None:
        self.name = name
        self.host = host
        self.args = list(args)
        self.env = env
        # Short: Ray puts Unix sockets under it.
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"rb{os.getpid()}-{name}", dir="/tmp"))
        self.log = logs / f"ray-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def start(self) -> None:
        self._starts = self.logs().count(self.STARTED) + 1
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.host.command(
                    RAY,
                    "start",
                    "--block",
                    f"--node-ip-address={self.host.address}",
                    f"--temp-dir={self.temp_dir}",
                    "--disable-usage-stats",
                    "--object-store-memory=100000000",
                    *self.args,
                ),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_started(self) -> None:
        """Wait until the node has joined (its `ray start` says so)."""
        _wait_for(
            lambda: self.logs().count(self.STARTED) >= self._starts,
            READY_TIMEOUT_S,
            lambda: f"Ray node {self.name} did not start:\n{self.logs()[-3000:]}",
            alive=lambda: self.alive,
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.alive and self.proc is not None else []

    def kill(self) -> None:
        """kill -9 of the whole node, as if the host had died."""
        if self.proc is not None:
            kill_tree(self.proc)

    def close(self) -> None:
        self.kill()
        # Ray's own logs stay beside the node's, for a failure's post-mortem.
        logs = self.temp_dir / "session_latest" / "logs"
        with contextlib.suppress(OSError, shutil.Error):
            shutil.copytree(logs, self.log.with_suffix(""), ignore_dangling_symlinks=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class RayCluster:
    """A head on one host and worker nodes on others, with token authentication."""

    def __init__(self, head: Host, workers: dict[str, Host], workdir: Path) -> None:
        self.head_host = head
        self.token_path = workdir / "ray-token"
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}
        # Ray's workers run the replica hosts: no BASTION_* of the tests' own environment.
        env = clean_env(**self.auth_env, **RAY_TUNING)
        self.address = f"ray://{head.address}:{RAY_CLIENT_PORT}"
        self.head = RayNode(
            "a",
            head,
            [
                "--head",
                f"--port={GCS_PORT}",
                f"--ray-client-server-port={RAY_CLIENT_PORT}",
                "--include-dashboard=false",
                # No CPUs: every replica goes to a worker node.
                "--num-cpus=0",
            ],
            env,
            workdir,
        )
        self.workers = {
            name: RayNode(
                name, host, [f"--address={head.address}:{GCS_PORT}", "--num-cpus=2"], env, workdir
            )
            for name, host in workers.items()
        }

    @property
    def nodes(self) -> list[RayNode]:
        return [self.head, *self.workers.values()]

    def start_workers(self) -> None:
        """Start the worker nodes once the head is up, and wait for them to join."""
        self.head.wait_started()
        for node in self.workers.values():
            node.start()
        for node in self.workers.values():
            node.wait_started()

    def restart_dead_workers(self) -> bool:
        restarted = [node for node in self.workers.values() if not node.alive]
        for node in restarted:
            node.kill()
            node.start()
        for node in restarted:
            node.wait_started()
        return bool(restarted)

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.close()


def _wait_for(
    condition: Callable[[], bool],
    timeout: float,
    message: Callable[[], str],
    *,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.25,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if alive is not None and not alive():
            raise AssertionError(f"exited: {message()}")
        time.sleep(interval)
    raise AssertionError(message())


# ---------------------------------------------------------------------------- gateways


class Gateway(BastionServer):
    """`bastion serve` on a simulated host, bound to its address (the helpers of
    BastionServer, minus its start: this one runs under `ip netns exec`)."""

    def __init__(self, name: str, host: Host, home: Path, env: dict[str, str]) -> None:
        self.name = name
        self.host = host
        self.home = home
        self.port = GATEWAY_PORT
        self.tls_ca = None
        self.client_cert = None
        self.url = f"http://{host.address}:{self.port}"
        self.admin_url = self.url
        self.env = env
        self.worker_port = (host.address, WORKER_PORT)
        self.stdout_path = home.parent / f"{name}-stdout.log"
        self.stderr_path = home.parent / f"{name}-stderr.log"
        self.start()

    def start(self) -> None:
        self._stdout = self.stdout_path.open("ab")
        self._stderr = self.stderr_path.open("ab")
        self.proc = subprocess.Popen(
            self.host.command(
                *BASTION,
                "serve",
                "--home",
                str(self.home),
                "--host",
                self.host.address,
                "--port",
                str(self.port),
            ),
            stdout=self._stdout,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            env=clean_env(**self.env),
            start_new_session=True,
        )

    def start_ready(self, models: Sequence[str] = ("echo",)) -> None:
        """Wait for the gateway and its models to be ready."""
        self.wait_ready(list(models), timeout=READY_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9 of the gateway process (as a crash: its replicas are left to Ray)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._stdout.close()
        self._stderr.close()

    def restart(self) -> None:
        self.stop(timeout=20)  # closes its log files too (again, if it was killed)
        self.start()

    def close(self) -> None:
        self.stop(timeout=20)

    def log_entries(self, message: str | None = None) -> list[dict[str, Any]]:
        """The gateway's JSON log lines (those with this message)."""
        found = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if message is None or entry.get("msg") == message:
                found.append(entry)
        return found

    def worker_pids(self, model: str) -> list[int]:
        """Pids (on their nodes, which share this machine's pid namespace) of the
        replicas of `model` this gateway started, in order."""
        return [
            int(e["pid"]) for e in self.log_entries("worker started") if e.get("model") == model
        ]


@dataclass
class Cluster:
    """Everything the cluster tests use."""

    network: Network
    postgres: PostgresServer
    redis: RedisServer
    database: str
    ray: RayCluster
    gateways: list[Gateway]
    workdir: Path
    cli_env: dict[str, str] = field(default_factory=dict)

    @property
    def gw1(self) -> Gateway:
        return self.gateways[0]

    @property
    def gw2(self) -> Gateway:
        return self.gateways[1]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`bastion <args>` on the first gateway's home and the shared database (from the
        root namespace, which reaches PostgreSQL on 127.0.0.1)."""
        return run_cli(self.gw1.home, *args, check=check, env=self.cli_env)

    def ensure_healthy(self) -> None:
        """What a test may have killed comes back before the next one: Ray nodes, Redis,
        PostgreSQL, gateways; then every gateway serves the echo model."""
        self.ray.restart_dead_workers()
        if self.redis.proc is None or self.redis.proc.poll() is not None:
            self.redis.start()
        if self.postgres.proc is None or self.postgres.proc.poll() is not None:
            self.postgres.start()
        for gateway in self.gateways:
            if not gateway.alive:
                gateway.restart()
        run_threads(*(gateway.start_ready for gateway in self.gateways))


def tenant_key(gateway: Gateway, tenant: str) -> tuple[str, str]:
    """A new consumer key of `tenant` (created if needed) through `gateway`'s admin API;
    (token, key id)."""
    with gateway.admin_client() as admin:
        admin.post("/admin/v1/tenants", json={"name": tenant})
        created = admin.post("/admin/v1/keys", json={"tenant": tenant, "role": "consumer"})
        assert created.status_code == 201, created.text
        return created.json()["key"], created.json()["id"]


def set_quota(gateway: Gateway, kind: str, subject: str, **limits: Any) -> None:
    with gateway.admin_client() as admin:
        answer = admin.patch(f"/admin/v1/quotas/{kind}/{subject}", json=limits)
        assert answer.status_code == 200, answer.text


def complete(
    gateway: Gateway, key: str, model: str = "echo", prompt: str = "a b c", timeout: float = 30
) -> httpx.Response:
    """A completion of the echo model (the cheapest request that reaches a worker)."""
    return httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 4},
        headers={"authorization": f"Bearer {key}"},
        timeout=timeout,
    )


def eventually(
    condition: Callable[[], bool], within: float, what: str, interval: float = 0.05
) -> float:
    """Seconds until `condition` held; fails if it did not within `within`."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(interval)


class Load:
    """Threads sending completions to some gateways until stopped, counting every outcome
    per gateway: a status code, "timeout" (the client's 30 s ran out: a hung request),
    "connection" (refused or cut off), or "503-no-retry-after"."""

    def __init__(self, gateways: Sequence[Gateway], key: str, threads: int = 3) -> None:
        self.key = key
        self.outcomes: dict[str, Counter[str]] = {g.name: Counter() for g in gateways}
        self.slowest = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(g,), daemon=True)
            for g in gateways
            for _ in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not any(t.is_alive() for t in self._threads), "a load thread hung"

    def total(self, name: str, outcome: str) -> int:
        with self._lock:
            return self.outcomes[name][outcome]

    def _run(self, gateway: Gateway) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = complete(gateway, self.key, timeout=30)
                outcome = str(answer.status_code)
                if outcome == "503" and "retry-after" not in answer.headers:
                    outcome = "503-no-retry-after"
            except httpx.TimeoutException:
                outcome = "timeout"
            except httpx.TransportError:
                outcome = "connection"
                time.sleep(0.05)
            with self._lock:
                self.outcomes[gateway.name][outcome] += 1
                self.slowest = max(self.slowest, time.monotonic() - started)
