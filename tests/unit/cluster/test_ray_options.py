"""A model's resource needs as Ray sees them, and the cluster settings' checks."""

from __future__ import annotations

import pytest

from bastion.cluster.ray import replica_resources, split_address
from bastion.config import parse_memory
from bastion.errors import ConfigurationError


def test_memory_sizes() -> None:
    assert parse_memory("512MiB") == 512 * 1024**2
    assert parse_memory("2GiB") == 2 * 1024**3
    assert parse_memory("1.5G") == 1_500_000_000
    assert parse_memory(4096) == 4096
    for bad in ("lots", "-1GiB", "2XB", True, "0"):
        with pytest.raises(ConfigurationError):
            parse_memory(bad)


def test_resources_from_options() -> None:
    assert replica_resources({}) == {"num_cpus": 1.0}
    assert replica_resources({"cpus": "0.5", "memory": "1GiB", "gpus": 1}) == {
        "num_cpus": 0.5,
        "memory": 1024**3,
        "num_gpus": 1.0,
    }
    for bad in ({"cpus": "many"}, {"cpus": -1}, {"gpus": "x"}):
        with pytest.raises(ConfigurationError):
            replica_resources(bad)


def test_addresses() -> None:
    assert split_address("10.0.0.1:7443", "X") == ("10.0.0.1", 7443)
    assert split_address("[fd00::1]:7443", "X") == ("fd00::1", 7443)
    for bad in ("10.0.0.1", "host:0", "host:99999", ":7443", "host:port"):
        with pytest.raises(ConfigurationError):
            split_address(bad, "X")
