"""Tenants and API keys as operators see them, and how they are read from database rows.

The records never hold a secret or a key digest: the query that lists keys does not even
select the digest column, so nothing built from its rows can leak it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping

from bastion.store.tables import api_keys, tenants


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


def tenant_info(row: RowMapping | dict[str, Any]) -> TenantInfo:
    """The record of a row of the tenants table."""
    return TenantInfo(
        id=row["id"],
        name=row["name"],
        disabled=bool(row["disabled"]),
        created_at=row["created_at"],
        disabled_at=row["disabled_at"],
    )


def key_query() -> sa.Select[Any]:
    """Keys joined with their tenant's name, with every column but the digest."""
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


def key_info(row: RowMapping) -> KeyInfo:
    """The record of a row that :func:`key_query` selected."""
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
