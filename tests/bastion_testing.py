"""Running a real `bastion serve` on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import email.utils
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bastion.crypto import ohttp
from bastion.wire import bhttp

BASTION = [sys.executable, "-m", "bastion"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_cli(
    home: Path,
    *args: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `bastion <args> --home <home>` (with `input` on its stdin) and return the
    finished process."""
    proc = subprocess.run(
        [*BASTION, *args, "--home", str(home)],
        input=input,
        capture_output=True,
        text=True,
        timeout=300,
        # Wide enough that tables are not wrapped.
        env=clean_env(COLUMNS="200", **(env or {})),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"bastion {' '.join(args)} failed: {proc.stderr}")
    return proc


def batched_requests(server: BastionServer, model: str) -> tuple[float, float]:
    """(requests that ran with others, all requests) of `model`, from its worker's reports
    in `bastion_batch_size` (/metrics)."""
    with server.client() as admin:
        text = admin.get("/metrics").text
    name = re.escape(model)

    def total(pattern: str) -> float:
        return sum(map(float, re.findall(pattern, text, re.MULTILINE)))

    count = total(rf'^bastion_batch_size_count\{{model="{name}"\}} (\S+)$')
    alone = total(rf'^bastion_batch_size_bucket\{{le="1\.0",model="{name}"\}} (\S+)$')
    return count - alone, count


def digits_model(base: Path) -> Path:
    """The `digits` demo recipe in base/digits, with what real digits look like stored
    beside it by `bastion protect reference` (for the extraction monitor)."""
    from bastion.models.demo import digits_onnx, digits_split

    model = base / "digits"
    model.mkdir()
    (model / "model.onnx").write_bytes(digits_onnx())
    samples = base / "digits-samples.npy"
    np.save(samples, digits_split()[0])
    proc = subprocess.run(
        [*BASTION, "protect", "reference", str(model), str(samples)],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return model


def empty_model_dir(home: Path) -> Path:
    """An empty, world-readable directory beside `home`, for runtimes that read no files
    (a root gateway's workers run as users of their own, who may not read the home)."""
    path = home.parent / "empty-model"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def add_echo_model(
    home: Path,
    name: str = "echo",
    *extra: str,
    options: tuple[str, ...] = ("test_hooks=true",),
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Register the test echo runtime (by default with its misbehaviour hooks on), with
    more `options` and `extra` arguments of `bastion models add` if given."""
    flags = [arg for option in options for arg in ("--option", option)]
    return run_cli(
        home,
        "models",
        "add",
        name,
        "--runtime",
        "echo",
        "--path",
        str(empty_model_dir(home)),
        *flags,
        *extra,
        env=env,
        check=check,
    )


# The hostile runtime of the escape tests (tests/hostile_runtime.py), which Bastion does not
# ship: registered for the CLI and the server through the operator's extra runtimes.
HOSTILE_RUNTIME_ENV = {
    "BASTION_EXTRA_RUNTIMES": "escape-test=hostile_runtime",
    "PYTHONPATH": str(Path(__file__).parent),
}


def cli_json(home: Path, *args: str) -> Any:
    return json.loads(run_cli(home, *args, "--json").stdout)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        BASTION_REFRESH_INTERVAL_S="0.5",
        BASTION_HEARTBEAT_INTERVAL_S="0.5",
        # Every test client shares 127.0.0.1: the suite's deliberate failures would lock it
        # out. tests/e2e/test_auth_throttling.py turns the throttle on for its servers.
        BASTION_AUTH_THROTTLE_FAILURES="0",
    )
    env.update(extra)
    return env


class BastionServer:
    """A `bastion serve` subprocess with its own home directory and log files."""

    def __init__(
        self,
        home: Path,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        tls_ca: Path | None = None,
        admin_listen: bool = False,
        client_cert: tuple[Path, Path] | None = None,
        port: int | None = None,
    ) -> None:
        """Serve `home` (on `port`, or a free one); with `cwd`, start there and name the
        home relative to it.

        With `tls_ca` the server is reached over https, trusted as issued by that CA file
        (the TLS flags themselves are among `args`). With `admin_listen` the admin API has
        a loopback port of its own (`admin_url`), reached with `client_cert` (certificate,
        key) if given; `admin_client` and `wait_model` use it."""
        self.home = home
        self.port = port or free_port()
        self.tls_ca = tls_ca
        self.client_cert = client_cert
        scheme = "https" if tls_ca is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.admin_url = self.url
        if admin_listen:
            admin_port = free_port()
            self.admin_url = f"{scheme}://127.0.0.1:{admin_port}"
            args = (*args, "--admin-listen", f"127.0.0.1:{admin_port}")
        home.mkdir(parents=True, exist_ok=True)
        self.stdout_path = home.parent / f"{home.name}-stdout.log"
        self.stderr_path = home.parent / f"{home.name}-stderr.log"
        self._stdout = open(self.stdout_path, "ab")  # noqa: SIM115
        self._stderr = open(self.stderr_path, "ab")  # noqa: SIM115
        home_arg = str(home.relative_to(cwd)) if cwd is not None else str(home)
        self.proc = subprocess.Popen(
            [*BASTION, "serve", "--home", home_arg, "--port", str(self.port), *args],
            cwd=cwd,
            stdout=self._stdout,
            stderr=self._stderr,
            env=clean_env(**(env or {})),
        )

    @property
    def admin_key(self) -> str:
        return (self.home / "admin.key").read_text().strip()

    def verify(self, *, admin: bool = False) -> ssl.SSLContext | bool:
        """What an httpx client needs to trust the server (and, for the admin listener,
        to show the client certificate)."""
        if self.tls_ca is None:
            return True
        context = ssl.create_default_context(cafile=str(self.tls_ca))
        if admin and self.client_cert is not None:
            context.load_cert_chain(*self.client_cert)
        return context

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {key or self.admin_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, verify=self.verify())

    def admin_client(self, key: str | None = None) -> httpx.Client:
        """A client of the admin API (the public listener unless it has its own)."""
        headers = {"authorization": f"Bearer {key or self.admin_key}"}
        return httpx.Client(
            base_url=self.admin_url, headers=headers, timeout=60, verify=self.verify(admin=True)
        )

    def wait_ready(self, models: list[str] | None = None, timeout: float = 240) -> None:
        """Wait for /readyz, then for the named models to be ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.stderr_path.read_text()[-3000:]}")
            try:
                ready = httpx.get(self.url + "/readyz", timeout=2, verify=self.verify())
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("server not ready in time")
        for name in models or []:
            self.wait_model(name, "ready", deadline - time.monotonic())

    def wait_model(self, name: str, state: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        view: dict[str, Any] = {}
        with self.admin_client() as client:
            while time.monotonic() < deadline:
                response = client.get(f"/admin/v1/models/{name}")
                if response.status_code == 200:
                    view = response.json()
                    if view["state"] == state:
                        return view
                    if view["state"] == "failed":
                        raise AssertionError(f"model {name} failed: {view['detail']}")
                time.sleep(0.2)
        raise AssertionError(f"model {name} not {state} in time: {view}")

    def tokens(self, model: str, kind: str) -> float:
        """`bastion_tokens_total` for `model` and `kind` (prompt|completion), all tenants."""
        with self.client() as client:
            metrics = client.get("/metrics").text
        pattern = (
            rf'^bastion_tokens_total\{{kind="{kind}",model="{re.escape(model)}",[^}}]*\}} (\S+)$'
        )
        return sum(float(value) for value in re.findall(pattern, metrics, re.MULTILINE))

    def wait_tokens(self, model: str, kind: str, expected: float, timeout: float = 10) -> float:
        """Wait until the token counter reaches `expected` (usage is settled when the
        worker's final report arrives, which may be after the client has its answer)."""
        deadline = time.monotonic() + timeout
        while (seen := self.tokens(model, kind)) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return seen

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stdout.close()
        self._stderr.close()
        return self.proc.returncode

    def logs(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )


def worker_pids(*roots: int) -> list[int]:
    """Host pids of the worker processes (python -m bastion.worker.main, not the sandbox
    launcher whose command line holds theirs) that descend from any of `roots`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"bastion.worker.main" not in argv or b"python" not in argv[0].rsplit(b"/", 1)[-1]:
            continue
        pid = int(cmdline.parent.name)
        if set(roots) & set(ancestors(pid)):
            found.append(pid)
    return sorted(found)


def ancestors(pid: int) -> list[int]:
    """The parent, grandparent ... of `pid` (from /proc), up to init."""
    chain = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


def ohttp_fingerprints(home: Path) -> list[str]:
    """Fingerprints of the OHTTP keys a home accepts (current first)."""
    return [key["fingerprint"] for key in cli_json(home, "ohttp", "keys")]


class RecordingTransport(httpx.HTTPTransport):
    """An HTTP transport that keeps every byte it sends and receives: the wire."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.received: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(
            b"".join(f"{k}: {v}\n".encode() for k, v in request.headers.items()) + request.read()
        )
        response = super().handle_request(request)
        body = response.read()
        self.received.append(
            f"status: {response.status_code}\n".encode()
            + b"".join(f"{k}: {v}\n".encode() for k, v in response.headers.items())
            + body
        )
        return httpx.Response(
            response.status_code,
            headers=[(k, v) for k, v in response.headers.multi_items() if k != "content-length"],
            content=body,
            request=request,
        )

    def wire(self) -> bytes:
        return b"".join(self.sent + self.received)


def ohttp_config(server: BastionServer) -> ohttp.KeyConfig:
    """The OHTTP key configuration the server publishes."""
    return ohttp.decode_key_configs(httpx.get(f"{server.url}/.well-known/ohttp-gateway").content)[0]


def seal_request(
    config: ohttp.KeyConfig,
    body: dict[str, object],
    *,
    path: str = "/v1/chat/completions",
    date: float | None = None,
    dated: bool = True,
    date_text: str | None = None,
    raw: bytes | None = None,
) -> tuple[bytes, ohttp.ClientResponseContext]:
    """An encapsulated JSON request, built by hand (with a Date unless `dated` is False;
    `date_text` replaces the Date's value, `raw` the JSON body)."""
    headers = [("content-type", "application/json")]
    if dated:
        when = date_text or email.utils.formatdate(date or time.time(), usegmt=True)
        headers.append(("date", when))
    inner = bhttp.encode_request(
        bhttp.Request(
            method="POST",
            scheme="https",
            authority="bastion",
            path=path,
            headers=tuple(headers),
            content=json.dumps(body).encode() if raw is None else raw,
        )
    )
    return ohttp.encapsulate_request(config, inner)


def post_sealed(
    server: BastionServer, key: str, data: bytes, model: str = "echo"
) -> httpx.Response:
    """POST an encapsulated request to /v1/ohttp."""
    return httpx.post(
        f"{server.url}/v1/ohttp",
        content=data,
        headers={
            "authorization": f"Bearer {key}",
            "bastion-model": model,
            "content-type": ohttp.REQUEST_MEDIA_TYPE,
        },
        timeout=60,
    )


def run_threads(*targets: Callable[[], None]) -> None:
    """Run each target in a thread of its own, started together; re-raise the first
    exception any of them raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def run(target: Callable[[], None]) -> None:
        try:
            start.wait(timeout=30)
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    if errors:
        raise errors[0]
