"""The identity service: tenants, keys, role rules, events and revision bumps."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pytest
import sqlalchemy as sa

from bastion.audit.events import (
    KEY_CREATED,
    KEY_REVOKED,
    KEY_ROTATED,
    TENANT_CREATED,
    TENANT_DISABLED,
    MemoryEventSink,
)
from bastion.errors import Conflict, InvalidRequest, NotFound, OutOfScope, PermissionDenied
from bastion.identity.keys import KeyHasher, parse_api_key
from bastion.identity.principal import OPERATOR, Principal
from bastion.identity.service import IdentityService, KeyInfo
from bastion.store.db import Database
from bastion.store.tables import api_keys


class FakeClock(Protocol):
    """The conftest's settable clock."""

    now: float


pytestmark = pytest.mark.unit


def _as_principal(info: KeyInfo) -> Principal:
    """The principal the gateway would build for this key."""
    return Principal(
        key_id=info.id,
        tenant_id=info.tenant_id,
        tenant_name=info.tenant,
        role=info.role,
        models=info.models,
        actions=frozenset(info.actions),
        expires_at=info.expires_at,
    )


def _key(service: IdentityService, tenant: str, role: str = "consumer", **kw: object) -> Principal:
    info, _ = service.create_key(OPERATOR, tenant=tenant, role=role, **kw)  # type: ignore[arg-type]
    return _as_principal(info)


# ---------------------------------------------------------------- tenants


def test_create_list_get_and_disable_tenants(
    service: IdentityService, events: MemoryEventSink, db: Database
) -> None:
    acme = service.create_tenant(OPERATOR, "acme")
    assert acme.name == "acme" and not acme.disabled
    assert db.revision() == 1
    service.create_tenant(OPERATOR, "globex")
    assert [t.name for t in service.list_tenants(OPERATOR)] == ["acme", "globex"]
    assert service.get_tenant(OPERATOR, "acme") == acme
    disabled = service.disable_tenant(OPERATOR, "acme")
    assert disabled.disabled and disabled.disabled_at is not None
    assert service.get_tenant(OPERATOR, "acme").disabled
    assert db.revision() == 3
    assert events.kinds() == [TENANT_CREATED, TENANT_CREATED, TENANT_DISABLED]
    assert all(e.actor == "local-operator" for e in events.events)
    json.dumps(disabled.to_dict())
    assert disabled.to_dict()["disabled_at"].endswith("Z")


@pytest.mark.parametrize("name", ["", "Acme", "-acme", "a" * 64, "ac me", "acme!", "é"])
def test_invalid_tenant_names(service: IdentityService, name: str) -> None:
    with pytest.raises(InvalidRequest):
        service.create_tenant(OPERATOR, name)


def test_duplicate_unknown_and_repeated_disable(service: IdentityService, db: Database) -> None:
    service.create_tenant(OPERATOR, "acme")
    with pytest.raises(Conflict):
        service.create_tenant(OPERATOR, "acme")
    with pytest.raises(NotFound):
        service.get_tenant(OPERATOR, "nobody")
    with pytest.raises(NotFound):
        service.disable_tenant(OPERATOR, "nobody")
    service.disable_tenant(OPERATOR, "acme")
    with pytest.raises(Conflict):
        service.disable_tenant(OPERATOR, "acme")
    # Failed changes do not bump the revision.
    assert db.revision() == 2


def test_the_system_tenant_cannot_be_disabled(service: IdentityService) -> None:
    service.bootstrap_admin()
    with pytest.raises(Conflict):
        service.disable_tenant(OPERATOR, "system")


# ---------------------------------------------------------------- keys


def test_create_key_defaults_and_stores_only_a_digest(
    service: IdentityService, hasher: KeyHasher, db: Database, events: MemoryEventSink
) -> None:
    service.create_tenant(OPERATOR, "acme")
    info, token = service.create_key(OPERATOR, tenant="acme", role="consumer", name="ci")
    public_id, secret = parse_api_key(token)
    assert info.id == public_id
    assert info.models == ("*",)
    assert set(info.actions) == {"chat", "completions", "embeddings", "infer", "models"}
    assert info.name == "ci" and info.tenant == "acme" and info.revoked_at is None
    with db.read() as conn:
        row = conn.execute(sa.select(api_keys).where(api_keys.c.id == public_id)).mappings().one()
    hasher.verify(public_id, secret, row["digest"])
    assert secret.encode() not in row["digest"]
    assert secret not in json.dumps([str(v) for v in row.values()])
    created = events.events[-1]
    assert created.kind == KEY_CREATED and created.target == public_id
    assert secret not in repr(events.events)


def test_key_listings_never_hold_secrets_or_digests(service: IdentityService) -> None:
    service.create_tenant(OPERATOR, "acme")
    _, token = service.create_key(OPERATOR, tenant="acme", role="consumer")
    _, secret = parse_api_key(token)
    (listed,) = service.list_keys(OPERATOR, "acme")
    data = listed.to_dict()
    assert "digest" not in data and "key" not in data and "secret" not in data
    assert secret not in json.dumps(data)
    assert set(data) == {
        "id",
        "tenant",
        "name",
        "role",
        "models",
        "actions",
        "created_at",
        "expires_at",
        "revoked_at",
        "rotated_from",
    }


def test_create_key_validation(service: IdentityService) -> None:
    service.create_tenant(OPERATOR, "acme")
    bad_calls: list[dict[str, object]] = [
        {"role": "root"},
        {"role": "consumer", "actions": ["chat", "teleport"]},
        {"role": "consumer", "actions": ["admin"]},
        {"role": "consumer", "models": []},
        {"role": "consumer", "models": ["bad name"]},
        {"role": "consumer", "expires_at": datetime(2099, 1, 1)},  # naive
        {"role": "consumer", "name": "x" * 129},
        {"role": "consumer", "name": "line\nbreak"},
    ]
    for call in bad_calls:
        with pytest.raises(InvalidRequest):
            service.create_key(OPERATOR, tenant="acme", **call)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        service.create_key(OPERATOR, tenant="nobody", role="consumer")


def test_disabled_tenant_gets_no_keys(service: IdentityService) -> None:
    service.create_tenant(OPERATOR, "acme")
    service.disable_tenant(OPERATOR, "acme")
    with pytest.raises(Conflict):
        service.create_key(OPERATOR, tenant="acme", role="consumer")


def test_revoke_key(service: IdentityService, events: MemoryEventSink, db: Database) -> None:
    service.create_tenant(OPERATOR, "acme")
    info, _ = service.create_key(OPERATOR, tenant="acme", role="consumer")
    before = db.revision()
    revoked = service.revoke_key(OPERATOR, info.id)
    assert revoked.revoked_at is not None
    assert db.revision() == before + 1
    assert service.list_keys(OPERATOR, "acme")[0].revoked_at is not None
    assert events.events[-1].kind == KEY_REVOKED and events.events[-1].target == info.id
    with pytest.raises(Conflict):
        service.revoke_key(OPERATOR, info.id)
    with pytest.raises(NotFound):
        service.revoke_key(OPERATOR, "0000000000000000")
    with pytest.raises(NotFound):
        service.revoke_key(OPERATOR, "not-an-id")


def test_rotate_key_keeps_rights_and_revokes_the_old_one(
    service: IdentityService, events: MemoryEventSink, clock: FakeClock
) -> None:
    service.create_tenant(OPERATOR, "acme")
    expiry = datetime.fromtimestamp(clock.now + 3600, UTC)
    old, old_token = service.create_key(
        OPERATOR,
        tenant="acme",
        role="consumer",
        models=["tiny-*"],
        actions=["chat"],
        expires_at=expiry,
        name="app",
    )
    new, token = service.rotate_key(OPERATOR, old.id)
    assert token != old_token and new.id != old.id
    assert (new.tenant, new.role, new.models, new.actions, new.expires_at, new.name) == (
        "acme",
        "consumer",
        ("tiny-*",),
        ("chat",),
        expiry,
        "app",
    )
    assert new.rotated_from == old.id
    by_id = {k.id: k for k in service.list_keys(OPERATOR, "acme")}
    assert by_id[old.id].revoked_at is not None
    assert by_id[new.id].revoked_at is None
    assert events.events[-1].kind == KEY_ROTATED
    assert events.events[-1].detail["rotated_from"] == old.id
    with pytest.raises(Conflict):
        service.rotate_key(OPERATOR, old.id)


def test_expired_keys_cannot_be_rotated(service: IdentityService, clock: FakeClock) -> None:
    service.create_tenant(OPERATOR, "acme")
    info, _ = service.create_key(
        OPERATOR,
        tenant="acme",
        role="consumer",
        expires_at=datetime.fromtimestamp(clock.now + 10, UTC),
    )
    clock.now += 11
    with pytest.raises(Conflict):
        service.rotate_key(OPERATOR, info.id)


def test_bootstrap_admin_runs_once(
    service: IdentityService, hasher: KeyHasher, db: Database
) -> None:
    token = service.bootstrap_admin()
    assert token is not None
    public_id, _ = parse_api_key(token)
    (info,) = service.list_keys(OPERATOR, "system")
    assert info.id == public_id and info.role == "admin" and info.name == "bootstrap-admin"
    assert "metrics" in info.actions and "admin" in info.actions
    assert service.bootstrap_admin() is None
    service.revoke_key(OPERATOR, public_id)
    # A revoked admin key is not replaced by restarting.
    assert service.bootstrap_admin() is None
    # A second service on the same file (another process) agrees.
    other = IdentityService(db, hasher, MemoryEventSink())
    assert other.bootstrap_admin() is None


# ---------------------------------------------------------------- role rules


@pytest.fixture
def two_tenants(service: IdentityService) -> tuple[Principal, Principal]:
    """A tenant-admin of acme and a consumer of acme; globex exists too."""
    service.create_tenant(OPERATOR, "acme")
    service.create_tenant(OPERATOR, "globex")
    return _key(service, "acme", "tenant-admin"), _key(service, "acme", "consumer")


def test_tenant_admin_manages_only_its_own_tenant(
    service: IdentityService, two_tenants: tuple[Principal, Principal]
) -> None:
    tenant_admin, _ = two_tenants
    info, _ = service.create_key(tenant_admin, tenant="acme", role="consumer")
    assert info.tenant == "acme"
    assert [t.name for t in service.list_tenants(tenant_admin)] == ["acme"]
    assert {k.tenant for k in service.list_keys(tenant_admin, None)} == {"acme"}
    service.revoke_key(tenant_admin, info.id)

    globex_key = _key(service, "globex")
    # Another tenant, and its keys, look exactly like ones that do not exist: 404 with
    # the same message, so a tenant-admin cannot probe names or key ids.
    for tenant in ("globex", "nobody"):
        with pytest.raises(NotFound, match="No tenant has this name"):
            service.create_key(tenant_admin, tenant=tenant, role="consumer")
        with pytest.raises(NotFound, match="No tenant has this name"):
            service.list_keys(tenant_admin, tenant)
        with pytest.raises(NotFound, match="No tenant has this name"):
            service.get_tenant(tenant_admin, tenant)
    for key_id in (globex_key.key_id, "0123456789abcdef"):
        with pytest.raises(NotFound, match="No API key has this id"):
            service.revoke_key(tenant_admin, key_id)
        with pytest.raises(NotFound, match="No API key has this id"):
            service.rotate_key(tenant_admin, key_id)
        with pytest.raises(NotFound, match="No API key has this id") as refused:
            service.get_key(tenant_admin, key_id)
        # A refusal the API records (auth.denied), the same for both: OutOfScope.
        assert type(refused.value) is OutOfScope
    with pytest.raises(PermissionDenied):
        service.create_tenant(tenant_admin, "mine")
    with pytest.raises(PermissionDenied):
        service.disable_tenant(tenant_admin, "globex")


def test_tenant_admin_cannot_create_or_touch_admin_keys(
    service: IdentityService, two_tenants: tuple[Principal, Principal]
) -> None:
    tenant_admin, _ = two_tenants
    with pytest.raises(PermissionDenied):
        service.create_key(tenant_admin, tenant="acme", role="admin")
    admin_in_acme, _ = service.create_key(OPERATOR, tenant="acme", role="admin")
    with pytest.raises(PermissionDenied):
        service.revoke_key(tenant_admin, admin_in_acme.id)


def test_tenant_admin_cannot_grant_beyond_its_own_rights(
    service: IdentityService, clock: FakeClock
) -> None:
    service.create_tenant(OPERATOR, "acme")
    expiry = datetime.fromtimestamp(clock.now + 3600, UTC)
    narrow = _key(
        service,
        "acme",
        "tenant-admin",
        models=["tiny-*"],
        actions=["chat", "admin"],
        expires_at=expiry,
    )
    with pytest.raises(PermissionDenied):
        service.create_key(narrow, tenant="acme", role="consumer", actions=["embeddings"])
    with pytest.raises(PermissionDenied):
        service.create_key(narrow, tenant="acme", role="consumer", models=["*"])
    with pytest.raises(PermissionDenied):
        service.create_key(narrow, tenant="acme", role="consumer", models=["digits"])
    with pytest.raises(PermissionDenied):
        service.create_key(
            narrow, tenant="acme", role="consumer", expires_at=expiry + timedelta(seconds=1)
        )
    # Defaults are narrowed to the creator's own rights.
    info, _ = service.create_key(narrow, tenant="acme", role="consumer")
    assert info.actions == ("chat",)
    assert info.models == ("tiny-*",)
    assert info.expires_at == expiry
    explicit, _ = service.create_key(narrow, tenant="acme", role="consumer", models=["tiny-chat"])
    assert explicit.models == ("tiny-chat",)


def test_consumers_cannot_manage_anything(
    service: IdentityService, two_tenants: tuple[Principal, Principal]
) -> None:
    tenant_admin, consumer = two_tenants
    calls = [
        lambda: service.create_tenant(consumer, "x"),
        lambda: service.list_tenants(consumer),
        lambda: service.get_tenant(consumer, "acme"),
        lambda: service.disable_tenant(consumer, "acme"),
        lambda: service.create_key(consumer, tenant="acme", role="consumer"),
        lambda: service.list_keys(consumer, "acme"),
        lambda: service.list_keys(consumer, None),
        lambda: service.revoke_key(consumer, tenant_admin.key_id),
        lambda: service.rotate_key(consumer, consumer.key_id),
    ]
    for call in calls:
        with pytest.raises(PermissionDenied):
            call()


def test_events_carry_the_actor_and_never_a_token(
    service: IdentityService, events: MemoryEventSink
) -> None:
    service.create_tenant(OPERATOR, "acme")
    tenant_admin_info, ta_token = service.create_key(OPERATOR, tenant="acme", role="tenant-admin")
    tenant_admin = _as_principal(tenant_admin_info)
    info, token = service.create_key(tenant_admin, tenant="acme", role="consumer")
    _, rotated_token = service.rotate_key(tenant_admin, info.id)
    assert events.events[-2].actor == tenant_admin.key_id
    assert events.events[-1].actor == tenant_admin.key_id
    dumped = repr(events.events)
    for secret_token in (ta_token, token, rotated_token):
        assert parse_api_key(secret_token)[1] not in dumped
