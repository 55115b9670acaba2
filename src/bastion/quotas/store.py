"""Quotas per tenant and per API key, stored in the database: one service for the admin API
and the CLI.

A tenant's quota applies to all its keys together; a key's quota to that key alone; a
request must fit both. A single sign-on user's quota is a key quota on its principal's key
id (``jwt:<issuer host>:<subject>``), which needs no record of its own: only admins set and
read those. Values not set on a tenant come from the tenant ``*`` (the defaults
of every tenant), then mean "no limit". Only admin keys change quotas; a tenant's admins
may read their own tenant's. Every change bumps the database revision (running gateways
pick it up within their refresh interval) and records a ``quota.changed`` event.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from bastion.audit.events import QUOTA_CHANGED, EventSink, emit_change
from bastion.errors import InvalidRequest, NotFound, PermissionDenied
from bastion.identity.grants import (
    KEY_NOT_FOUND,
    TENANT_NAME_PATTERN,
    TENANT_NOT_FOUND,
    is_global_admin,
    not_found,
)
from bastion.identity.keys import is_public_id
from bastion.identity.principal import SSO_KEY_PREFIX, Principal
from bastion.quotas.limiter import QuotaLimits
from bastion.store.db import Database
from bastion.store.tables import api_keys, quotas, tenants

DEFAULT_TENANT = "*"
# The longest key id of a single sign-on user a quota may name.
MAX_SSO_SUBJECT = 512
TENANT, KEY = "tenant", "key"
# The limits a quota may set, in QuotaLimits' order; `weight` is the fair-queue share.
LIMIT_FIELDS = tuple(f.name for f in fields(QuotaLimits))
MAX_WEIGHT = 1000.0


@dataclass(frozen=True, slots=True)
class Quota:
    """What is stored for one tenant or key; None: not set (inherit, or no limit)."""

    kind: str
    subject: str
    limits: QuotaLimits = field(default_factory=QuotaLimits)
    weight: float | None = None
    updated_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            **asdict(self.limits),
            "weight": self.weight,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


@dataclass(frozen=True, slots=True)
class QuotaTable:
    """Every stored quota, as a gateway caches it between refreshes."""

    tenants: Mapping[str, Quota]
    keys: Mapping[str, Quota]

    def tenant_limits(self, tenant: str) -> QuotaLimits:
        """The tenant's own values, each missing one taken from the defaults (tenant *)."""
        own = self.tenants.get(tenant)
        default = self.tenants.get(DEFAULT_TENANT)
        if default is None:
            return own.limits if own else QuotaLimits()
        if own is None:
            return default.limits
        merged = {
            name: getattr(own.limits, name)
            if getattr(own.limits, name) is not None
            else getattr(default.limits, name)
            for name in LIMIT_FIELDS
        }
        return QuotaLimits(**merged)

    def key_limits(self, key_id: str) -> QuotaLimits | None:
        quota = self.keys.get(key_id)
        return quota.limits if quota else None

    def weight(self, tenant: str) -> float:
        for name in (tenant, DEFAULT_TENANT):
            quota = self.tenants.get(name)
            if quota is not None and quota.weight is not None:
                return quota.weight
        return 1.0


EMPTY_TABLE = QuotaTable(tenants={}, keys={})


class QuotaStore:
    """Read and change quotas on behalf of a principal."""

    def __init__(
        self, db: Database, events: EventSink, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._db = db
        self._events = events
        self._clock = clock

    def table(self) -> QuotaTable:
        """Every quota (for the gateway; no authorization: it is not a caller's view)."""
        with self._db.read() as conn:
            rows = [_quota(row) for row in conn.execute(sa.select(quotas)).mappings()]
        return QuotaTable(
            tenants={q.subject: q for q in rows if q.kind == TENANT},
            keys={q.subject: q for q in rows if q.kind == KEY},
        )

    def list(self, actor: Principal, tenant: str | None = None) -> list[Quota]:
        """Quotas the actor may read: all (admins), or its own tenant's and its keys'."""
        if not is_global_admin(actor):
            _require_reader(actor)
            if tenant not in (None, actor.tenant_name):
                # Another tenant is "not found", like one that does not exist.
                raise not_found(actor, TENANT_NOT_FOUND)
            tenant = actor.tenant_name
        query = sa.select(quotas).order_by(quotas.c.kind.desc(), quotas.c.subject)
        with self._db.read() as conn:
            rows = [_quota(row) for row in conn.execute(query).mappings()]
            if tenant is None:
                return rows
            own_keys = set(
                conn.execute(
                    sa.select(api_keys.c.id)
                    .join(tenants, tenants.c.id == api_keys.c.tenant_id)
                    .where(tenants.c.name == tenant)
                ).scalars()
            )
        return [
            q
            for q in rows
            if (q.kind == TENANT and q.subject == tenant)
            or (q.kind == KEY and q.subject in own_keys)
        ]

    def get(self, actor: Principal, kind: str, subject: str) -> Quota:
        """One subject's stored quota (empty when nothing is set)."""
        _check_kind(kind)
        if not is_global_admin(actor):
            _require_reader(actor)
        with self._db.read() as conn:
            try:
                owner = _owner(conn, kind, subject)
            except NotFound as exc:
                # Missing, for a tenant's admin, answers as another tenant's does.
                raise not_found(actor, exc.message) from None
            _authorize_read(actor, kind, owner)
            row = _row(conn, kind, subject)
        return _quota(row) if row is not None else Quota(kind=kind, subject=subject)

    def set(
        self,
        actor: Principal,
        kind: str,
        subject: str,
        changes: Mapping[str, int | float | None],
    ) -> Quota:
        """Set (a value) or clear (None) the named limits; the others are kept."""
        actor.require_admin()
        _check_kind(kind)
        unknown = set(changes) - {*LIMIT_FIELDS, "weight"}
        if unknown:
            raise InvalidRequest(f"Unknown quota field(s): {', '.join(sorted(unknown))}.")
        if "weight" in changes and kind != TENANT:
            raise InvalidRequest("Only tenants have a fair-queue weight.", param="weight")
        values = {name: _checked(name, value) for name, value in changes.items()}
        now = datetime.fromtimestamp(self._clock(), UTC)
        with self._db.write() as conn:
            _owner(conn, kind, subject)
            row = _row(conn, kind, subject)
            current = _quota(row) if row is not None else Quota(kind=kind, subject=subject)
            limit_values = {k: v for k, v in values.items() if k != "weight"}
            limits = replace(current.limits, **limit_values)  # type: ignore[arg-type]
            weight = values.get("weight", current.weight)
            updated = Quota(kind, subject, limits, weight, now)
            record = {**asdict(limits), "weight": weight, "updated_at": now}
            if row is None:
                conn.execute(sa.insert(quotas).values(kind=kind, subject=subject, **record))
            else:
                conn.execute(
                    sa.update(quotas)
                    .where(quotas.c.kind == kind, quotas.c.subject == subject)
                    .values(**record)
                )
        self._emit(actor, kind, subject, values)
        return updated

    def remove(self, actor: Principal, kind: str, subject: str) -> None:
        """Forget every limit of the subject (tenants fall back to the defaults)."""
        actor.require_admin()
        _check_kind(kind)
        with self._db.write() as conn:
            deleted = conn.execute(
                sa.delete(quotas).where(quotas.c.kind == kind, quotas.c.subject == subject)
            ).rowcount
        if not deleted:
            raise NotFound(f"No quota is set for this {kind}.")
        self._emit(actor, kind, subject, {"removed": True})

    def _emit(self, actor: Principal, kind: str, subject: str, detail: Mapping[str, Any]) -> None:
        """One `quota.changed` event: a key's id as its target, a tenant's name as tenant."""
        emit_change(
            self._events,
            QUOTA_CHANGED,
            actor.actor,
            subject if kind == KEY else None,
            tenant=subject if kind == TENANT else None,
            detail={"kind": kind, **detail},
            at=self._clock(),
        )


def _check_kind(kind: str) -> None:
    if kind not in (TENANT, KEY):
        raise InvalidRequest("A quota is set on a tenant or on a key.", param="kind")


def _checked(name: str, value: int | float | None) -> int | float | None:
    if value is None:
        return None
    if name == "weight":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest("weight must be a number.", param="weight")
        if not math.isfinite(value) or not 0 < value <= MAX_WEIGHT:
            raise InvalidRequest(
                f"weight must be above 0 and at most {MAX_WEIGHT:g}.", param="weight"
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be a whole number.", param=name)
    if value < 0 or value > 2**62:
        raise InvalidRequest(f"{name} must be between 0 and 2^62.", param=name)
    return value


def _row(conn: Connection, kind: str, subject: str) -> RowMapping | None:
    return (
        conn.execute(sa.select(quotas).where(quotas.c.kind == kind, quotas.c.subject == subject))
        .mappings()
        .first()
    )


def _owner(conn: Connection, kind: str, subject: str) -> str | None:
    """The tenant that owns the subject (None for the defaults); 404 if it does not exist."""
    if kind == TENANT:
        if subject == DEFAULT_TENANT:
            return None
        if TENANT_NAME_PATTERN.fullmatch(subject) is not None:
            found = conn.execute(
                sa.select(tenants.c.name).where(tenants.c.name == subject)
            ).scalar()
            if found is not None:
                return str(found)
        raise NotFound(TENANT_NOT_FOUND)
    if is_sso_user(subject):
        return None  # no record names its tenant: an admin's alone, as the defaults
    if is_public_id(subject):
        found = conn.execute(
            sa.select(tenants.c.name)
            .join(api_keys, tenants.c.id == api_keys.c.tenant_id)
            .where(api_keys.c.id == subject)
        ).scalar()
        if found is not None:
            return str(found)
    raise NotFound(KEY_NOT_FOUND)


def is_sso_user(subject: str) -> bool:
    """Whether a key quota's subject names a single sign-on user (its principal's key id)."""
    return (
        subject.startswith(SSO_KEY_PREFIX)
        and len(SSO_KEY_PREFIX) < len(subject) <= MAX_SSO_SUBJECT
        and subject.isprintable()
    )


def _require_reader(actor: Principal) -> None:
    if "admin" not in actor.actions:
        raise PermissionDenied("This API key may not read quotas.")


def _authorize_read(actor: Principal, kind: str, owner: str | None) -> None:
    if is_global_admin(actor) or owner == actor.tenant_name:
        return
    if owner is None:
        if kind == KEY:
            # A single sign-on user's: like a key of another tenant.
            raise not_found(actor, KEY_NOT_FOUND)
        # The defaults ('*'), which exist everywhere: only admins read them.
        raise PermissionDenied("This API key may not read the default quotas.")
    # Another tenant's, answered as if it did not exist (see _owner).
    raise not_found(actor, TENANT_NOT_FOUND if kind == TENANT else KEY_NOT_FOUND)


def _quota(row: RowMapping) -> Quota:
    return Quota(
        kind=row["kind"],
        subject=row["subject"],
        limits=QuotaLimits(**{name: row[name] for name in LIMIT_FIELDS}),
        weight=row["weight"],
        updated_at=row["updated_at"],
    )
