"""Escape attempts from inside each sandbox backend (bubblewrap, Docker), by a hostile
model's own code.

The `escape-test` runtime is loaded like any model and, for each request, tries one way
out from inside its worker: the network, DNS, other sockets, secrets on disk, the
gateway's process, writing outside /tmp, ptrace, and exhausting processes, memory, CPU
and /tmp. Each attempt must fail in the specific way the sandbox makes it fail; the
gateway stays healthy and another model keeps serving; a worker that hits a hard limit
is killed, restarted, and the event says why. Every test runs against both backends on a
real engine: the Docker tests fail, not skip, where no Docker engine runs (`make test`
starts one).
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion_testing import (
    HOSTILE_RUNTIME_ENV,
    BastionServer,
    add_echo_model,
    empty_model_dir,
    run_cli,
    worker_pids,
)

MiB = 1024 * 1024
ENV = {
    "BASTION_REQUEST_TIMEOUT_S": "3",
    "BASTION_WORKER_MEMORY_BYTES": str(512 * MiB),
    "BASTION_WORKER_PROCESSES": "64",
    "BASTION_WORKER_TMP_BYTES": str(8 * MiB),
}


BACKENDS = ["bwrap", "docker"]
# The default range of worker uids (BASTION_WORKER_UID_BASE): the base is their group.
UID_BASE = 1_900_000_000


@pytest.fixture(scope="module", params=BACKENDS)
def sandboxed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BastionServer]:
    """A server whose workers all run in one backend; under bubblewrap, one more model
    asks for Docker by its `sandbox` option."""
    backend: str = request.param
    home = tmp_path_factory.mktemp(f"escape-{backend}") / "home"
    run_cli(home, "init", "--no-demo-models")
    # World-readable and empty (the runtimes read nothing): a root gateway's workers run
    # as users of their own and are refused a model directory they cannot read.
    probe = empty_model_dir(home)
    env = HOSTILE_RUNTIME_ENV
    run_cli(home, "models", "add", "hostile", "--runtime", "escape-test", "--path", str(probe),
            env=env)  # fmt: skip
    run_cli(home, "models", "add", "victim", "--runtime", "echo", "--path", str(probe),
            "--option", "test_hooks=true")  # fmt: skip
    models = ["hostile", "victim"]
    if backend == "bwrap":
        run_cli(home, "models", "add", "contained", "--runtime", "escape-test",
                "--path", str(probe), "--option", "sandbox=docker", env=env)  # fmt: skip
        models.append("contained")
    # The home is owner-only: refused to the worker's user, with the reason.
    run_cli(home, "models", "add", "private", "--runtime", "echo", "--path", str(home))
    srv = BastionServer(home, env={**ENV, **env, "BASTION_SANDBOX": backend})
    srv.backend = backend  # type: ignore[attr-defined]
    try:
        srv.wait_ready(models, timeout=120)
        yield srv
    finally:
        srv.stop()


def backend_of(server: BastionServer) -> str:
    backend: str = server.backend  # type: ignore[attr-defined]
    return backend


def attempt(
    server: BastionServer, what: str, /, *, model: str = "hostile", **args: Any
) -> dict[str, Any]:
    with server.client() as client:
        answer = client.post(
            "/v1/completions",
            json={"model": model, "prompt": json.dumps({"attempt": what, "args": args})},
        )
    assert answer.status_code == 200, answer.text
    report: dict[str, Any] = json.loads(answer.json()["choices"][0]["text"])
    assert report["attempt"] == what
    return report


def blocked(server: BastionServer, what: str, /, *, model: str = "hostile", **args: Any) -> str:
    report = attempt(server, what, model=model, **args)
    assert report["escaped"] is False, report
    error: str = report["error"]
    return error


def assert_healthy(server: BastionServer) -> None:
    with server.client() as client:
        assert client.get("/healthz").status_code == 200
        echoed = client.post("/v1/completions", json={"model": "victim", "prompt": "still serving"})
        assert echoed.status_code == 200
        assert echoed.json()["choices"][0]["text"] == "still serving"


def test_the_worker_runs_as_a_user_of_its_own_in_its_own_namespaces(
    sandboxed: BastionServer,
) -> None:
    report = attempt(sandboxed, "whoami")
    assert report["sandboxed"] is True
    # The gateway runs as root here: the worker is a host user of its own, in the workers'
    # group only, with no capability at all, no_new_privs and a seccomp filter.
    assert UID_BASE < report["uid"] <= UID_BASE + 4096
    assert report["gid"] == report["uid"] and UID_BASE in report["groups"]
    assert set(report["groups"]) <= {UID_BASE, report["uid"]}
    assert int(report["cap_eff"], 16) == 0 and int(report["cap_bnd"], 16) == 0
    assert report["no_new_privs"] == "1" and report["seccomp"] == "2"
    assert report["home"] == "/tmp"
    with sandboxed.client() as client:
        ready = client.get("/readyz").json()
    assert ready["sandbox"] == backend_of(sandboxed)
    if backend_of(sandboxed) == "bwrap":
        # The model that asked for Docker by option runs there, and readyz says so.
        assert ready["sandboxes"] == ["bwrap", "docker"]
        assert attempt(sandboxed, "whoami", model="contained")["sandboxed"] is True
        assert blocked(sandboxed, "connect", model="contained", host="1.1.1.1", port=443) == (
            "ENETUNREACH"
        )
        # Only that model's worker is in a container.
        assert len(_containers_of(sandboxed)) == 1
    else:
        assert ready["sandboxes"] == ["docker"]
        assert len(_containers_of(sandboxed)) == 2
    with sandboxed.client() as client:
        deadline = time.monotonic() + 30
        while (view := client.get("/admin/v1/models/private").json())["state"] != "failed":
            assert time.monotonic() < deadline, view
            time.sleep(0.2)
    assert "not readable by uid" in view["detail"]


def _containers_of(server: BastionServer) -> list[dict[str, Any]]:
    """The running worker containers of `server`, as the Docker engine describes them."""
    import docker

    client = docker.from_env()
    try:
        found = client.containers.list(filters={"label": "bastion.worker"})
        return [
            c.attrs for c in found if c.labels["bastion.gateway"].startswith(f"{server.proc.pid}:")
        ]
    finally:
        client.close()


def _worker_pids(server: BastionServer) -> list[int]:
    """The host pids of `server`'s workers: its descendants under bubblewrap, its
    containers' under Docker (the bubblewrap server also runs one model in Docker)."""
    containers = [int(c["State"]["Pid"]) for c in _containers_of(server)]
    return worker_pids(server.proc.pid, *containers)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_from_the_host_each_worker_is_an_unprivileged_user_of_its_own(
    sandboxed: BastionServer,
) -> None:
    pids = _worker_pids(sandboxed)
    # hostile, victim (and contained, in Docker beside bubblewrap).
    assert len(pids) >= 2, pids
    uids = set()
    gateway_ns = {n: os.readlink(f"/proc/{sandboxed.proc.pid}/ns/{n}") for n in NAMESPACES}
    for pid in pids:
        status = _status(pid)
        real, effective, saved, filesystem = (int(v) for v in status["Uid"].split())
        assert real == effective == saved == filesystem != 0, status["Uid"]
        assert UID_BASE < real <= UID_BASE + 4096
        assert {int(v) for v in status["Gid"].split()} == {real}
        # The workers' group (Docker lists the primary group there too).
        assert str(UID_BASE) in status["Groups"].split()
        assert set(status["Groups"].split()) <= {str(UID_BASE), str(real)}
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (caps, status[caps])
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        uids.add(real)
        # Namespaces of its own: none shared with the gateway.
        for name, gateway in gateway_ns.items():
            assert os.readlink(f"/proc/{pid}/ns/{name}") != gateway, name
        # What it has mounted: /proc/sys read-only, nothing writable but its tmpfs.
        mounts = _mounts_of(pid)
        assert "ro" in mounts["/proc/sys"].split(","), mounts
        writable = {target for target, options in mounts.items() if "rw" in options.split(",")}
        assert writable <= WRITABLE_MOUNTS, writable - WRITABLE_MOUNTS
        for target in ("/tmp", "/dev/shm"):
            if target in mounts:
                assert {"nosuid", "nodev"} <= set(mounts[target].split(",")), mounts[target]
    # One uid per worker.
    assert len(uids) == len(pids)


NAMESPACES = ("net", "pid", "mnt", "ipc", "uts")
# Its tmpfs, and the character devices any program writes to (/dev/null, ...); under
# Docker also the masks over /proc entries (/dev/null, or an empty tmpfs) and the root-owned
# tmpfs holding the (read-only) cgroup mounts.
WRITABLE_MOUNTS = (
    {"/tmp", "/dev/shm", "/dev", "/proc", "/sys/fs/cgroup"}
    | {f"/dev/{name}" for name in ("null", "zero", "full", "random", "urandom", "tty", "pts")}
    | {"/dev/mqueue", "/dev/console"}
    | {f"/proc/{name}" for name in ("keys", "timer_list", "kcore", "latency_stats", "acpi")}
    | {"/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"}
)


def _mounts_of(pid: int) -> dict[str, str]:
    """Mount point -> its per-mount options, as the worker sees them."""
    found = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        found[fields[4]] = fields[5]
    return found


def test_kernel_settings_cannot_be_written(sandboxed: BastionServer) -> None:
    before = Path("/proc/sys/kernel/core_pattern").read_bytes()
    # Every writable-looking sysctl (764 of them opened for writing before the fix, with a
    # root gateway under bubblewrap), without writing a byte.
    report = attempt(sandboxed, "writable_files", top="/proc/sys")
    assert report["escaped"] is False, report["opened"]
    assert report["tried"] > 100 and report["opened"] == []
    # core_pattern, for real (with its own value): a pipe there runs as host root.
    assert blocked(sandboxed, "rewrite", path="/proc/sys/kernel/core_pattern") in {
        "EROFS",
        "EACCES",
    }
    assert blocked(sandboxed, "rewrite", path="/proc/sys/fs/suid_dumpable") in {"EROFS", "EACCES"}
    assert blocked(sandboxed, "rewrite", path="/proc/sysrq-trigger") in {
        "EROFS",
        "EACCES",
        "ENOENT",
    }
    # /sys: not there at all under bubblewrap, read-only under Docker.
    report = attempt(sandboxed, "writable_files", top="/sys")
    assert report["escaped"] is False, report.get("opened")
    assert Path("/proc/sys/kernel/core_pattern").read_bytes() == before
    assert_healthy(sandboxed)


def test_no_set_user_id_files_devices_or_new_namespaces(sandboxed: BastionServer) -> None:
    report = attempt(sandboxed, "setuid_file")
    assert report["escaped"] is False, report
    assert report["owner"] != 0 and report["nosuid"] is True
    assert report["chown_to_root"] == "EPERM"
    assert blocked(sandboxed, "mknod") == "EPERM"
    for kind in ("user", "net"):
        report = attempt(sandboxed, "new_namespace", flag=kind)
        assert report["escaped"] is False, report
        assert report["error"] == "EPERM" and report["clone_error"] == "EPERM", report
    # io_uring: a large kernel surface the seccomp allow-list leaves out.
    assert blocked(sandboxed, "io_uring") == "EPERM"
    # Its own IPC directory (on the host's disk) is read-only; only its tmpfs is writable.
    assert blocked(sandboxed, "write_beside_socket") == "EROFS"
    assert_healthy(sandboxed)


def test_no_network_at_all(sandboxed: BastionServer) -> None:
    # Its own loopback has nothing listening: the gateway's port is not there.
    assert blocked(sandboxed, "connect", host="127.0.0.1", port=sandboxed.port) == "ECONNREFUSED"
    assert blocked(sandboxed, "connect", host="1.1.1.1", port=443) == "ENETUNREACH"
    assert blocked(sandboxed, "connect", host="10.0.0.1", port=80) == "ENETUNREACH"
    assert blocked(sandboxed, "dns", name="example.com").startswith("gaierror")
    assert_healthy(sandboxed)


def test_no_other_unix_socket(sandboxed: BastionServer) -> None:
    # Every worker socket on this host (the victim's among them), and the usual daemons.
    sockets = _worker_sockets()
    assert len(sockets) >= 2
    for path in [*sockets, "/var/run/docker.sock", "/run/dbus/system_bus_socket"]:
        error = blocked(sandboxed, "unix", path=path)
        # Its own socket is in use by the gateway (one connection); the others are not
        # even in its file system (in either backend: Docker's own socket neither).
        assert error in {"ENOENT", "ECONNREFUSED"}, (path, error)
    assert_healthy(sandboxed)


def _worker_sockets() -> list[str]:
    """The IPC socket of every Bastion worker running here, from their command lines."""
    found = set()
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            argv = Path(cmdline).read_bytes().split(b"\0")
        except OSError:
            continue
        if b"bastion.worker.main" in argv and b"--endpoint" in argv:
            found.add(argv[argv.index(b"--endpoint") + 1].decode())
    return sorted(found)


def test_no_secrets_or_other_models_on_disk(sandboxed: BastionServer) -> None:
    home = sandboxed.home
    for path in (
        "/etc/shadow",
        "/etc/passwd",
        str(home / "master.key"),
        str(home / "admin.key"),
        str(home / "signing.key"),
        str(home / "bastion.db"),
        str(Path.home() / ".bash_history"),
        f"/proc/{sandboxed.proc.pid}/environ",
        f"/proc/{sandboxed.proc.pid}/mem",
    ):
        assert blocked(sandboxed, "read", path=path) == "ENOENT", path
    assert_healthy(sandboxed)


def test_nothing_writable_outside_tmp(sandboxed: BastionServer) -> None:
    for path in ("/escape", "/usr/escape", "/etc/escape", str(sandboxed.home / "escape")):
        assert blocked(sandboxed, "write", path=path) in {"EROFS", "ENOENT"}, path
    assert not (sandboxed.home / "escape").exists()


def test_no_ptrace_and_no_signals_to_the_gateway(sandboxed: BastionServer) -> None:
    assert blocked(sandboxed, "ptrace", pid=1) == "EPERM"
    # The gateway's pid is not in the worker's pid namespace.
    assert blocked(sandboxed, "signal", pid=sandboxed.proc.pid) == "ESRCH"
    assert sandboxed.proc.poll() is None
    assert_healthy(sandboxed)


def test_a_fork_bomb_stops_at_the_process_limit(sandboxed: BastionServer) -> None:
    report = attempt(sandboxed, "fork_bomb", limit=10_000)
    assert report["escaped"] is False and report["error"] == "EAGAIN"
    assert report["forked"] < 64
    assert_healthy(sandboxed)


def test_filling_tmp_stops_at_its_size(sandboxed: BastionServer) -> None:
    report = attempt(sandboxed, "fill_tmp", limit_bytes=64 * MiB)
    assert report["escaped"] is False and report["error"] == "ENOSPC"
    assert report["written"] <= 8 * MiB
    assert_healthy(sandboxed)


def _restarted(server: BastionServer, restarts_before: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        view = server.wait_model("hostile", "ready", timeout=60)
        if view["restarts"] > restarts_before or time.monotonic() > deadline:
            return view
        time.sleep(0.2)


def test_a_memory_bomb_kills_only_its_worker(sandboxed: BastionServer) -> None:
    before = sandboxed.wait_model("hostile", "ready")["restarts"]
    with sandboxed.client() as client:
        answer = client.post(
            "/v1/completions",
            json={
                "model": "hostile",
                "prompt": json.dumps(
                    {"attempt": "memory_bomb", "args": {"limit_bytes": 4096 * MiB}}
                ),
            },
        )
    # Killed by the kernel at its cgroup's memory limit (the worker's own cgroup under
    # bubblewrap, the container's under Docker, which records OOMKilled): the request
    # fails, the gateway not.
    assert answer.status_code == 503, answer.text
    assert_healthy(sandboxed)
    assert _restarted(sandboxed, before)["restarts"] > before
    time.sleep(0.5)
    assert "killed at its memory limit" in sandboxed.logs()


def test_a_job_spinning_past_its_deadline_gets_its_worker_replaced(
    sandboxed: BastionServer,
) -> None:
    before = sandboxed.wait_model("hostile", "ready")["restarts"]
    with sandboxed.client() as client:
        started = time.monotonic()
        answer = client.post(
            "/v1/completions",
            json={
                "model": "hostile",
                "prompt": json.dumps({"attempt": "spin", "args": {"seconds": 120}}),
            },
        )
        assert answer.status_code == 504
        assert time.monotonic() - started < 30
    assert_healthy(sandboxed)
    # The job ignores its cancellation: the worker gives up on it and is replaced.
    assert _restarted(sandboxed, before)["restarts"] > before
    time.sleep(0.5)
    assert "a job ignored its cancellation" in sandboxed.logs()
    assert attempt(sandboxed, "whoami")["sandboxed"] is True


def test_unsafe_mode_needs_its_flag_and_says_so(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    refused = BastionServer(home, env={"BASTION_SANDBOX": "none"})
    try:
        assert refused.proc.wait(60) != 0
    finally:
        refused.stop()
    assert "--unsafe-no-sandbox" in refused.logs()
    unsafe = BastionServer(home, "--unsafe-no-sandbox")
    try:
        unsafe.wait_ready(timeout=60)
        ready = httpx.get(unsafe.url + "/readyz").json()
        assert ready["sandbox"] == "none" and "without a sandbox" in ready["warning"]
    finally:
        unsafe.stop()
    assert "UNSAFE" in unsafe.logs()


def test_docker_asked_for_without_an_engine_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    refused = run_cli(home, "models", "add", "odd", "--runtime", "echo", "--path", str(home),
                      "--option", "sandbox=podman", check=False)  # fmt: skip
    assert refused.returncode != 0 and "sandbox option must be one of" in refused.stderr
    run_cli(home, "models", "add", "boxed", "--runtime", "echo", "--path", str(home),
            "--option", "sandbox=docker")  # fmt: skip
    add_echo_model(home, "plain")
    no_engine = {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    # Globally: the server refuses to start, and says why.
    server = BastionServer(home, env={**no_engine, "BASTION_SANDBOX": "docker"})
    try:
        assert server.proc.wait(60) != 0
    finally:
        server.stop()
    assert "needs a running Docker engine" in server.logs()
    assert "Traceback" not in server.logs()
    # For one model: that model fails to load with the reason; the others serve.
    server = BastionServer(home, env=no_engine)
    try:
        server.wait_ready(["plain"], timeout=60)
        with server.client() as client:
            deadline = time.monotonic() + 30
            while (view := client.get("/admin/v1/models/boxed").json())["state"] != "failed":
                assert time.monotonic() < deadline, view
                time.sleep(0.2)
        assert "needs a running Docker engine" in view["detail"]
    finally:
        server.stop()
    assert "Traceback" not in server.logs()
