"""Tenants and API keys: the one service layer behind both the admin API and the CLI.

Every method takes the acting :class:`Principal` first and checks its rights (the rules are
in :mod:`bastion.identity.grants`) before it changes anything, so the HTTP routes and the
command line cannot drift apart. Every change is one database transaction (which also bumps
the change revision) followed by one audit event. Secrets leave this module only as the
token returned by the call that created it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from bastion.audit.events import (
    KEY_CREATED,
    KEY_REVOKED,
    KEY_ROTATED,
    TENANT_CREATED,
    TENANT_DISABLED,
    EventSink,
    emit_change,
)
from bastion.errors import Conflict, NotFound
from bastion.identity.grants import (
    TENANT_NAME_PATTERN,
    TENANT_NOT_FOUND,
    authorize_key,
    authorize_tenant,
    grant_actions,
    grant_expiry,
    grant_models,
    grant_role,
    is_global_admin,
    require_manager,
    validate_key_name,
    validate_tenant_name,
)
from bastion.identity.keys import KeyHasher, generate_api_key, is_public_id
from bastion.identity.principal import (
    ACTIONS,
    ALL_MODELS,
    OPERATOR,
    ROLE_ADMIN,
    Principal,
    validate_actions,
)
from bastion.identity.records import KeyInfo, TenantInfo, key_info, key_query, tenant_info
from bastion.store.db import Database
from bastion.store.tables import api_keys, tenants

# KeyInfo and TenantInfo are re-exported: callers import them from here with the service.
__all__ = ["BOOTSTRAP_KEY_NAME", "SYSTEM_TENANT", "IdentityService", "KeyInfo", "TenantInfo"]

SYSTEM_TENANT = "system"
BOOTSTRAP_KEY_NAME = "bootstrap-admin"


class IdentityService:
    """Create, list, disable and revoke tenants and keys, on behalf of a principal."""

    def __init__(
        self,
        db: Database,
        hasher: KeyHasher,
        events: EventSink,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._hasher = hasher
        self._events = events
        self._clock = clock

    # ------------------------------------------------------------------ tenants

    def create_tenant(self, actor: Principal, name: str) -> TenantInfo:
        """Create a tenant (admin only). Conflict if the name is taken."""
        actor.require_admin()
        validate_tenant_name(name)
        try:
            with self._db.write() as conn:
                if _tenant_row(conn, name) is not None:
                    raise Conflict("A tenant with this name already exists.", param="name")
                tenant = _insert_tenant(conn, name, self._now())
        except sa.exc.IntegrityError as exc:  # a concurrent create won the race
            raise Conflict("A tenant with this name already exists.", param="name") from exc
        self._emit(TENANT_CREATED, actor, tenant=name)
        return tenant

    def list_tenants(self, actor: Principal) -> list[TenantInfo]:
        """Every tenant for an admin; only its own for a tenant-admin."""
        require_manager(actor)
        query = sa.select(tenants).order_by(tenants.c.id)
        if not is_global_admin(actor):
            query = query.where(tenants.c.id == actor.tenant_id)
        with self._db.read() as conn:
            return [tenant_info(row) for row in conn.execute(query).mappings()]

    def get_tenant(self, actor: Principal, name: str) -> TenantInfo:
        """One tenant, if the actor may manage it."""
        require_manager(actor)
        with self._db.read() as conn:
            row = _tenant_row(conn, name)
        return tenant_info(authorize_tenant(actor, row))

    def disable_tenant(self, actor: Principal, name: str) -> TenantInfo:
        """Disable a tenant (admin only): all its keys stop working at once."""
        actor.require_admin()
        if name == SYSTEM_TENANT:
            raise Conflict("The system tenant cannot be disabled.")
        now = self._now()
        with self._db.write() as conn:
            row = _tenant_row(conn, name)
            if row is None:
                raise NotFound(TENANT_NOT_FOUND)
            if row["disabled"]:
                raise Conflict("The tenant is already disabled.")
            conn.execute(
                sa.update(tenants)
                .where(tenants.c.id == row["id"])
                .values(disabled=True, disabled_at=now)
            )
            tenant = tenant_info({**row, "disabled": True, "disabled_at": now})
        self._emit(TENANT_DISABLED, actor, tenant=name)
        return tenant

    # ------------------------------------------------------------------ keys

    def create_key(
        self,
        actor: Principal,
        *,
        tenant: str,
        role: str,
        models: Sequence[str] | None = None,
        actions: Sequence[str] | None = None,
        expires_at: datetime | None = None,
        name: str | None = None,
    ) -> tuple[KeyInfo, str]:
        """Create a key in `tenant`; returns its info and its token (shown once).

        A tenant-admin may create keys in its own tenant only, never admin keys, and never
        with actions, models or a lifetime beyond its own.
        """
        require_manager(actor)
        grant_role(actor, role)
        granted = grant_actions(actor, role, actions)
        scope = grant_models(actor, models)
        expiry = grant_expiry(actor, expires_at)
        label = validate_key_name(name)
        now = self._now()
        with self._db.write() as conn:
            row = authorize_tenant(actor, _tenant_row(conn, tenant))
            if row["disabled"]:
                raise Conflict("The tenant is disabled; it cannot get new keys.")
            info, token = self._insert_key(
                conn,
                tenant_id=row["id"],
                tenant_name=row["name"],
                name=label,
                role=role,
                models=scope,
                actions=granted,
                created_at=now,
                expires_at=expiry,
                rotated_from=None,
            )
        self._emit(KEY_CREATED, actor, tenant=tenant, target=info.id, detail={"role": role})
        return info, token

    def list_keys(self, actor: Principal, tenant: str | None = None) -> list[KeyInfo]:
        """Keys of one tenant, or of every tenant the actor manages; never secrets."""
        require_manager(actor)
        query = key_query().order_by(api_keys.c.created_at, api_keys.c.id)
        with self._db.read() as conn:
            if tenant is not None:
                row = authorize_tenant(actor, _tenant_row(conn, tenant))
                query = query.where(api_keys.c.tenant_id == row["id"])
            elif not is_global_admin(actor):
                query = query.where(api_keys.c.tenant_id == actor.tenant_id)
            return [key_info(row) for row in conn.execute(query).mappings()]

    def get_key(self, actor: Principal, key_id: str) -> KeyInfo:
        """One key, if the actor may manage its tenant."""
        require_manager(actor)
        with self._db.read() as conn:
            return self._authorized_key(conn, actor, key_id)

    def revoke_key(self, actor: Principal, key_id: str) -> KeyInfo:
        """Revoke a key at once. Conflict if it is already revoked."""
        require_manager(actor)
        now = self._now()
        with self._db.write() as conn:
            info = self._authorized_key(conn, actor, key_id)
            if info.revoked_at is not None:
                raise Conflict("The key is already revoked.")
            _mark_revoked(conn, info.id, now)
        self._emit(KEY_REVOKED, actor, tenant=info.tenant, target=info.id)
        return replace(info, revoked_at=now)

    def rotate_key(self, actor: Principal, key_id: str) -> tuple[KeyInfo, str]:
        """Replace a key by a new one with the same rights and expiry; revoke the old one."""
        require_manager(actor)
        now = self._now()
        with self._db.write() as conn:
            old = self._authorized_key(conn, actor, key_id)
            if old.revoked_at is not None:
                raise Conflict("The key is revoked; create a new key instead.")
            if not old.is_active(now):
                raise Conflict("The key has expired; create a new key instead.")
            tenant_disabled = conn.execute(
                sa.select(tenants.c.disabled).where(tenants.c.id == old.tenant_id)
            ).scalar_one()
            if tenant_disabled:
                raise Conflict("The tenant is disabled; its keys cannot be rotated.")
            info, token = self._insert_key(
                conn,
                tenant_id=old.tenant_id,
                tenant_name=old.tenant,
                name=old.name,
                role=old.role,
                models=old.models,
                actions=frozenset(old.actions),
                created_at=now,
                expires_at=old.expires_at,
                rotated_from=old.id,
            )
            _mark_revoked(conn, old.id, now)
        self._emit(
            KEY_ROTATED, actor, tenant=old.tenant, target=info.id, detail={"rotated_from": old.id}
        )
        return info, token

    def bootstrap_admin(self) -> str | None:
        """On first start, create the "system" tenant and an admin key; return its token.

        Returns None when any admin key (even a revoked one) exists: the first start is over,
        and a lost admin key is replaced with the local CLI, not by restarting.
        """
        if self._admin_key_exists():
            return None
        now = self._now()
        created_tenant = False
        with self._db.write() as conn:
            # Checked again under the write lock: another process may have just done it.
            if _any_admin_key(conn):
                return None
            row = _tenant_row(conn, SYSTEM_TENANT)
            if row is None:
                tenant = _insert_tenant(conn, SYSTEM_TENANT, now)
                tenant_id, created_tenant = tenant.id, True
            else:
                tenant_id = row["id"]
            info, token = self._insert_key(
                conn,
                tenant_id=tenant_id,
                tenant_name=SYSTEM_TENANT,
                name=BOOTSTRAP_KEY_NAME,
                role=ROLE_ADMIN,
                models=ALL_MODELS,
                actions=validate_actions(ROLE_ADMIN, None),
                created_at=now,
                expires_at=None,
                rotated_from=None,
            )
        if created_tenant:
            self._emit(TENANT_CREATED, OPERATOR, tenant=SYSTEM_TENANT)
        self._emit(
            KEY_CREATED, OPERATOR, tenant=SYSTEM_TENANT, target=info.id, detail={"role": ROLE_ADMIN}
        )
        return token

    # ------------------------------------------------------------------ internals

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _emit(
        self,
        kind: str,
        actor: Principal,
        *,
        tenant: str | None = None,
        target: str | None = None,
        detail: dict[str, str | int | float | bool | None] | None = None,
    ) -> None:
        emit_change(
            self._events, kind, actor.actor, target, tenant=tenant, detail=detail, at=self._clock()
        )

    def _admin_key_exists(self) -> bool:
        with self._db.read() as conn:
            return _any_admin_key(conn)

    def _authorized_key(self, conn: Connection, actor: Principal, key_id: str) -> KeyInfo:
        row = (
            conn.execute(key_query().where(api_keys.c.id == key_id)).mappings().one_or_none()
            if is_public_id(key_id)
            else None
        )
        return authorize_key(actor, key_info(row) if row is not None else None)

    def _insert_key(
        self,
        conn: Connection,
        *,
        tenant_id: int,
        tenant_name: str,
        name: str | None,
        role: str,
        models: tuple[str, ...],
        actions: frozenset[str],
        created_at: datetime,
        expires_at: datetime | None,
        rotated_from: str | None,
    ) -> tuple[KeyInfo, str]:
        issued = generate_api_key()
        ordered_actions = tuple(a for a in ACTIONS if a in actions)
        conn.execute(
            sa.insert(api_keys).values(
                id=issued.public_id,
                tenant_id=tenant_id,
                name=name,
                digest=self._hasher.digest(issued.public_id, issued.secret),
                role=role,
                models=list(models),
                actions=list(ordered_actions),
                created_at=created_at,
                expires_at=expires_at,
                revoked_at=None,
                rotated_from=rotated_from,
            )
        )
        info = KeyInfo(
            id=issued.public_id,
            tenant_id=tenant_id,
            tenant=tenant_name,
            name=name,
            role=role,
            models=models,
            actions=ordered_actions,
            created_at=created_at,
            expires_at=expires_at,
            revoked_at=None,
            rotated_from=rotated_from,
        )
        return info, issued.token


# ---------------------------------------------------------------------- rows


def _tenant_row(conn: Connection, name: str) -> RowMapping | None:
    if not isinstance(name, str) or TENANT_NAME_PATTERN.fullmatch(name) is None:
        return None
    return conn.execute(sa.select(tenants).where(tenants.c.name == name)).mappings().one_or_none()


def _insert_tenant(conn: Connection, name: str, now: datetime) -> TenantInfo:
    result = conn.execute(
        sa.insert(tenants).values(name=name, disabled=False, created_at=now, disabled_at=None)
    )
    primary_key = result.inserted_primary_key
    if primary_key is None:
        raise RuntimeError("the database returned no id for the new tenant")
    tenant_id = int(primary_key[0])
    return TenantInfo(id=tenant_id, name=name, disabled=False, created_at=now, disabled_at=None)


def _any_admin_key(conn: Connection) -> bool:
    query = sa.select(api_keys.c.id).where(api_keys.c.role == ROLE_ADMIN).limit(1)
    return conn.execute(query).first() is not None


def _mark_revoked(conn: Connection, key_id: str, now: datetime) -> None:
    conn.execute(sa.update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now))
