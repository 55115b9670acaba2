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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion_testing import BastionServer, add_echo_model, run_cli

MiB = 1024 * 1024
ENV = {
    "BASTION_REQUEST_TIMEOUT_S": "3",
    "BASTION_WORKER_MEMORY_BYTES": str(512 * MiB),
    "BASTION_WORKER_PROCESSES": "64",
    "BASTION_WORKER_TMP_BYTES": str(8 * MiB),
}


BACKENDS = ["bwrap", "docker"]


@pytest.fixture(scope="module", params=BACKENDS)
def sandboxed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BastionServer]:
    """A server whose workers all run in one backend; under bubblewrap, one more model
    asks for Docker by its `sandbox` option."""
    backend: str = request.param
    home = tmp_path_factory.mktemp(f"escape-{backend}") / "home"
    run_cli(home, "init", "--no-demo-models")
    # World-readable and empty (the runtimes read nothing): a root gateway's Docker
    # workers run as uid 65534 and are refused a model directory they cannot read.
    probe = home.parent / "probe-model"
    probe.mkdir(mode=0o755)
    run_cli(home, "models", "add", "hostile", "--runtime", "escape-test", "--path", str(probe))
    run_cli(home, "models", "add", "victim", "--runtime", "echo", "--path", str(probe),
            "--option", "test_hooks=true")  # fmt: skip
    models = ["hostile", "victim"]
    if backend == "bwrap":
        run_cli(home, "models", "add", "contained", "--runtime", "escape-test",
                "--path", str(probe), "--option", "sandbox=docker")  # fmt: skip
        models.append("contained")
    else:
        # The home is owner-only: refused to uid 65534, with the reason.
        add_echo_model(home, "private")
    srv = BastionServer(home, env={**ENV, "BASTION_SANDBOX": backend})
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


def test_the_worker_runs_as_nobody_in_its_own_namespaces(sandboxed: BastionServer) -> None:
    report = attempt(sandboxed, "whoami")
    assert report["uid"] == 65534 and report["sandboxed"] is True
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
        assert "not readable by uid 65534" in view["detail"]


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
        if b"bastion.workers.main" in argv and b"--endpoint" in argv:
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
