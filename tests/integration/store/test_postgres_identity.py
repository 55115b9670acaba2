"""Tenants and API keys on both backends, from one gateway and from two at once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from store_testing import run_threads

from bastion.audit.events import MemoryEventSink
from bastion.errors import Conflict
from bastion.identity.keys import KeyHasher
from bastion.identity.principal import OPERATOR
from bastion.identity.service import IdentityService
from bastion.store.db import Database

HASHER = KeyHasher(b"k" * 32)


def _service(db: Database) -> IdentityService:
    return IdentityService(db, HASHER, MemoryEventSink())


def test_tenants_and_keys_are_created_listed_rotated_and_revoked(
    open_database: Callable[[], Database],
) -> None:
    gateway, cli = _service(open_database()), _service(open_database())
    acme = cli.create_tenant(OPERATOR, "acme")
    cli.create_tenant(OPERATOR, "beta")
    key, token = cli.create_key(OPERATOR, tenant="acme", role="consumer", name="app")
    rotated, _ = cli.rotate_key(OPERATOR, key.id)
    # What the other gateway reads back is what was written.
    assert [t.name for t in gateway.list_tenants(OPERATOR)] == ["acme", "beta"]
    assert gateway.get_tenant(OPERATOR, "acme") == acme
    keys = {k.id: k for k in gateway.list_keys(OPERATOR, "acme")}
    assert keys[key.id].revoked_at is not None
    assert keys[rotated.id].rotated_from == key.id
    assert keys[rotated.id].actions == key.actions and keys[rotated.id].models == key.models
    assert keys[rotated.id].created_at == rotated.created_at
    assert token.startswith(f"bsk_{key.id}_")
    gateway.revoke_key(OPERATOR, rotated.id)
    with pytest.raises(Conflict):
        cli.revoke_key(OPERATOR, rotated.id)
    cli.disable_tenant(OPERATOR, "beta")
    assert gateway.get_tenant(OPERATOR, "beta").disabled


def test_two_gateways_creating_one_tenant_at_once_make_one(
    open_database: Callable[[], Database],
) -> None:
    services = [_service(open_database()) for _ in range(4)]
    outcomes: list[str] = []

    def create(service: IdentityService) -> Callable[[], None]:
        def run() -> None:
            try:
                service.create_tenant(OPERATOR, "racing")
                outcomes.append("created")
            except Conflict:
                outcomes.append("conflict")

        return run

    run_threads(*(create(s) for s in services))
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "created"]
    assert [t.name for t in services[0].list_tenants(OPERATOR)] == ["racing"]


def test_gateways_starting_together_make_one_bootstrap_admin_key(
    open_database: Callable[[], Database],
) -> None:
    services = [_service(open_database()) for _ in range(4)]
    tokens: list[str | None] = []
    run_threads(*(lambda s=s: tokens.append(s.bootstrap_admin()) for s in services))
    assert len([t for t in tokens if t is not None]) == 1
    admins = [k for k in services[0].list_keys(OPERATOR) if k.role == "admin"]
    assert len(admins) == 1
