"""Roles, actions and the checks on a Principal."""

from __future__ import annotations

import pytest

from bastion.errors import InvalidRequest, PermissionDenied
from bastion.identity.principal import (
    DEFAULT_ACTIONS,
    OPERATOR,
    Principal,
    validate_actions,
    validate_role,
)

pytestmark = pytest.mark.unit

USE = {"chat", "completions", "embeddings", "infer", "models"}


def _principal(role: str = "consumer", models: tuple[str, ...] = ("*",), **kw: object) -> Principal:
    actions = kw.pop("actions", None)
    return Principal(
        key_id="0123456789abcdef",
        tenant_id=7,
        tenant_name="acme",
        role=role,
        models=models,
        actions=frozenset(actions) if actions is not None else validate_actions(role, None),  # type: ignore[arg-type]
    )


def test_default_actions_per_role() -> None:
    assert set(DEFAULT_ACTIONS["consumer"]) == USE
    assert set(DEFAULT_ACTIONS["tenant-admin"]) == USE | {"admin"}
    assert set(DEFAULT_ACTIONS["admin"]) == USE | {"admin", "metrics"}


def test_unknown_roles_and_actions_are_invalid() -> None:
    with pytest.raises(InvalidRequest):
        validate_role("root")
    with pytest.raises(InvalidRequest):
        validate_actions("consumer", ["chat", "fly"])
    with pytest.raises(InvalidRequest):
        validate_actions("consumer", [])


def test_actions_beyond_the_role_are_invalid() -> None:
    with pytest.raises(InvalidRequest):
        validate_actions("consumer", ["admin"])
    with pytest.raises(InvalidRequest):
        validate_actions("tenant-admin", ["metrics"])
    assert validate_actions("admin", ["metrics"]) == frozenset({"metrics"})


def test_require_action() -> None:
    principal = _principal(actions=["chat"])
    principal.require_action("chat")
    with pytest.raises(PermissionDenied):
        principal.require_action("embeddings")


def test_model_globs() -> None:
    principal = _principal(models=("tiny-*", "digits"))
    principal.require_model("tiny-chat")
    principal.require_model("digits")
    assert principal.can_see_model("tiny-chat")
    assert not principal.can_see_model("Tiny-chat")  # case-sensitive
    assert not principal.can_see_model("digits-v2")
    with pytest.raises(PermissionDenied):
        principal.require_model("minilm")
    assert _principal().can_see_model("anything")


def test_admin_checks() -> None:
    admin = _principal("admin")
    admin.require_admin()
    admin.require_tenant_admin_of(7)
    admin.require_tenant_admin_of(99)

    tenant_admin = _principal("tenant-admin")
    tenant_admin.require_tenant_admin_of(7)
    with pytest.raises(PermissionDenied):
        tenant_admin.require_tenant_admin_of(8)
    with pytest.raises(PermissionDenied):
        tenant_admin.require_admin()

    consumer = _principal("consumer")
    with pytest.raises(PermissionDenied):
        consumer.require_tenant_admin_of(7)
    with pytest.raises(PermissionDenied):
        consumer.require_admin()


def test_an_admin_key_without_the_admin_action_cannot_manage() -> None:
    scraper = _principal("admin", actions=["metrics"])
    scraper.require_action("metrics")
    with pytest.raises(PermissionDenied):
        scraper.require_admin()
    with pytest.raises(PermissionDenied):
        scraper.require_tenant_admin_of(7)


def test_model_pattern_coverage_is_conservative() -> None:
    principal = _principal("tenant-admin", models=("tiny-*",))
    assert principal.covers_model_pattern("tiny-*")
    assert principal.covers_model_pattern("tiny-chat")
    assert not principal.covers_model_pattern("tiny-c*")  # might be fine, but not provable
    assert not principal.covers_model_pattern("*")
    assert not principal.covers_model_pattern("digits")


def test_operator_is_an_admin_named_local_operator() -> None:
    assert OPERATOR.actor == "local-operator"
    OPERATOR.require_admin()
    OPERATOR.require_action("metrics")
