"""Marks each test by its folder; the shared real server for e2e and security tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion_testing import BastionServer, add_echo_model, cli_json, run_cli
from services import PostgresServer, RedisServer

_KINDS = ("unit", "integration", "e2e", "security", "cluster")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        parts = Path(str(item.fspath)).relative_to(root).parts
        if parts and parts[0] in _KINDS:
            item.add_marker(getattr(pytest.mark, parts[0]))


DEMO_MODELS = ["digits", "minilm-l6", "tiny-chat"]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("e2e") / "home"
    run_cli(home, "init")
    add_echo_model(home)
    srv = BastionServer(home)
    try:
        srv.wait_ready([*DEMO_MODELS, "echo"])
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def tenant(server: BastionServer) -> str:
    cli_json(server.home, "tenants", "create", "acme")
    return "acme"


@pytest.fixture(scope="session")
def consumer_key(server: BastionServer, tenant: str) -> str:
    key: str = cli_json(server.home, "keys", "create", "--tenant", tenant)["key"]
    return key


@pytest.fixture()
def home(server: BastionServer) -> Path:
    return server.home


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the session (`postgres.new_database()` per test)."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the session."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()
