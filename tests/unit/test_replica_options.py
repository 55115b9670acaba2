"""The model options that say how a model's replicas run (bastion.config): how many, and
what each needs of a cluster node."""

from __future__ import annotations

import pytest

from bastion.config import MAX_REPLICAS, check_replica_options, parse_memory, replica_count
from bastion.errors import ConfigurationError


def test_replica_counts() -> None:
    assert replica_count({}) == 1
    assert replica_count({"replicas": None}) == 1
    assert replica_count({"replicas": 3}) == 3
    assert replica_count({"replicas": MAX_REPLICAS}) == MAX_REPLICAS
    for bad in (0, -1, MAX_REPLICAS + 1, True, 2.0, "2", [2]):
        with pytest.raises(ConfigurationError, match="replicas option"):
            replica_count({"replicas": bad})


def test_memory_sizes() -> None:
    assert parse_memory("512MiB") == 512 * 1024**2
    assert parse_memory("2GiB") == 2 * 1024**3
    assert parse_memory(" 2 gib ") == 2 * 1024**3
    assert parse_memory("1.5G") == 1_500_000_000
    assert parse_memory(".5k") == 500
    assert parse_memory("4096") == 4096
    assert parse_memory(4096) == 4096
    assert parse_memory(1e9) == 1_000_000_000
    for bad in ("lots", "-1GiB", "2XB", True, "0", 0, -5, 0.5, "1.2.3", float("inf"), "", None):
        with pytest.raises(ConfigurationError, match="memory option"):
            parse_memory(bad)


def test_resource_options() -> None:
    check_replica_options({})
    check_replica_options({"replicas": 2, "cpus": "0.5", "gpus": 0, "memory": "1GiB"})
    check_replica_options({"cpus": 2, "gpus": 1.5})
    for name, bad in (
        ("cpus", -1),
        ("cpus", "many"),
        ("cpus", True),
        ("cpus", None),
        ("gpus", "nan"),
        ("gpus", float("inf")),
        ("gpus", [1]),
    ):
        with pytest.raises(ConfigurationError, match=f"{name} option"):
            check_replica_options({name: bad})
    with pytest.raises(ConfigurationError, match="memory option"):
        check_replica_options({"memory": "2 lots"})
    with pytest.raises(ConfigurationError, match="replicas option"):
        check_replica_options({"replicas": 0, "cpus": 1})
