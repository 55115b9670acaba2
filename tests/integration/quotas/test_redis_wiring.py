"""How the server builds what gateways share in Redis from its settings."""

from __future__ import annotations

import pytest

from bastion.config import Settings
from bastion.errors import ConfigurationError
from bastion.gateway.sealing import RedisReplayGuard, ReplayGuard
from bastion.observability.metrics import Metrics
from bastion.quotas.redis import RedisLimiter
from bastion.server import build_shared_state
from services import RedisServer


def _available(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("bastion_redis_available")


def test_without_a_url_everything_stays_in_the_process() -> None:
    limiter, sealing, closers = build_shared_state(Settings(), Metrics())
    assert limiter is None and closers == []
    assert isinstance(sealing.replays, ReplayGuard)


def test_with_a_url_the_limiter_and_replay_guard_share_one_client(
    redis_server: RedisServer,
) -> None:
    metrics = Metrics()
    settings = Settings(redis_url=redis_server.url(), redis_lease_ttl_s=5.0)
    limiter, sealing, closers = build_shared_state(settings, metrics)
    try:
        assert isinstance(limiter, RedisLimiter)
        assert isinstance(sealing.replays, RedisReplayGuard)
        assert _available(metrics) == 1.0
    finally:
        for close in closers:
            close()
    # The URL holds the password: the settings never show it.
    assert redis_server.password not in repr(settings)


def test_a_redis_down_at_start_is_an_outage_not_a_failure(redis_server: RedisServer) -> None:
    # A port nothing listens on (the session's server is not stopped for this).
    url = f"redis://:{redis_server.password}@127.0.0.1:1/0"
    metrics = Metrics()
    _, _, closers = build_shared_state(Settings(redis_url=url), metrics)
    try:
        assert _available(metrics) == 0.0
    finally:
        for close in closers:
            close()


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"redis_failure_policy": "maybe"}, "BASTION_REDIS_FAILURE_POLICY"),
        ({"redis_timeout_s": 0.0}, "BASTION_REDIS_TIMEOUT_S"),
        ({"redis_lease_ttl_s": -1.0}, "BASTION_REDIS_LEASE_TTL_S"),
        ({"redis_url": "http://:s3cret@example.org/"}, "BASTION_REDIS_URL"),
    ],
)
def test_bad_settings_stop_the_start(changes: dict[str, object], complaint: str) -> None:
    settings = Settings(redis_url="redis://:s3cret@127.0.0.1:1/0").with_changes(**changes)
    with pytest.raises(ConfigurationError) as caught:
        build_shared_state(settings, Metrics())
    assert complaint in caught.value.message
    assert "s3cret" not in caught.value.message
