"""Real PostgreSQL and Redis servers for the tests: Debian's binaries (installed by `make
cluster-deps`), each started in a private temporary folder on a free port, and stopped,
restarted or killed by the tests themselves. Nothing is shared with a system service.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
_START_TIMEOUT_S = 30.0


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} at start")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {_START_TIMEOUT_S} s")


def postgres_available() -> bool:
    return (PG_BIN / "postgres").exists()


def redis_available() -> bool:
    return Path(REDIS_SERVER).exists()


class PostgresServer:
    """A private PostgreSQL cluster: `initdb` into a temporary folder, `postgres` on a free
    port, password authentication (SCRAM) over TCP. Run as the `postgres` user when the tests
    run as root (PostgreSQL refuses root)."""

    def __init__(
        self, *, listen: tuple[str, ...] = ("127.0.0.1",), allow: tuple[str, ...] = ()
    ) -> None:
        """`allow`: networks (CIDR) beyond loopback whose clients may log in, with the
        same password authentication."""
        if not postgres_available():
            raise RuntimeError("PostgreSQL 15 is not installed: run `make cluster-deps`")
        self.host = listen[0]
        self.listen = listen
        self.port = _free_port(self.host)
        self.user = "bastion"
        self.password = secrets.token_urlsafe(16)
        self.dir = Path(tempfile.mkdtemp(prefix="bastion-pg-"))
        self.data = self.dir / "data"
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._run_as = pwd.getpwnam("postgres")
            os.chown(self.dir, self._run_as.pw_uid, self._run_as.pw_gid)
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self._run_as is not None:
            os.chown(pwfile, self._run_as.pw_uid, self._run_as.pw_gid)
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        pwfile.unlink()
        if allow:
            with (self.data / "pg_hba.conf").open("a") as handle:
                handle.writelines(f"host all all {cidr} scram-sha-256\n" for cidr in allow)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        self._databases = 0

    def _preexec(self) -> None:
        if self._run_as is not None:
            os.setgid(self._run_as.pw_gid)
            os.setgroups([])
            os.setuid(self._run_as.pw_uid)

    def _run(self, *args: str) -> None:
        subprocess.run(
            args,
            check=True,
            capture_output=True,
            preexec_fn=self._preexec,
            cwd=self.dir,
            timeout=120,
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={','.join(self.listen)}",
                "-c",
                f"unix_socket_directories={self.dir}",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=300",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "log").open("ab"),
            preexec_fn=self._preexec,
            cwd=self.dir,
        )
        _wait_port(self.host, self.port, self.proc, "postgres")
        # The port answers before the server accepts logins; wait for a real one.
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                self.execute("SELECT 1")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGQUIT: immediate shutdown (what a crash looks like to clients); SIGINT: fast.
        proc.send_signal(signal.SIGQUIT if kill else signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres", *, host: str | None = None) -> str:
        return (
            f"postgresql+psycopg://{self.user}:{self.password}@{host or self.host}:"
            f"{self.port}/{database}"
        )

    def execute(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            autocommit=True,
            connect_timeout=5,
        ) as conn:
            conn.execute(sql)

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; its URL."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}_{secrets.token_hex(3)}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class RedisServer:
    """A private redis-server: no persistence, a password, a free port."""

    def __init__(self, *, listen: tuple[str, ...] = ("127.0.0.1",)) -> None:
        if not redis_available():
            raise RuntimeError("redis-server is not installed: run `make cluster-deps`")
        self.host = listen[0]
        self.listen = listen
        self.port = _free_port(self.host)
        self.password = secrets.token_urlsafe(16)
        self.dir = Path(tempfile.mkdtemp(prefix="bastion-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        config = self.dir / "redis.conf"
        config.write_text(
            f'port {self.port}\nbind {" ".join(self.listen)}\nsave ""\nappendonly no\n'
            f"dir {self.dir}\nrequirepass {self.password}\nprotected-mode yes\n"
        )
        config.chmod(0o600)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, str(config)],
            stdout=(self.dir / "log").open("ab"),
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        _wait_port(self.host, self.port, self.proc, "redis-server")

    def stop(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        proc.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, db: int = 0, *, host: str | None = None) -> str:
        return f"redis://:{self.password}@{host or self.host}:{self.port}/{db}"

    def flush(self) -> None:
        import redis

        client = redis.Redis(host=self.host, port=self.port, password=self.password)
        try:
            client.flushall()
        finally:
            client.close()
