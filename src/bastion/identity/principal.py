"""Roles, actions, and the Principal: who is making a request and what it may do.

Roles:

- ``admin``: manages everything (tenants, keys of any tenant, models) and reads metrics;
- ``tenant-admin``: uses models and manages the keys of its own tenant only;
- ``consumer``: uses models.

A key carries a set of actions (a subset of what its role allows) and a list of model
names or fnmatch-style globs. Every check here raises PermissionDenied; none returns a
boolean to forget, except :meth:`Principal.can_see_model`, which filters model lists.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from bastion.errors import InvalidRequest, PermissionDenied

ROLE_ADMIN = "admin"
ROLE_TENANT_ADMIN = "tenant-admin"
ROLE_CONSUMER = "consumer"
ROLES = (ROLE_ADMIN, ROLE_TENANT_ADMIN, ROLE_CONSUMER)

ACTION_CHAT = "chat"
ACTION_COMPLETIONS = "completions"
ACTION_EMBEDDINGS = "embeddings"
ACTION_INFER = "infer"
ACTION_MODELS = "models"  # list and read model metadata
ACTION_METRICS = "metrics"  # GET /metrics
ACTION_ADMIN = "admin"  # manage tenants, keys and models (within the role's reach)

USE_ACTIONS = (ACTION_CHAT, ACTION_COMPLETIONS, ACTION_EMBEDDINGS, ACTION_INFER, ACTION_MODELS)
ACTIONS = (*USE_ACTIONS, ACTION_METRICS, ACTION_ADMIN)

# What each role may be granted. Metrics span all tenants, so only admin keys may read them.
ALLOWED_ACTIONS: dict[str, frozenset[str]] = {
    ROLE_ADMIN: frozenset(ACTIONS),
    ROLE_TENANT_ADMIN: frozenset((*USE_ACTIONS, ACTION_ADMIN)),
    ROLE_CONSUMER: frozenset(USE_ACTIONS),
}
# What a new key of each role gets when no actions are given: all its role allows.
DEFAULT_ACTIONS: dict[str, tuple[str, ...]] = {
    role: tuple(a for a in ACTIONS if a in allowed) for role, allowed in ALLOWED_ACTIONS.items()
}
ALL_MODELS = ("*",)
OPERATOR_ACTOR = "local-operator"
# How the key id of a single sign-on user starts: "jwt:<issuer host>:<subject>"
# (bastion.identity.jwt); an API key's id never holds a colon.
SSO_KEY_PREFIX = "jwt:"


def validate_role(role: str) -> str:
    """Return `role` if it is known, else raise InvalidRequest."""
    if role not in ROLES:
        raise InvalidRequest(f"Unknown role; expected one of {', '.join(ROLES)}.", param="role")
    return role


def validate_actions(role: str, actions: Iterable[str] | None) -> frozenset[str]:
    """The actions for a key of `role`: the role's defaults when None, else checked ones.

    Raises InvalidRequest for an unknown action or one the role may not hold.
    """
    validate_role(role)
    if actions is None:
        return frozenset(DEFAULT_ACTIONS[role])
    granted = frozenset(actions)
    unknown = granted.difference(ACTIONS)
    if unknown:
        raise InvalidRequest(
            f"Unknown action; expected some of {', '.join(ACTIONS)}.", param="actions"
        )
    beyond = granted - ALLOWED_ACTIONS[role]
    if beyond:
        raise InvalidRequest(
            f"A {role} key cannot hold the action(s) {', '.join(sorted(beyond))}.",
            param="actions",
        )
    if not granted:
        raise InvalidRequest("A key needs at least one action.", param="actions")
    return granted


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: one API key, its tenant, role, models and actions."""

    key_id: str
    tenant_id: int
    tenant_name: str
    role: str
    models: tuple[str, ...] = ALL_MODELS
    actions: frozenset[str] = frozenset()
    expires_at: datetime | None = None

    @property
    def actor(self) -> str:
        """The name that audit events record for this caller (never a secret)."""
        return self.key_id

    @property
    def all_models(self) -> bool:
        return "*" in self.models

    def require_action(self, action: str) -> None:
        """Raise PermissionDenied unless this key holds `action`."""
        if action not in self.actions:
            raise PermissionDenied(f"This API key is not allowed the '{action}' action.")

    def can_see_model(self, name: str) -> bool:
        """Whether `name` matches one of this key's model globs (to filter model lists)."""
        if self.all_models:
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.models)

    def require_model(self, name: str) -> None:
        """Raise PermissionDenied unless this key may use the model `name`."""
        if not self.can_see_model(name):
            raise PermissionDenied("This API key is not allowed to use this model.", param="model")

    def require_admin(self) -> None:
        """Raise PermissionDenied unless this is an admin key holding the admin action."""
        if self.role != ROLE_ADMIN or ACTION_ADMIN not in self.actions:
            raise PermissionDenied("This operation needs an admin API key.")

    def require_tenant_admin_of(self, tenant_id: int) -> None:
        """Raise PermissionDenied unless this key may manage the tenant `tenant_id`.

        Admin keys manage every tenant; tenant-admin keys only their own.
        """
        if ACTION_ADMIN in self.actions:
            if self.role == ROLE_ADMIN:
                return
            if self.role == ROLE_TENANT_ADMIN and tenant_id == self.tenant_id:
                return
        raise PermissionDenied("This API key may not manage this tenant.")

    def covers_model_pattern(self, pattern: str) -> bool:
        """Whether every model `pattern` can match is one this key may use.

        Used so a tenant-admin cannot grant more than it holds. Glob containment is
        undecidable in general here, so this is conservative: a pattern is covered when
        the key holds ``*``, holds the same pattern, or the pattern is a plain name the
        key's globs match.
        """
        if self.all_models or pattern in self.models:
            return True
        if _has_glob(pattern):
            return False
        return self.can_see_model(pattern)


def _has_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


# The principal of the local command line: whoever can run `bastion` on the host with
# access to the home directory already holds the master key, so it acts as admin.
OPERATOR = Principal(
    key_id=OPERATOR_ACTOR,
    tenant_id=0,
    tenant_name="system",
    role=ROLE_ADMIN,
    actions=frozenset(ACTIONS),
)
