"""Tenants and API keys: the one service layer behind both the admin API and the CLI.

Every method takes the acting :class:`Principal` first and checks its rights before it
changes anything, so the HTTP routes and the command line cannot drift apart. Every change
is one database transaction (which also bumps the change revision) followed by one audit
event. Secrets leave this module only as the token returned by the call that created it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from bastion.audit.events import (
    KEY_CREATED,
    KEY_REVOKED,
    KEY_ROTATED,
    TENANT_CREATED,
    TENANT_DISABLED,
    Event,
    EventSink,
)
from bastion.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from bastion.identity.keys import KeyHasher, generate_api_key, is_public_id
from bastion.identity.principal import (
    ACTION_ADMIN,
    ACTIONS,
    ALL_MODELS,
    OPERATOR,
    ROLE_ADMIN,
    ROLE_TENANT_ADMIN,
    Principal,
    validate_actions,
    validate_role,
)
from bastion.store.db import Database
from bastion.store.tables import api_keys, tenants

SYSTEM_TENANT = "system"
BOOTSTRAP_KEY_NAME = "bootstrap-admin"
TENANT_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# Model names and fnmatch globs over them.
MODEL_PATTERN = re.compile(r"[A-Za-z0-9._*?\[\]!-]{1,128}")
MAX_MODEL_PATTERNS = 64
MAX_KEY_NAME_LENGTH = 128


def isoformat(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z`` suffix, or None."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class TenantInfo:
    """A tenant as shown to operators."""

    id: int
    name: str
    disabled: bool
    created_at: datetime
    disabled_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "disabled": self.disabled,
            "created_at": isoformat(self.created_at),
            "disabled_at": isoformat(self.disabled_at),
        }


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """An API key as shown to operators: never its secret or its digest."""

    id: str
    tenant_id: int
    tenant: str
    name: str | None
    role: str
    models: tuple[str, ...]
    actions: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_from: str | None

    def is_active(self, now: datetime) -> bool:
        """Not revoked and not expired at `now`."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "role": self.role,
            "models": list(self.models),
            "actions": list(self.actions),
            "created_at": isoformat(self.created_at),
            "expires_at": isoformat(self.expires_at),
            "revoked_at": isoformat(self.revoked_at),
            "rotated_from": self.rotated_from,
        }


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
        _validate_tenant_name(name)
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
        _require_manager(actor)
        query = sa.select(tenants).order_by(tenants.c.id)
        if not _is_global_admin(actor):
            query = query.where(tenants.c.id == actor.tenant_id)
        with self._db.read() as conn:
            return [_tenant_info(row) for row in conn.execute(query).mappings()]

    def get_tenant(self, actor: Principal, name: str) -> TenantInfo:
        """One tenant, if the actor may manage it."""
        _require_manager(actor)
        with self._db.read() as conn:
            row = _tenant_row(conn, name)
        return _tenant_info(_authorize_tenant(actor, row))

    def disable_tenant(self, actor: Principal, name: str) -> TenantInfo:
        """Disable a tenant (admin only): all its keys stop working at once."""
        actor.require_admin()
        if name == SYSTEM_TENANT:
            raise Conflict("The system tenant cannot be disabled.")
        now = self._now()
        with self._db.write() as conn:
            row = _tenant_row(conn, name)
            if row is None:
                raise NotFound("No tenant has this name.")
            if row["disabled"]:
                raise Conflict("The tenant is already disabled.")
            conn.execute(
                sa.update(tenants)
                .where(tenants.c.id == row["id"])
                .values(disabled=True, disabled_at=now)
            )
            tenant = _tenant_info({**row, "disabled": True, "disabled_at": now})
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
        _require_manager(actor)
        validate_role(role)
        if role == ROLE_ADMIN and not _is_global_admin(actor):
            raise PermissionDenied("Only admin keys may create admin keys.")
        granted = _grant_actions(actor, role, actions)
        scope = _grant_models(actor, models)
        expiry = _grant_expiry(actor, expires_at)
        label = _validate_key_name(name)
        now = self._now()
        with self._db.write() as conn:
            row = _authorize_tenant(actor, _tenant_row(conn, tenant))
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
        _require_manager(actor)
        query = _key_query().order_by(api_keys.c.created_at, api_keys.c.id)
        with self._db.read() as conn:
            if tenant is not None:
                row = _authorize_tenant(actor, _tenant_row(conn, tenant))
                query = query.where(api_keys.c.tenant_id == row["id"])
            elif not _is_global_admin(actor):
                query = query.where(api_keys.c.tenant_id == actor.tenant_id)
            return [_key_info(row) for row in conn.execute(query).mappings()]

    def get_key(self, actor: Principal, key_id: str) -> KeyInfo:
        """One key, if the actor may manage its tenant."""
        _require_manager(actor)
        with self._db.read() as conn:
            return self._authorized_key(conn, actor, key_id)

    def revoke_key(self, actor: Principal, key_id: str) -> KeyInfo:
        """Revoke a key at once. Conflict if it is already revoked."""
        _require_manager(actor)
        now = self._now()
        with self._db.write() as conn:
            info = self._authorized_key(conn, actor, key_id)
            if info.revoked_at is not None:
                raise Conflict("The key is already revoked.")
            _mark_revoked(conn, info.id, now)
        self._emit(KEY_REVOKED, actor, tenant=info.tenant, target=info.id)
        return _replace_revoked(info, now)

    def rotate_key(self, actor: Principal, key_id: str) -> tuple[KeyInfo, str]:
        """Replace a key by a new one with the same rights and expiry; revoke the old one."""
        _require_manager(actor)
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
        self._events.emit(
            Event(
                kind=kind,
                actor=actor.actor,
                tenant=tenant,
                target=target,
                detail=detail or {},
                at=self._clock(),
            )
        )

    def _admin_key_exists(self) -> bool:
        with self._db.read() as conn:
            return _any_admin_key(conn)

    def _authorized_key(self, conn: Connection, actor: Principal, key_id: str) -> KeyInfo:
        row = (
            conn.execute(_key_query().where(api_keys.c.id == key_id)).mappings().one_or_none()
            if is_public_id(key_id)
            else None
        )
        if row is None:
            raise NotFound("No API key has this id.")
        info = _key_info(row)
        actor.require_tenant_admin_of(info.tenant_id)
        if info.role == ROLE_ADMIN and not _is_global_admin(actor):
            raise PermissionDenied("Only admin keys may manage admin keys.")
        return info

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


# ---------------------------------------------------------------------- rules


def _is_global_admin(actor: Principal) -> bool:
    return actor.role == ROLE_ADMIN and ACTION_ADMIN in actor.actions


def _require_manager(actor: Principal) -> None:
    """Only admin and tenant-admin keys holding the admin action manage anything."""
    if ACTION_ADMIN not in actor.actions or actor.role not in (ROLE_ADMIN, ROLE_TENANT_ADMIN):
        raise PermissionDenied("This API key may not manage tenants or keys.")


def _authorize_tenant(actor: Principal, row: RowMapping | None) -> RowMapping:
    """The tenant row if the actor may manage it; a missing tenant is 404 for admins only.

    Other actors get 403 either way, so they cannot probe which tenant names exist.
    """
    if row is None:
        if _is_global_admin(actor):
            raise NotFound("No tenant has this name.")
        raise PermissionDenied("This API key may not manage this tenant.")
    actor.require_tenant_admin_of(row["id"])
    return row


def _grant_actions(actor: Principal, role: str, actions: Sequence[str] | None) -> frozenset[str]:
    granted = validate_actions(role, actions)
    if _is_global_admin(actor):
        return granted
    if actions is None:
        # Defaults are narrowed to what the granting key holds itself.
        return granted & actor.actions
    if not granted <= actor.actions:
        raise PermissionDenied("A key cannot grant actions it does not hold.")
    return granted


def _grant_models(actor: Principal, models: Sequence[str] | None) -> tuple[str, ...]:
    if models is None:
        return ALL_MODELS if _is_global_admin(actor) else actor.models
    patterns = _validate_model_patterns(models)
    if not _is_global_admin(actor):
        for pattern in patterns:
            if not actor.covers_model_pattern(pattern):
                raise PermissionDenied("A key cannot grant models it may not use.")
    return patterns


def _grant_expiry(actor: Principal, expires_at: datetime | None) -> datetime | None:
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidRequest("expires_at must include a time zone.", param="expires_at")
        # A time in the past is allowed: the key is created already expired, which is
        # harmless and lets operators and tests check that expiry is enforced.
        expires_at = expires_at.astimezone(UTC)
    if _is_global_admin(actor) or actor.expires_at is None:
        return expires_at
    if expires_at is None:
        return actor.expires_at
    if expires_at > actor.expires_at:
        raise PermissionDenied("A key cannot outlive the key that creates it.")
    return expires_at


def _validate_tenant_name(name: str) -> None:
    if not isinstance(name, str) or TENANT_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidRequest(
            "Tenant names are 1-63 characters of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit.",
            param="name",
        )


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


def _validate_key_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name.isprintable() or len(name) > MAX_KEY_NAME_LENGTH:
        raise InvalidRequest(
            f"Key names are printable text of at most {MAX_KEY_NAME_LENGTH} characters.",
            param="name",
        )
    return name.strip() or None


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


def _tenant_info(row: RowMapping | dict[str, Any]) -> TenantInfo:
    return TenantInfo(
        id=row["id"],
        name=row["name"],
        disabled=bool(row["disabled"]),
        created_at=row["created_at"],
        disabled_at=row["disabled_at"],
    )


def _key_query() -> sa.Select[Any]:
    # Every column but the digest: key listings never carry it.
    return sa.select(
        api_keys.c.id,
        api_keys.c.tenant_id,
        tenants.c.name.label("tenant"),
        api_keys.c.name,
        api_keys.c.role,
        api_keys.c.models,
        api_keys.c.actions,
        api_keys.c.created_at,
        api_keys.c.expires_at,
        api_keys.c.revoked_at,
        api_keys.c.rotated_from,
    ).join(tenants, tenants.c.id == api_keys.c.tenant_id)


def _key_info(row: RowMapping) -> KeyInfo:
    return KeyInfo(
        id=row["id"],
        tenant_id=row["tenant_id"],
        tenant=row["tenant"],
        name=row["name"],
        role=row["role"],
        models=tuple(row["models"]),
        actions=tuple(row["actions"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        rotated_from=row["rotated_from"],
    )


def _any_admin_key(conn: Connection) -> bool:
    query = sa.select(api_keys.c.id).where(api_keys.c.role == ROLE_ADMIN).limit(1)
    return conn.execute(query).first() is not None


def _mark_revoked(conn: Connection, key_id: str, now: datetime) -> None:
    conn.execute(sa.update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now))


def _replace_revoked(info: KeyInfo, now: datetime) -> KeyInfo:
    return replace(info, revoked_at=now)
