"""Quotas in the database: set, inherit, clear, remove, who may, and what changes."""

from __future__ import annotations

import pytest

from bastion.audit.events import QUOTA_CHANGED, MemoryEventSink
from bastion.errors import InvalidRequest, NotFound, OutOfScope, PermissionDenied
from bastion.identity.keys import KeyHasher
from bastion.identity.principal import OPERATOR, Principal
from bastion.identity.service import IdentityService, KeyInfo
from bastion.quotas.limiter import QuotaLimits
from bastion.quotas.store import DEFAULT_TENANT, KEY, TENANT, QuotaStore
from bastion.store.db import Database


def _principal(info: KeyInfo) -> Principal:
    return Principal(
        key_id=info.id,
        tenant_id=info.tenant_id,
        tenant_name=info.tenant,
        role=info.role,
        models=info.models,
        actions=frozenset(info.actions),
    )


@pytest.fixture
def identity(db: Database, events: MemoryEventSink) -> IdentityService:
    service = IdentityService(db, KeyHasher(b"k" * 32), events)
    service.create_tenant(OPERATOR, "acme")
    service.create_tenant(OPERATOR, "globex")
    return service


@pytest.fixture
def store(db: Database, events: MemoryEventSink, identity: IdentityService) -> QuotaStore:
    return QuotaStore(db, events)


def test_set_keeps_other_values_and_none_clears(store: QuotaStore, db: Database) -> None:
    before = db.revision()
    store.set(OPERATOR, TENANT, "acme", {"requests_per_minute": 60, "tokens_per_minute": 1000})
    quota = store.set(OPERATOR, TENANT, "acme", {"tokens_per_minute": None, "weight": 2})
    assert quota.limits == QuotaLimits(requests_per_minute=60)
    assert quota.weight == 2.0
    assert store.get(OPERATOR, TENANT, "acme").limits == QuotaLimits(requests_per_minute=60)
    # Running gateways see the change through the revision.
    assert db.revision() == before + 2


def test_tenants_inherit_the_defaults_value_by_value(store: QuotaStore) -> None:
    store.set(OPERATOR, TENANT, DEFAULT_TENANT, {"requests_per_minute": 100, "weight": 0.5})
    store.set(OPERATOR, TENANT, DEFAULT_TENANT, {"concurrent_requests": 4})
    store.set(OPERATOR, TENANT, "acme", {"requests_per_minute": 10, "weight": 3})
    table = store.table()
    assert table.tenant_limits("acme") == QuotaLimits(requests_per_minute=10, concurrent_requests=4)
    assert table.tenant_limits("globex") == QuotaLimits(
        requests_per_minute=100, concurrent_requests=4
    )
    assert table.weight("acme") == 3.0 and table.weight("globex") == 0.5
    assert table.key_limits("anything") is None


def test_key_quotas(store: QuotaStore, identity: IdentityService) -> None:
    info, _ = identity.create_key(OPERATOR, tenant="acme", role="consumer")
    store.set(OPERATOR, KEY, info.id, {"tokens_per_day": 5000, "max_request_bytes": 1024})
    assert store.table().key_limits(info.id) == QuotaLimits(
        tokens_per_day=5000, max_request_bytes=1024
    )
    with pytest.raises(InvalidRequest, match="Only tenants"):
        store.set(OPERATOR, KEY, info.id, {"weight": 2})


def test_unknown_subjects_and_bad_values_are_refused(store: QuotaStore) -> None:
    with pytest.raises(NotFound):
        store.set(OPERATOR, TENANT, "nobody", {"requests_per_minute": 1})
    with pytest.raises(NotFound):
        store.set(OPERATOR, KEY, "bk_doesnotexist000000000", {"requests_per_minute": 1})
    for field, value in [
        ("requests_per_minute", -1),
        ("requests_per_minute", 1.5),
        ("tokens_per_minute", True),
        ("weight", 0),
        ("weight", float("inf")),
        ("weight", 5000),
    ]:
        with pytest.raises(InvalidRequest):
            store.set(OPERATOR, TENANT, "acme", {field: value})
    with pytest.raises(InvalidRequest, match="Unknown quota field"):
        store.set(OPERATOR, TENANT, "acme", {"bogus": 1})
    with pytest.raises(InvalidRequest):
        store.set(OPERATOR, "planet", "acme", {"requests_per_minute": 1})
    assert store.list(OPERATOR) == []


def test_remove(store: QuotaStore, events: MemoryEventSink) -> None:
    store.set(OPERATOR, TENANT, "acme", {"requests_per_minute": 5})
    store.remove(OPERATOR, TENANT, "acme")
    assert store.table().tenant_limits("acme") == QuotaLimits()
    with pytest.raises(NotFound):
        store.remove(OPERATOR, TENANT, "acme")
    changes = [e for e in events.events if e.kind == QUOTA_CHANGED]
    assert len(changes) == 2 and changes[0].tenant == "acme"
    assert changes[0].detail["requests_per_minute"] == 5 and changes[1].detail["removed"]


def test_only_admins_change_quotas_and_tenant_admins_read_their_own(
    store: QuotaStore, identity: IdentityService
) -> None:
    admin_info, _ = identity.create_key(OPERATOR, tenant="acme", role="tenant-admin")
    tenant_admin = _principal(admin_info)
    consumer = _principal(identity.create_key(OPERATOR, tenant="acme", role="consumer")[0])
    other_key, _ = identity.create_key(OPERATOR, tenant="globex", role="consumer")
    store.set(OPERATOR, TENANT, "acme", {"requests_per_minute": 5})
    store.set(OPERATOR, TENANT, "globex", {"requests_per_minute": 7})
    store.set(OPERATOR, KEY, other_key.id, {"requests_per_minute": 1})
    with pytest.raises(PermissionDenied):
        store.set(tenant_admin, TENANT, "acme", {"requests_per_minute": 500})
    with pytest.raises(PermissionDenied):
        store.remove(tenant_admin, TENANT, "acme")
    assert store.get(tenant_admin, TENANT, "acme").limits.requests_per_minute == 5
    # Another tenant's quotas look like those of a tenant or key that does not exist: the
    # same 404, a refusal to record either way (OutOfScope).
    for tenant in ("globex", "nobody"):
        with pytest.raises(OutOfScope, match="No tenant has this name"):
            store.get(tenant_admin, TENANT, tenant)
        with pytest.raises(OutOfScope, match="No tenant has this name"):
            store.list(tenant_admin, tenant)
    for key_id in (other_key.id, "0123456789abcdef"):
        with pytest.raises(OutOfScope, match="No API key has this id"):
            store.get(tenant_admin, KEY, key_id)
    with pytest.raises(NotFound) as missing:
        store.get(OPERATOR, TENANT, "nobody")
    assert type(missing.value) is NotFound
    with pytest.raises(PermissionDenied):
        store.get(tenant_admin, TENANT, "*")
    assert [q.subject for q in store.list(tenant_admin)] == ["acme"]
    with pytest.raises(PermissionDenied):
        store.get(consumer, TENANT, "acme")
    assert {q.subject for q in store.list(OPERATOR)} == {"acme", "globex", other_key.id}


def test_a_single_sign_on_users_quota_is_an_admins_alone(
    store: QuotaStore, identity: IdentityService
) -> None:
    user = "jwt:sso.example.com:alice"
    store.set(OPERATOR, KEY, user, {"requests_per_minute": 2})
    assert store.table().key_limits(user) == QuotaLimits(requests_per_minute=2)
    assert store.get(OPERATOR, KEY, user).limits.requests_per_minute == 2
    tenant_admin = _principal(identity.create_key(OPERATOR, tenant="acme", role="tenant-admin")[0])
    # No record says whose user it is: a tenant's admin neither reads nor lists it.
    with pytest.raises(NotFound, match="No API key has this id"):
        store.get(tenant_admin, KEY, user)
    assert user not in {q.subject for q in store.list(tenant_admin)}
    for bad in ("jwt:", "jwt:host:a\nb", "jwt:" + "x" * 600):
        with pytest.raises(NotFound):
            store.set(OPERATOR, KEY, bad, {"requests_per_minute": 1})
    store.remove(OPERATOR, KEY, user)
    assert store.table().key_limits(user) is None
