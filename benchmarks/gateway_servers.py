"""The servers the gateway benchmark drives, started on 127.0.0.1 and checked before use.

ceiling   uvicorn + httptools + uvloop, one Starlette route, fixed answer, no auth
bastion   `bastion serve` with the echo model and a tenant key scoped to it
litserve  LitServe 0.2.19 with its API key on, in its own venv (benchmarks/.venv-litserve)
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from proctree import Fleet, Server, rss_mb

HERE = Path(__file__).resolve().parent
LITSERVE_VERSION = "0.2.19"
LITSERVE_VENV = HERE / ".venv-litserve"
VECTOR = [round(i * 0.01, 2) for i in range(64)]


class BenchmarkError(Exception):
    """A server or tool the benchmark needs did not work; the message says what failed."""


@dataclass
class Target:
    """One server under load and how to call it."""

    name: str
    url: str
    body_file: Path
    server: Server
    auth: str = ""  # Authorization header value
    xkey: str = ""  # X-API-Key header value (LitServe's scheme)


# ---------------------------------------------------------------- small tools


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One request; the status and body, also for 4xx/5xx answers."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(server: Server, ready: Callable[[], bool], timeout_s: float) -> float:
    """Poll until `ready()`; the seconds since the server's process started."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            fail(server, f"exited with code {server.process.returncode} before it was ready")
        try:
            if ready():
                return time.monotonic() - server.started_at
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.01)
    fail(server, f"not ready after {timeout_s:.0f} s")


def fail(server: Server, what: str) -> NoReturn:
    raise BenchmarkError(
        f"{server.name}: `{' '.join(server.command)}` {what}; its last output:\n{server.log_tail()}"
    )


def run_command(command: list[str], env: dict[str, str], timeout_s: float = 300) -> str:
    """Run a set-up command; its stdout, or BenchmarkError with the command and its error."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-25:])
        tail = re.sub(r"bsk_\S+", "bsk_<redacted>", tail)
        raise BenchmarkError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def write_body(path: Path, body: dict[str, Any]) -> Path:
    path.write_text(json.dumps(body))
    return path


# ---------------------------------------------------------------- the three servers


def start_ceiling(fleet: Fleet, work: Path) -> Target:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "ceiling_app:app", "--app-dir", str(HERE)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"]
    command += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
    server = fleet.start("ceiling", [*command, "--no-server-header"], os.environ)
    url = f"http://127.0.0.1:{port}/predict"
    wait_until(server, lambda: http("POST", url, b"{}")[0] == 200, 30)
    # It gets the same bytes as Bastion, though it does not read them.
    return Target("ceiling", url, oip_body(work), server)


def litserve_python(extras: Mapping[str, str] | None = None) -> Path:
    """The LitServe venv's interpreter, creating the venv on first use; `extras` (module
    name: pip requirement) are installed into it too where they do not import."""
    python = LITSERVE_VENV / "bin" / "python"
    probe = [str(python), "-c", "import litserve; print(litserve.__version__)"]
    found = subprocess.run(probe, capture_output=True, text=True) if python.exists() else None
    if found is None or found.returncode != 0 or found.stdout.strip() != LITSERVE_VERSION:
        base = shutil.which("python3.11") or sys.executable
        print(f"creating {LITSERVE_VENV} with litserve=={LITSERVE_VERSION} (first use) ...",
              flush=True)  # fmt: skip
        run_command([base, "-m", "venv", "--clear", str(LITSERVE_VENV)], dict(os.environ))
        pip = [str(python), "-m", "pip", "install", "--quiet", f"litserve=={LITSERVE_VERSION}"]
        run_command(pip, dict(os.environ), timeout_s=900)
        run_command(probe, dict(os.environ))
    missing = [
        requirement
        for module, requirement in (extras or {}).items()
        if subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode
    ]
    if missing:
        print(f"installing {', '.join(missing)} into {LITSERVE_VENV} (first use) ...", flush=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", *missing]
        run_command(pip, dict(os.environ), timeout_s=900)
    return python


def start_litserve(
    fleet: Fleet,
    work: Path,
    *,
    script: str = "litserve_server.py",
    script_args: tuple[str, ...] = (),
    body: Path | None = None,
    extras: Mapping[str, str] | None = None,
    name: str = "litserve",
) -> Target:
    """LitServe running `script` (its argv: the port, then `script_args`) with its API key
    on; `body` is the request to send it (one per line; by default the echo request)."""
    python = litserve_python(extras)
    port, key = free_port(), "ls-" + os.urandom(16).hex()
    env = dict(os.environ, LIT_SERVER_API_KEY=key)
    command = [str(python), str(HERE / script), str(port), *script_args]
    server = fleet.start(name, command, env)
    url = f"http://127.0.0.1:{port}/predict"
    body = body or write_body(work / "litserve.json", {"input": VECTOR})
    first = body.read_text().splitlines()[0].encode()
    headers = {"Content-Type": "application/json", "X-API-Key": key}
    # Up once it answers at all; check_answers then says whether the answer is right.
    wait_until(server, lambda: http("POST", url, first, headers)[0] < 500, 120)
    return Target(name, url, body, server, xkey=key)


WRK = "/usr/bin/wrk"


def wrk_missing() -> bool:
    """True (after saying so on stderr) if Debian's wrk is not installed."""
    if os.access(WRK, os.X_OK):
        return False
    print(f"error: {WRK} is missing; install Debian's wrk: apt-get install wrk", file=sys.stderr)
    return True


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def package_versions(packages: tuple[str, ...], **fixed: str) -> dict[str, str]:
    """Installed versions of `packages` (and Python's), for the results file."""
    found = {**fixed, "python": platform.python_version()}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def bastion_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    # Warnings only, so access logs do not dominate the measurement.
    env.update(BASTION_LOG_LEVEL="warning", BASTION_DRAIN_TIMEOUT_S="5", HF_HUB_OFFLINE="1")
    return env


def bastion(*args: str) -> list[str]:
    return [sys.executable, "-m", "bastion", *args]


@dataclass(frozen=True)
class ModelSpec:
    """A model to register with `bastion models add` before the server starts."""

    name: str
    runtime: str
    path: Path
    options: tuple[str, ...] = ()  # KEY=VALUE, as `--option` takes them


@dataclass
class RunningBastion:
    """A running `bastion serve` and a tenant's consumer key for its models."""

    server: Server
    base: str
    key: str
    home: Path
    env: dict[str, str]
    admin_key: str = ""


EchoBastion = RunningBastion  # the name the echo-only benchmarks know it by


def start_bastion_home(
    fleet: Fleet,
    work: Path,
    *,
    models: tuple[ModelSpec, ...] = (),
    actions: tuple[str, ...],
    demo_models: bool = False,
    env_extra: dict[str, str] | None = None,
    name: str = "bastion",
    ready_timeout_s: float = 120,
    init_args: tuple[str, ...] = (),
) -> RunningBastion:
    """`bastion serve` on a fresh home (in `work`/home) with `models` registered (and the
    demo models if `demo_models`), and a tenant key allowed `actions` on all of them; it
    returns once every model is ready."""
    env, home = bastion_env(), work / "home"
    env.update(env_extra or {})
    demo = () if demo_models else ("--no-demo-models",)
    init = json.loads(
        run_command(bastion("init", "--home", str(home), *demo, *init_args, "--json"), env)
    )
    admin = {"Authorization": f"Bearer {init['admin_key']}"}
    for model in models:
        add = ["models", "add", model.name, "--runtime", model.runtime, "--path", str(model.path)]
        for option in model.options:
            add += ["--option", option]
        run_command(bastion(*add, "--home", str(home)), env)
    run_command(bastion("tenants", "create", "bench", "--home", str(home), "--json"), env)
    names = [*init.get("demo_models", []), *(m.name for m in models)]
    create_key = ["keys", "create", "--tenant", "bench"]
    for model_name in names:
        create_key += ["--model", model_name]
    for action in actions:
        create_key += ["--action", action]
    key = json.loads(run_command(bastion(*create_key, "--home", str(home), "--json"), env))["key"]

    port = free_port()
    serve = ["serve", "--home", str(home), "--port", str(port), *demo]
    server = fleet.start(name, bastion(*serve), env)
    base = f"http://127.0.0.1:{port}"

    def model_ready(model_name: str) -> bool:
        status, raw = http("GET", f"{base}/admin/v1/models/{model_name}", headers=admin)
        state = json.loads(raw).get("state") if status == 200 else None
        if state == "failed":
            fail(server, f"reports the {model_name} model failed")
        return state == "ready"

    for model_name in names:
        wait_until(server, functools.partial(model_ready, model_name), ready_timeout_s)
    return RunningBastion(server, base, key, home, env, init["admin_key"])


def start_echo_bastion(
    fleet: Fleet,
    work: Path,
    *,
    action: str,
    echo_options: tuple[str, ...] = (),
    env_extra: dict[str, str] | None = None,
    name: str = "bastion",
    init_args: tuple[str, ...] = (),
) -> RunningBastion:
    """`bastion serve` with the echo model, and a tenant key allowed `action` on it."""
    model_dir = work / "echo-model"
    model_dir.mkdir()
    echo = ModelSpec("echo", "echo", model_dir, tuple(echo_options))
    return start_bastion_home(
        fleet,
        work,
        models=(echo,),
        actions=(action,),
        env_extra=env_extra,
        name=name,
        init_args=init_args,
    )


def start_bastion(
    fleet: Fleet, work: Path, *, name: str = "bastion", source: Path | None = None
) -> Target:
    """Bastion with the echo model and a tenant key scoped to it (OIP inference); with
    `source`, the code of that checkout (a baseline) instead of this one."""
    spec = json.dumps({"name": "input", "datatype": "FP32", "shape": [-1, 64]})
    env = {"PYTHONPATH": str(source / "src")} if source is not None else None
    work.mkdir(parents=True, exist_ok=True)
    echo = start_echo_bastion(
        fleet, work, action="infer", echo_options=(f"input={spec}",), env_extra=env, name=name
    )
    url, auth = f"{echo.base}/v2/models/echo/infer", f"Bearer {echo.key}"
    return Target(name, url, oip_body(work), echo.server, auth=auth)


@contextlib.contextmanager
def baseline_checkout(ref: str, parent: Path) -> Iterator[Path]:
    """A git worktree of this repository at `ref`, removed afterwards: the code to compare
    with, in the same run."""
    path = parent / "baseline-src"
    root = HERE.parent
    subprocess.run(["git", "-C", str(root), "worktree", "add", "-q", "--detach", str(path), ref],
                   check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(path)],
                       check=False)  # fmt: skip


def answered_values(name: str, answer: Any) -> list[Any]:
    """The 64 values each target sends back (the ceiling answers a fixed 3)."""
    if name == "ceiling":
        return [answer["output"]] * 64 if answer.get("output") == 3 else []
    bastion_like = name in ("bastion", "baseline")
    values: list[Any] = answer["outputs"][0]["data"] if bastion_like else answer["output"]
    return values


def check_answers(targets: dict[str, Target]) -> None:
    """Each target answers the benchmark request correctly and refuses one without a key."""
    for t in targets.values():
        headers = {"Content-Type": "application/json"}
        status, raw = http("POST", t.url, t.body_file.read_bytes(), headers)
        if t.name != "ceiling" and status not in (401, 403):
            fail(t.server, f"answered {status} to a request without an API key")
        headers |= {"Authorization": t.auth} if t.auth else {}
        headers |= {"X-API-Key": t.xkey} if t.xkey else {}
        status, raw = http("POST", t.url, t.body_file.read_bytes(), headers)
        try:
            values = answered_values(t.name, json.loads(raw))
        except (ValueError, KeyError, IndexError, TypeError):
            values = []
        if status != 200 or len(values) != 64:
            fail(t.server, f"gave a wrong answer to the benchmark request (HTTP {status})")


def answers_200(url: str) -> Callable[[], bool]:
    return lambda: http("GET", url)[0] == 200


def oip_body(work: Path) -> Path:
    """Bastion's request, an Open Inference Protocol v2 tensor of 64 FP32 values."""
    tensor = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": VECTOR}
    return write_body(work / "oip.json", {"inputs": [tensor]})


def measure_startup(fleet: Fleet, work: Path, runs: int) -> list[dict[str, Any]]:
    """`bastion serve --no-demo-models` to /readyz 200, on a fresh home, then again on it."""
    results = []
    for run in range(runs):
        home = work / f"startup-{run}"
        for start in ("fresh home", "restart"):
            port = free_port()
            serve = ["serve", "--home", str(home), "--port", str(port), "--no-demo-models"]
            name = f"bastion-startup-{run}-{start.split()[0]}"
            server = fleet.start(name, bastion(*serve), bastion_env())
            url = f"http://127.0.0.1:{port}/readyz"
            ready_s = wait_until(server, answers_200(url), 60)
            time.sleep(1)
            pids = server.tree()
            results.append(
                {
                    "start": start,
                    "run": run,
                    "ready_s": round(ready_s, 3),
                    "gateway_rss_mb": round(rss_mb(pids[0]), 1),
                    "processes": len(pids),
                }
            )
            fleet.stop(server)
    return results
