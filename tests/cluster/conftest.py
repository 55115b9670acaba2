"""Fixtures of the cluster tests: one cluster for the session (clusterlib.py), brought
back to health before each test, and the order that makes that cheap."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterlib import (
    WORKER_PORT,
    Cluster,
    Gateway,
    Network,
    RayCluster,
    require_root_and_ip,
)

from bastion_testing import add_echo_model, run_cli, run_threads
from services import PostgresServer, RedisServer


@pytest.fixture(scope="session")
def network() -> Iterator[Network]:
    require_root_and_ip()
    net = Network(["a", "b", "c"])
    try:
        net.create()
        yield net
    finally:
        net.destroy()


@pytest.fixture(scope="session")
def cluster(network: Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """PostgreSQL and Redis in the root namespace, a Ray cluster on hosts a, b and c, and
    two gateways (on a and b) sharing the database, Redis and master key, both serving
    the echo model from replicas on the Ray nodes. `echo2` is registered, unloaded."""
    workdir = tmp_path_factory.mktemp("cluster")
    with contextlib.ExitStack() as stack:
        listen = ("127.0.0.1", network.address)
        postgres = PostgresServer(listen=listen, allow=(network.cidr,))
        stack.callback(postgres.close)
        redis = RedisServer(listen=listen)
        stack.callback(redis.close)
        ray = RayCluster(network["a"], {"b": network["b"], "c": network["c"]}, workdir)
        stack.callback(ray.close)
        # The head starts while the home is made (a CPU-bound, one-core job each).
        ray.head.start()

        local_url = postgres.new_database("cluster")
        database = local_url.rsplit("/", 1)[1]
        cli_env = {"BASTION_DATABASE_URL": local_url, "BASTION_DEMO_MODELS": "false"}
        home1 = workdir / "gw1" / "home"
        home2 = workdir / "gw2" / "home"
        run_cli(home1, "init", "--cluster", "--no-demo-models", env=cli_env)
        add_echo_model(home1, "echo", env=cli_env)
        add_echo_model(home1, "echo2", "--unloaded", env=cli_env)
        # The second gateway's home: the same master key (and, for the tests' clients,
        # the same admin key: it lives in the shared database).
        home2.mkdir(mode=0o700, parents=True)
        for secret in ("master.key", "admin.key"):
            shutil.copyfile(home1 / secret, home2 / secret)
            (home2 / secret).chmod(0o600)

        ray.start_workers()
        common = {
            **ray.auth_env,
            "BASTION_DATABASE_URL": postgres.url(database, host=network.address),
            "BASTION_REDIS_URL": redis.url(0, host=network.address),
            "BASTION_CLUSTER": ray.address,
            "BASTION_DEMO_MODELS": "false",
            "BASTION_USAGE_FLUSH_INTERVAL_S": "0.5",
            # The periodic re-read of the database is only a fallback: a change made
            # through one gateway reaches the other by PostgreSQL's NOTIFY, in time for
            # the tests' 2 s, or not at all.
            "BASTION_REFRESH_INTERVAL_S": "30",
            # A killed gateway's concurrency slots come back after this.
            "BASTION_REDIS_LEASE_TTL_S": "3",
            "BASTION_RESTART_BACKOFF_MAX_S": "3",
        }
        gateways: list[Gateway] = []
        for name, host, home in (("gw1", network["a"], home1), ("gw2", network["b"], home2)):
            env = {**common, "BASTION_WORKER_LISTEN": f"{host.address}:{WORKER_PORT}"}
            gateway = Gateway(name, host, home, env)
            gateways.append(gateway)
            stack.callback(gateway.close)
        found = Cluster(
            network=network,
            postgres=postgres,
            redis=redis,
            database=database,
            ray=ray,
            gateways=gateways,
            workdir=workdir,
            cli_env=cli_env,
        )
        run_threads(*(gateway.start_ready for gateway in gateways))
        yield found


@pytest.fixture()
def healthy(cluster: Cluster) -> Cluster:
    """The cluster, with whatever an earlier test killed back up."""
    cluster.ensure_healthy()
    return cluster


# The cluster tests share one cluster: those that kill parts of it run last, so that what
# they kill is brought back (ensure_healthy) only if another test follows.
_ORDER = ("test_gateways.py", "test_intruders.py", "test_failures.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if Path(str(item.fspath)).parent == here]

    def rank(item: pytest.Item) -> int:
        name = Path(str(item.fspath)).name
        return _ORDER.index(name) if name in _ORDER else len(_ORDER)

    ordered = sorted((items[i] for i in slots), key=rank)  # stable: keeps each file's order
    for slot, item in zip(slots, ordered, strict=True):
        items[slot] = item
