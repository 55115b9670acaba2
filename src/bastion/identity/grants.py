"""Who may manage tenants and keys, and what a key may grant to the keys it creates.

An admin key that holds the admin action may manage and grant anything. A tenant-admin key
manages its own tenant only and never grants beyond itself: no admin keys, and no actions,
models or lifetime it does not hold; where the request leaves them out, the defaults narrow
to its own. Every rule raises PermissionDenied or InvalidRequest on failure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from sqlalchemy.engine import RowMapping

from bastion.errors import InvalidRequest, NotFound, OutOfScope, PermissionDenied
from bastion.identity.principal import (
    ACTION_ADMIN,
    ALL_MODELS,
    ROLE_ADMIN,
    ROLE_TENANT_ADMIN,
    Principal,
    validate_actions,
    validate_role,
)
from bastion.identity.records import KeyInfo

TENANT_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# Model names and fnmatch globs over them.
MODEL_PATTERN = re.compile(r"[A-Za-z0-9._*?\[\]!-]{1,128}")
MAX_MODEL_PATTERNS = 64
MAX_KEY_NAME_LENGTH = 128


def is_global_admin(actor: Principal) -> bool:
    """Whether `actor` is an admin key holding the admin action, bound by no tenant."""
    return actor.role == ROLE_ADMIN and ACTION_ADMIN in actor.actions


def require_manager(actor: Principal) -> None:
    """Only admin and tenant-admin keys holding the admin action manage anything."""
    if ACTION_ADMIN not in actor.actions or actor.role not in (ROLE_ADMIN, ROLE_TENANT_ADMIN):
        raise PermissionDenied("This API key may not manage tenants or keys.")


def authorize_tenant(actor: Principal, row: RowMapping | None) -> RowMapping:
    """The tenant row if the actor may manage it.

    A tenant the actor may not manage is "not found" (404), exactly like a missing one,
    so that a tenant-admin cannot probe which tenant names exist (see :func:`not_found`).
    """
    if row is None or not _manages(actor, row["id"]):
        raise not_found(actor, TENANT_NOT_FOUND)
    return row


def authorize_key(actor: Principal, info: KeyInfo | None) -> KeyInfo:
    """The key (None: no key has the id asked for) if `actor` may manage it: its tenant's
    admin, and only admins for admins.

    Another tenant's key is "not found" (404), like a key id that does not exist.
    """
    if info is None or not _manages(actor, info.tenant_id):
        raise not_found(actor, KEY_NOT_FOUND)
    if info.role == ROLE_ADMIN and not is_global_admin(actor):
        raise PermissionDenied("Only admin keys may manage admin keys.")
    return info


def not_found(actor: Principal, message: str) -> NotFound:
    """The error for a tenant or key that does not exist or that `actor` may not manage.

    Both get one answer (404, `message`). For an admin bound by no tenant, the object is
    just missing; for a tenant's admin it is :class:`~bastion.errors.OutOfScope`, which
    the API and the console record as a refused escalation (``auth.denied``), whether or
    not the object exists: that record is in the audit records its tenant's admins read.
    """
    return NotFound(message) if is_global_admin(actor) else OutOfScope(message)


# The one answer for a tenant or key that does not exist *or* is not the caller's.
TENANT_NOT_FOUND = "No tenant has this name."
KEY_NOT_FOUND = "No API key has this id."


def _manages(actor: Principal, tenant_id: int) -> bool:
    try:
        actor.require_tenant_admin_of(tenant_id)
    except PermissionDenied:
        return False
    return True


def grant_role(actor: Principal, role: str) -> None:
    """Raise unless `role` is a role and `actor` may create keys with it."""
    validate_role(role)
    if role == ROLE_ADMIN and not is_global_admin(actor):
        raise PermissionDenied("Only admin keys may create admin keys.")


def grant_actions(actor: Principal, role: str, actions: Sequence[str] | None) -> frozenset[str]:
    """The actions a new key of `role` gets: those asked for, or the role's defaults."""
    granted = validate_actions(role, actions)
    if is_global_admin(actor):
        return granted
    if actions is None:
        # Defaults are narrowed to what the granting key holds itself.
        return granted & actor.actions
    if not granted <= actor.actions:
        raise PermissionDenied("A key cannot grant actions it does not hold.")
    return granted


def grant_models(actor: Principal, models: Sequence[str] | None) -> tuple[str, ...]:
    """The model names and patterns a new key gets: those asked for, or the actor's own."""
    if models is None:
        return ALL_MODELS if is_global_admin(actor) else actor.models
    patterns = _validate_model_patterns(models)
    if not is_global_admin(actor):
        for pattern in patterns:
            if not actor.covers_model_pattern(pattern):
                raise PermissionDenied("A key cannot grant models it may not use.")
    return patterns


def grant_expiry(actor: Principal, expires_at: datetime | None) -> datetime | None:
    """When a new key expires, in UTC: never later than the key that creates it."""
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidRequest("expires_at must include a time zone.", param="expires_at")
        # A time in the past is allowed: the key is created already expired, which is
        # harmless and lets operators and tests check that expiry is enforced.
        expires_at = expires_at.astimezone(UTC)
    if is_global_admin(actor) or actor.expires_at is None:
        return expires_at
    if expires_at is None:
        return actor.expires_at
    if expires_at > actor.expires_at:
        raise PermissionDenied("A key cannot outlive the key that creates it.")
    return expires_at


def validate_tenant_name(name: str) -> None:
    """Raise InvalidRequest unless `name` is a valid tenant name."""
    if not isinstance(name, str) or TENANT_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidRequest(
            "Tenant names are 1-63 characters of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit.",
            param="name",
        )


def validate_key_name(name: str | None) -> str | None:
    """The key's label, stripped; None when absent or blank."""
    if name is None:
        return None
    if not isinstance(name, str) or not name.isprintable() or len(name) > MAX_KEY_NAME_LENGTH:
        raise InvalidRequest(
            f"Key names are printable text of at most {MAX_KEY_NAME_LENGTH} characters.",
            param="name",
        )
    return name.strip() or None


def _validate_model_patterns(models: Iterable[str]) -> tuple[str, ...]:
    patterns: list[str] = []
    for pattern in models:
        if not isinstance(pattern, str) or MODEL_PATTERN.fullmatch(pattern) is None:
            raise InvalidRequest("Invalid model name or pattern.", param="models")
        if pattern not in patterns:
            patterns.append(pattern)
    if not patterns:
        raise InvalidRequest("A key needs at least one model name or pattern.", param="models")
    if len(patterns) > MAX_MODEL_PATTERNS:
        raise InvalidRequest("Too many model patterns.", param="models")
    return tuple(patterns)
