"""Helpers of the Redis tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis


def redis_now(client: redis.Redis) -> float:
    """Redis's clock, which the limiter's scripts use."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.05)
