"""A console session's credential, checked again on every request: keys and SSO users."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from bastion.audit.events import MemoryEventSink
from bastion.console.credentials import (
    ENDED_EXPIRED,
    ENDED_REVOKED,
    ENDED_ROLE,
    ENDED_TENANT_DISABLED,
    ENDED_UNKNOWN,
    SessionEnded,
    key_principal,
    may_end,
    require_console_role,
    sso_principal,
)
from bastion.errors import PermissionDenied
from bastion.identity.keys import KeyHasher
from bastion.identity.principal import OPERATOR, ROLE_ADMIN, ROLE_TENANT_ADMIN, Principal
from bastion.identity.service import IdentityService
from bastion.store.db import Database

pytestmark = pytest.mark.unit


@pytest.fixture
def identity(db: Database, events: MemoryEventSink) -> IdentityService:
    service = IdentityService(db, KeyHasher(b"k" * 32), events)
    service.create_tenant(OPERATOR, "acme")
    return service


def now() -> datetime:
    return datetime.now(UTC)


def test_a_key_session_holds_while_its_key_does(db: Database, identity: IdentityService) -> None:
    info, _ = identity.create_key(OPERATOR, tenant="acme", role=ROLE_TENANT_ADMIN)
    principal = key_principal(db, info.id, now())
    assert (principal.key_id, principal.tenant_name, principal.role) == (
        info.id,
        "acme",
        ROLE_TENANT_ADMIN,
    )
    identity.revoke_key(OPERATOR, info.id)
    with pytest.raises(SessionEnded) as ended:
        key_principal(db, info.id, now())
    assert ended.value.reason == ENDED_REVOKED


def test_expiry_a_disabled_tenant_a_lost_role_or_no_key_end_it(
    db: Database, identity: IdentityService
) -> None:
    soon = now() + timedelta(minutes=5)
    expiring, _ = identity.create_key(
        OPERATOR, tenant="acme", role=ROLE_TENANT_ADMIN, expires_at=soon
    )
    key_principal(db, expiring.id, now())
    with pytest.raises(SessionEnded) as ended:
        key_principal(db, expiring.id, soon)
    assert ended.value.reason == ENDED_EXPIRED
    consumer, _ = identity.create_key(OPERATOR, tenant="acme", role="consumer")
    with pytest.raises(SessionEnded) as ended:
        key_principal(db, consumer.id, now())
    assert ended.value.reason == ENDED_ROLE
    with pytest.raises(SessionEnded) as ended:
        key_principal(db, "0" * 16, now())
    assert ended.value.reason == ENDED_UNKNOWN
    lead, _ = identity.create_key(OPERATOR, tenant="acme", role=ROLE_TENANT_ADMIN)
    identity.disable_tenant(OPERATOR, "acme")
    with pytest.raises(SessionEnded) as ended:
        key_principal(db, lead.id, now())
    assert ended.value.reason == ENDED_TENANT_DISABLED


def test_an_sso_session_holds_while_its_tenant_does(
    db: Database, identity: IdentityService
) -> None:
    acme = identity.get_tenant(OPERATOR, "acme")
    user = Principal(
        "jwt:idp:alice", acme.id, "acme", ROLE_TENANT_ADMIN, actions=frozenset({"admin"})
    )
    assert sso_principal(db, user) is user
    with pytest.raises(SessionEnded) as ended:
        sso_principal(db, replace(user, tenant_name="other"))
    assert ended.value.reason == ENDED_UNKNOWN
    identity.disable_tenant(OPERATOR, "acme")
    with pytest.raises(SessionEnded) as ended:
        sso_principal(db, user)
    assert ended.value.reason == ENDED_TENANT_DISABLED


def test_only_admins_and_tenant_admins_with_the_admin_action_may_use_the_console() -> None:
    require_console_role(OPERATOR)
    require_console_role(Principal("x", 1, "acme", ROLE_TENANT_ADMIN, actions=frozenset({"admin"})))
    for principal in (
        Principal("x", 1, "acme", "consumer", actions=frozenset({"chat"})),
        Principal("x", 1, "acme", ROLE_TENANT_ADMIN, actions=frozenset({"chat"})),
    ):
        with pytest.raises(PermissionDenied):
            require_console_role(principal)


def test_who_may_end_whose_sessions() -> None:
    acme = Principal("a", 2, "acme", ROLE_TENANT_ADMIN, actions=frozenset({"admin"}))
    other = Principal("b", 3, "globex", ROLE_TENANT_ADMIN, actions=frozenset({"admin"}))
    admin_in_acme = Principal("c", 2, "acme", ROLE_ADMIN, actions=frozenset({"admin"}))
    assert may_end(OPERATOR, acme) and may_end(OPERATOR, other)
    assert may_end(acme, replace(acme, key_id="d"))
    assert not may_end(acme, other) and not may_end(acme, admin_in_acme)
