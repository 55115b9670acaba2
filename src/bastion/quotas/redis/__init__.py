"""Quotas and replay protection that several gateways share, kept in Redis
(``BASTION_REDIS_URL``; docs/scaling.md): the link and its failure policy, and the limiter.
"""

from bastion.quotas.redis.limiter import RedisLimiter
from bastion.quotas.redis.link import FAIL_CLOSED, FAIL_OPEN, POLICIES, RedisLink

__all__ = ["FAIL_CLOSED", "FAIL_OPEN", "POLICIES", "RedisLimiter", "RedisLink"]
