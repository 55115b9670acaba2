"""Protection settings per tenant or API key: a trusted partner served full scores, a
load-testing key never blocked, a tenant whose answers carry no watermark.

An override names a tenant or a key, a model or every model (``*``), and some of the
model's ``protect.*`` settings (:data:`OVERRIDABLE`). For a request, the model's own
settings are overlaid by its tenant's (every model, then that model), then by its key's
(likewise). Changes are admin only, bump the revision (every gateway picks them up at its
next refresh) and are events (``protect.override_changed``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from bastion.audit.events import PROTECT_OVERRIDE_CHANGED, EventSink, emit_change
from bastion.errors import InvalidRequest, NotFound
from bastion.identity.principal import Principal
from bastion.protection.policy import check_protection_options
from bastion.store.db import Database
from bastion.store.tables import protect_overrides

TENANT, KEY, ALL_MODELS = "tenant", "key", "*"
# What a tenant or key may have of its own; the rest is the model's alone.
OVERRIDABLE = frozenset(
    {"output", "monitor", "alert_at", "throttle_at", "block_at", "throttle_rps", "watermark"}
)


@dataclass(frozen=True, slots=True)
class Override:
    kind: str
    subject: str
    model: str
    options: dict[str, str]

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "subject": self.subject, "model": self.model, **self.options}


class OverrideTable:
    """Every override, as a gateway holds them between refreshes."""

    def __init__(self, overrides: list[Override] | None = None) -> None:
        self._by = {(o.kind, o.subject, o.model): o.options for o in overrides or []}

    def __bool__(self) -> bool:
        return bool(self._by)

    def resolve(self, tenant: str, key: str, model: str) -> dict[str, str]:
        """The protect.* options a caller's requests to `model` get on top of the model's."""
        if not self._by:
            return {}
        merged: dict[str, str] = {}
        for scope in ((TENANT, tenant), (KEY, key)):
            for where in (ALL_MODELS, model):
                merged.update(self._by.get((*scope, where), {}))
        return {f"protect.{name}": value for name, value in merged.items()}


class OverrideStore:
    """Reads and changes the ``protect_overrides`` table."""

    def __init__(self, db: Database, events: EventSink) -> None:
        self._db = db
        self._events = events

    def list(self) -> list[Override]:
        with self._db.read() as conn:
            rows = conn.execute(sa.select(protect_overrides)).mappings().all()
        return [
            Override(row["kind"], row["subject"], row["model"], json.loads(row["options"]))
            for row in rows
        ]

    def table(self) -> OverrideTable:
        return OverrideTable(self.list())

    def set(
        self,
        actor: Principal,
        kind: str,
        subject: str,
        model: str,
        changes: Mapping[str, str | None],
    ) -> Override:
        """Set (a value) or drop (None) settings of one override (admin only)."""
        actor.require_admin()
        if kind not in (TENANT, KEY):
            raise InvalidRequest("An override is for a tenant or a key.", param="kind")
        if not 0 < len(subject) <= 64 or not 0 < len(model) <= 64 or "\0" in subject + model:
            raise InvalidRequest("A tenant, key or model name is 1 to 64 characters.")
        unknown = sorted(set(changes) - OVERRIDABLE)
        if unknown:
            raise InvalidRequest(
                f"{unknown[0]} cannot be set per tenant or key; these can: "
                + ", ".join(sorted(OVERRIDABLE)),
                param="options",
            )
        where = (
            (protect_overrides.c.kind == kind)
            & (protect_overrides.c.subject == subject)
            & (protect_overrides.c.model == model)
        )
        with self._db.write() as conn:
            row = conn.execute(sa.select(protect_overrides.c.options).where(where)).first()
            options: dict[str, str] = json.loads(row.options) if row is not None else {}
            for name, value in changes.items():
                if value is None:
                    options.pop(name, None)
                else:
                    options[name] = value
            try:
                check_protection_options({f"protect.{k}": v for k, v in options.items()})
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="options") from None
            conn.execute(sa.delete(protect_overrides).where(where))
            if options:
                conn.execute(
                    sa.insert(protect_overrides).values(
                        kind=kind,
                        subject=subject,
                        model=model,
                        options=json.dumps(options, sort_keys=True),
                        updated_at=datetime.now(UTC),
                    )
                )
        detail: dict[str, str | int | float | bool | None] = {"kind": kind, "model": model}
        detail.update({k: v if v is not None else "default" for k, v in changes.items()})
        emit_change(
            self._events,
            PROTECT_OVERRIDE_CHANGED,
            actor.actor,
            subject,
            detail=detail,
            at=datetime.now(UTC).timestamp(),
        )
        return Override(kind, subject, model, options)

    def remove(self, actor: Principal, kind: str, subject: str, model: str) -> None:
        actor.require_admin()
        where = (
            (protect_overrides.c.kind == kind)
            & (protect_overrides.c.subject == subject)
            & (protect_overrides.c.model == model)
        )
        with self._db.write() as conn:
            if not conn.execute(sa.delete(protect_overrides).where(where)).rowcount:
                raise NotFound(f"No protection override for {kind} {subject} on {model}.")
        emit_change(
            self._events,
            PROTECT_OVERRIDE_CHANGED,
            actor.actor,
            subject,
            detail={"kind": kind, "model": model, "removed": True},
            at=datetime.now(UTC).timestamp(),
        )
