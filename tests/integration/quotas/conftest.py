"""Fixtures of the Redis tests: a key prefix per test, a plain client, and Redis outages."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis

from services import RedisServer


@pytest.fixture
def prefix() -> str:
    """Key names of this test's own (the session shares one redis-server)."""
    return f"t{secrets.token_hex(4)}:"


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_server.url())
    yield connection
    connection.close()


@pytest.fixture
def outage(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The test stops Redis (redis_server.stop()); it is started again afterwards."""
    try:
        yield redis_server
    finally:
        if redis_server.proc is None:
            redis_server.start()
