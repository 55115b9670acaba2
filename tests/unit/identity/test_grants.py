"""The grant rules on their own, the records' shape, and the events the service emits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Protocol

import pytest

from bastion.audit.events import KEY_CREATED, TENANT_CREATED, MemoryEventSink
from bastion.errors import InvalidRequest, NotFound, OutOfScope, PermissionDenied
from bastion.identity import records
from bastion.identity import service as service_module
from bastion.identity.grants import (
    MAX_MODEL_PATTERNS,
    authorize_key,
    authorize_tenant,
    grant_actions,
    grant_expiry,
    grant_models,
    grant_role,
    require_manager,
    validate_key_name,
    validate_tenant_name,
)
from bastion.identity.principal import (
    ACTION_ADMIN,
    ACTION_CHAT,
    ACTION_METRICS,
    OPERATOR,
    ROLE_ADMIN,
    ROLE_CONSUMER,
    ROLE_TENANT_ADMIN,
    Principal,
)
from bastion.identity.records import KeyInfo, TenantInfo

pytestmark = pytest.mark.unit

NOW = datetime(2030, 1, 1, tzinfo=UTC)
TENANT_ADMIN = Principal(
    key_id="bk_tenantadmin",
    tenant_id=7,
    tenant_name="acme",
    role=ROLE_TENANT_ADMIN,
    models=("chat-*", "embed"),
    actions=frozenset({ACTION_ADMIN, ACTION_CHAT}),
    expires_at=NOW + timedelta(days=1),
)


class FakeClock(Protocol):
    now: float


def _key(role: str, tenant_id: int = 7) -> KeyInfo:
    return KeyInfo(
        id="bk_key",
        tenant_id=tenant_id,
        tenant="acme",
        name=None,
        role=role,
        models=("*",),
        actions=(ACTION_CHAT,),
        created_at=NOW,
        expires_at=None,
        revoked_at=None,
        rotated_from=None,
    )


def test_service_still_exports_the_records() -> None:
    assert service_module.KeyInfo is records.KeyInfo
    assert service_module.TenantInfo is records.TenantInfo


def test_records_serialise_times_in_utc_with_z() -> None:
    info = TenantInfo(id=1, name="acme", disabled=False, created_at=NOW, disabled_at=None)
    assert info.to_dict() == {
        "id": 1,
        "name": "acme",
        "disabled": False,
        "created_at": "2030-01-01T00:00:00Z",
        "disabled_at": None,
    }
    plus_two = timezone(timedelta(hours=2))
    assert records.isoformat(datetime(2030, 1, 1, 2, tzinfo=plus_two)) == "2030-01-01T00:00:00Z"


def test_only_managers_manage() -> None:
    require_manager(TENANT_ADMIN)
    consumer = Principal("bk_c", 7, "acme", ROLE_CONSUMER, actions=frozenset({ACTION_CHAT}))
    no_admin_action = Principal("bk_t", 7, "acme", ROLE_TENANT_ADMIN, actions=frozenset())
    for actor in (consumer, no_admin_action):
        with pytest.raises(PermissionDenied):
            require_manager(actor)


def test_a_missing_tenant_and_another_tenant_look_the_same() -> None:
    with pytest.raises(NotFound):
        authorize_tenant(OPERATOR, None)
    # A tenant-admin gets the same 404 for a missing tenant and for another one: it
    # cannot probe which names exist.
    with pytest.raises(NotFound) as missing:
        authorize_tenant(TENANT_ADMIN, None)
    with pytest.raises(NotFound) as other:
        authorize_tenant(TENANT_ADMIN, {"id": 8, "name": "other"})
    assert missing.value.message == other.value.message
    # Both are a refusal to record for a tenant's admin (OutOfScope, the same 404), and
    # only a missing tenant for an admin.
    assert type(missing.value) is type(other.value) is OutOfScope
    assert (other.value.status, other.value.code) == (404, "not_found")
    with pytest.raises(NotFound) as admins:
        authorize_tenant(OPERATOR, None)
    assert type(admins.value) is NotFound


def test_tenant_admin_manages_only_non_admin_keys_of_its_tenant() -> None:
    authorize_key(TENANT_ADMIN, _key(ROLE_CONSUMER))
    authorize_key(OPERATOR, _key(ROLE_ADMIN))
    with pytest.raises(PermissionDenied):
        authorize_key(TENANT_ADMIN, _key(ROLE_ADMIN))
    # Another tenant's key is "not found", as a key id that does not exist.
    with pytest.raises(OutOfScope, match="No API key has this id"):
        authorize_key(TENANT_ADMIN, _key(ROLE_CONSUMER, tenant_id=8))
    with pytest.raises(OutOfScope, match="No API key has this id"):
        authorize_key(TENANT_ADMIN, None)
    with pytest.raises(NotFound, match="No API key has this id") as missing:
        authorize_key(OPERATOR, None)
    assert type(missing.value) is NotFound


def test_roles() -> None:
    grant_role(OPERATOR, ROLE_ADMIN)
    grant_role(TENANT_ADMIN, ROLE_CONSUMER)
    with pytest.raises(PermissionDenied):
        grant_role(TENANT_ADMIN, ROLE_ADMIN)
    with pytest.raises(InvalidRequest):
        grant_role(OPERATOR, "root")


def test_default_actions_narrow_to_the_granting_key() -> None:
    assert grant_actions(TENANT_ADMIN, ROLE_CONSUMER, None) == {ACTION_CHAT}
    assert ACTION_METRICS in grant_actions(OPERATOR, ROLE_ADMIN, None)
    with pytest.raises(PermissionDenied):
        grant_actions(TENANT_ADMIN, ROLE_CONSUMER, ["embeddings"])


def test_models_default_to_the_granting_key_and_must_be_covered() -> None:
    assert grant_models(OPERATOR, None) == ("*",)
    assert grant_models(TENANT_ADMIN, None) == ("chat-*", "embed")
    assert grant_models(TENANT_ADMIN, ["chat-*", "chat-small", "chat-*"]) == (
        "chat-*",
        "chat-small",
    )
    with pytest.raises(PermissionDenied):
        grant_models(TENANT_ADMIN, ["*"])
    for bad in ([], ["has space"], [f"m{i}" for i in range(MAX_MODEL_PATTERNS + 1)]):
        with pytest.raises(InvalidRequest):
            grant_models(OPERATOR, bad)


def test_expiry_is_utc_and_never_beyond_the_granting_key() -> None:
    assert TENANT_ADMIN.expires_at is not None
    assert grant_expiry(OPERATOR, None) is None
    assert grant_expiry(TENANT_ADMIN, None) == TENANT_ADMIN.expires_at
    sooner = datetime(2030, 1, 1, 5, tzinfo=timezone(timedelta(hours=2)))
    granted = grant_expiry(TENANT_ADMIN, sooner)
    assert granted == sooner and granted is not None and granted.tzinfo == UTC
    with pytest.raises(PermissionDenied):
        grant_expiry(TENANT_ADMIN, TENANT_ADMIN.expires_at + timedelta(seconds=1))
    with pytest.raises(InvalidRequest):
        grant_expiry(OPERATOR, datetime(2030, 1, 1))  # naive on purpose


def test_names() -> None:
    validate_tenant_name("acme-1")
    for bad in ("", "Acme", "-acme", "a" * 64):
        with pytest.raises(InvalidRequest):
            validate_tenant_name(bad)
    assert validate_key_name("  ci  ") == "ci"
    assert validate_key_name("   ") is None
    with pytest.raises(InvalidRequest):
        validate_key_name("tab\there")


def test_events_record_kind_actor_tenant_target_and_the_clock(
    service: service_module.IdentityService, events: MemoryEventSink, clock: FakeClock
) -> None:
    service.create_tenant(OPERATOR, "acme")
    clock.now += 5
    info, _ = service.create_key(OPERATOR, tenant="acme", role=ROLE_CONSUMER)
    created_tenant, created_key = events.events
    assert (created_tenant.kind, created_tenant.tenant, created_tenant.target) == (
        TENANT_CREATED,
        "acme",
        None,
    )
    assert (created_key.kind, created_key.actor, created_key.target) == (
        KEY_CREATED,
        OPERATOR.actor,
        info.id,
    )
    assert created_key.detail == {"role": ROLE_CONSUMER}
    assert created_key.at == created_tenant.at + 5 == clock.now
