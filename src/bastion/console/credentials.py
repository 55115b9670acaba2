"""Who may use the console, and whether a session's credential still holds.

A session signed in with an API key keeps only the key's public id; on every request the
key is read again from the database, and the session ends once the key is revoked or
expired or its tenant disabled, or if it no longer holds a console role. The secret is
never kept: it is checked once, by the gateway's Authenticator, at sign-in.

A session signed in through the identity provider keeps the principal its ID token gave
(the provider is not asked again until the next sign-in); on every request its tenant is
read again, and the session ends once the tenant is disabled. Admins can end a user's
sessions from the console (docs/console.md says what revocation means for SSO users).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import sqlalchemy as sa

from bastion.errors import ConfigurationError, PermissionDenied
from bastion.gateway.sso import SingleSignOn
from bastion.identity.grants import is_global_admin
from bastion.identity.jwt import database_tenants
from bastion.identity.keys import is_public_id
from bastion.identity.oidc import OidcClient, OidcClientConfig
from bastion.identity.principal import (
    ACTION_ADMIN,
    ROLE_ADMIN,
    ROLE_TENANT_ADMIN,
    Principal,
)
from bastion.identity.records import key_query
from bastion.store.db import Database
from bastion.store.tables import api_keys, tenants

# Why a session ended, as the sign-in page says it (the codes travel in its URL).
ENDED_REVOKED = "revoked"
ENDED_EXPIRED = "expired"
ENDED_TENANT_DISABLED = "tenant_disabled"
ENDED_UNKNOWN = "unknown"
ENDED_ROLE = "role"
ENDED_BY_ADMIN = "ended"
ENDED_TIMEOUT = "timeout"
SIGNED_OUT = "signed_out"
ENDED_MESSAGES = {
    ENDED_REVOKED: "Your session ended: its API key was revoked.",
    ENDED_EXPIRED: "Your session ended: its API key has expired.",
    ENDED_TENANT_DISABLED: "Your session ended: its tenant is disabled.",
    ENDED_UNKNOWN: "Your session ended: its credential no longer exists.",
    ENDED_ROLE: "Your session ended: its credential may no longer use the console.",
    ENDED_BY_ADMIN: "Your session was ended by an administrator.",
    ENDED_TIMEOUT: "Please sign in (your session has ended or timed out).",
    SIGNED_OUT: "You have signed out.",
}

CONSOLE_ROLES = (ROLE_ADMIN, ROLE_TENANT_ADMIN)


class SessionEnded(Exception):
    """A session's credential no longer holds; `reason` is one of the ENDED_* codes."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def require_console_role(principal: Principal) -> None:
    """PermissionDenied unless `principal` is an admin or a tenant's admin holding the
    admin action: the only ones the console lets in."""
    if principal.role not in CONSOLE_ROLES or ACTION_ADMIN not in principal.actions:
        raise PermissionDenied("Only admin and tenant-admin credentials may use the console.")


def require_key(principal: Principal) -> None:
    """PermissionDenied unless `principal` came from an API key (not a bearer JWT pasted
    into the key form: the provider's sign-in is for those)."""
    if not is_public_id(principal.key_id):
        raise PermissionDenied("Sign in here with an API key, or with single sign-on.")


def key_principal(db: Database, key_id: str, now: datetime) -> Principal:
    """The principal of the key `key_id` as the database has it now; SessionEnded if the
    key is gone, revoked or expired, its tenant disabled, or it may not use the console.
    (Blocking: call it from a thread.)"""
    query = (
        key_query()
        .add_columns(tenants.c.disabled.label("tenant_disabled"))
        .where(api_keys.c.id == key_id)
    )
    with db.read() as conn:
        row = conn.execute(query).mappings().one_or_none()
    if row is None:
        raise SessionEnded(ENDED_UNKNOWN)
    if row["revoked_at"] is not None:
        raise SessionEnded(ENDED_REVOKED)
    expires_at = row["expires_at"]
    if expires_at is not None and now >= expires_at.astimezone(UTC):
        raise SessionEnded(ENDED_EXPIRED)
    if row["tenant_disabled"]:
        raise SessionEnded(ENDED_TENANT_DISABLED)
    principal = Principal(
        key_id=key_id,
        tenant_id=row["tenant_id"],
        tenant_name=row["tenant"],
        role=row["role"],
        models=tuple(row["models"]),
        actions=frozenset(row["actions"]),
        expires_at=expires_at,
    )
    try:
        require_console_role(principal)
    except PermissionDenied:
        raise SessionEnded(ENDED_ROLE) from None
    return principal


def sso_principal(db: Database, principal: Principal) -> Principal:
    """`principal` (of a sign-in through the provider) if its tenant is still there and
    enabled; SessionEnded otherwise. (Blocking: call it from a thread.)"""
    with db.read() as conn:
        row = (
            conn.execute(sa.select(tenants).where(tenants.c.id == principal.tenant_id))
            .mappings()
            .one_or_none()
        )
    if row is None or row["name"] != principal.tenant_name:
        raise SessionEnded(ENDED_UNKNOWN)
    if row["disabled"]:
        raise SessionEnded(ENDED_TENANT_DISABLED)
    return principal


def signed_in_user(principal: Principal) -> Principal:
    """The principal a sign-in through the provider gives a console session: the ID
    token's, without its expiry. The ID token proves who signed in, then; the session has
    timeouts of its own, and a tenant's admin signed in this way creates keys limited by
    its role, not by a token's few minutes."""
    return replace(principal, expires_at=None)


def may_end(actor: Principal, owner: Principal) -> bool:
    """Whether `actor` may end the sessions of `owner`: an admin anyone's, a tenant's admin
    those of its own tenant's other admins (not an admin's)."""
    if is_global_admin(actor):
        return True
    return (
        actor.role == ROLE_TENANT_ADMIN
        and owner.tenant_id == actor.tenant_id
        and owner.role != ROLE_ADMIN
    )


def oidc_client(sso: SingleSignOn | None, db: Database) -> OidcClient | None:
    """The console's OpenID Connect client, when single sign-on names one (it shares the
    provider's keys and the claims mapping with the API's bearer tokens); None otherwise.
    ConfigurationError for settings the identity library refuses."""
    if sso is None:
        return None
    conf = sso.settings
    if conf.client_id is None or conf.redirect_url is None:
        return None
    try:
        config = OidcClientConfig(
            conf.issuer, conf.client_id, conf.redirect_url, conf.client_secret
        )
        return OidcClient(
            config,
            sso.keys,
            sso.mapping,
            database_tenants(db),
            algorithms=conf.algorithms,
            leeway_s=conf.leeway_s,
        )
    except ValueError as exc:
        raise ConfigurationError(f"The console's single sign-on (BASTION_OIDC_*): {exc}") from exc
