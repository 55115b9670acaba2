"""Quotas and metered usage on both backends; usage flushed by two gateway processes at
once adds up (never overwrites, never fails on a row the other just inserted), and a dead
gateway's journal is recovered once however many gateways start together."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from store_testing import run_processes, run_threads

from bastion.audit.events import MemoryEventSink
from bastion.identity.keys import KeyHasher
from bastion.identity.principal import OPERATOR
from bastion.identity.service import IdentityService
from bastion.quotas.journal import UsageJournal
from bastion.quotas.limiter import QuotaLimits
from bastion.quotas.store import DEFAULT_TENANT, KEY, TENANT, QuotaStore
from bastion.quotas.usage import UsageMeter, usage_report
from bastion.store.db import Database

# 2026-11-27 12:00:00 UTC
NOON = 1_795_780_800.0
HOURS = 100


def test_quotas_are_set_read_and_removed(open_database: Callable[[], Database]) -> None:
    cli, gateway = open_database(), open_database()
    identity = IdentityService(cli, KeyHasher(b"k" * 32), MemoryEventSink())
    identity.create_tenant(OPERATOR, "acme")
    key, _ = identity.create_key(OPERATOR, tenant="acme", role="consumer")
    store = QuotaStore(cli, MemoryEventSink())
    store.set(OPERATOR, TENANT, DEFAULT_TENANT, {"requests_per_minute": 60})
    store.set(OPERATOR, TENANT, "acme", {"tokens_per_day": 2**62, "weight": 2.5})
    store.set(OPERATOR, KEY, key.id, {"concurrent_requests": 3})
    # A single sign-on user's quota names its longest possible key id.
    sso = "jwt:" + "h" * 253 + ":" + "s" * 254
    store.set(OPERATOR, KEY, sso, {"requests_per_minute": 5})
    table = QuotaStore(gateway, MemoryEventSink()).table()
    assert table.tenant_limits("acme") == QuotaLimits(requests_per_minute=60, tokens_per_day=2**62)
    assert table.weight("acme") == 2.5
    assert table.key_limits(key.id) == QuotaLimits(concurrent_requests=3)
    assert table.key_limits(sso) == QuotaLimits(requests_per_minute=5)
    assert store.get(OPERATOR, KEY, sso).limits.requests_per_minute == 5
    store.remove(OPERATOR, KEY, key.id)
    store.set(OPERATOR, TENANT, "acme", {"tokens_per_day": None})
    table = QuotaStore(gateway, MemoryEventSink()).table()
    assert table.key_limits(key.id) is None
    assert table.tenant_limits("acme") == QuotaLimits(requests_per_minute=60)


# A gateway: every step records a request per tenant in the next hour of its clock and
# flushes it, so every flush inserts rows that the other gateway, started at the same
# moment, is inserting too.
GATEWAY = r"""
import sys, time
from bastion.quotas.usage import UsageMeter
from bastion.store.db import Database

index, url, noon, hours, start_at = sys.argv[1:]
clock = [float(noon)]
db = Database(url)
meter = UsageMeter(db, lambda: clock[0])
db.revision()  # connected before the start
time.sleep(max(0.0, float(start_at) - time.time()))
for hour in range(int(hours)):
    clock[0] = float(noon) + 3600 * hour
    for tenant in ("acme", "globex", "initech"):
        meter.record(tenant, "echo", requests=1, prompt_tokens=int(index) + 1,
                     compute_seconds=0.5)
    meter.flush()
print("done")
"""


def test_two_gateways_flushing_at_once_add_up(database: Database) -> None:
    start_at = time.time() + 2
    run_processes(GATEWAY, _url(database), str(NOON), str(HOURS), str(start_at))
    since = datetime.fromtimestamp(NOON, UTC)
    total = {row["tenant"]: row for row in usage_report(database, since=since)}
    assert set(total) == {"acme", "globex", "initech"}
    for row in total.values():
        assert row["requests"] == 2 * HOURS
        # Gateway 0 counts 1 token a request, gateway 1 counts 2.
        assert row["prompt_tokens"] == 3 * HOURS
        assert row["compute_seconds"] == HOURS
    hourly = usage_report(database, since=since, tenant="acme", group="hour")
    assert [r["requests"] for r in hourly] == [2] * HOURS


def test_a_dead_gateways_journal_is_recovered_once(
    open_database: Callable[[], Database], tmp_path: Path
) -> None:
    journals = tmp_path / "usage"
    dead = UsageJournal(journals)
    hour = int(NOON)
    for _ in range(10):
        dead.append(("acme", "echo", hour, 1, 0, 2, 3, 0.25))
    dead.rotate()
    dead.append(("acme", "echo", hour, 1, 0, 0, 0, 0.0))
    dead.close()
    gateways = [open_database() for _ in range(3)]
    meters = [UsageMeter(db, lambda: NOON, journal_dir=journals) for db in gateways]
    recovered: list[int] = []
    run_threads(*(lambda m=m: recovered.append(m.recover()) for m in meters))
    assert sum(recovered) == 11
    (row,) = usage_report(gateways[0], since=datetime.fromtimestamp(NOON, UTC))
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (11, 20, 30)
    assert not list(journals.glob("*.pending"))


def _url(db: Database) -> str:
    return db.engine.url.render_as_string(hide_password=False)
