"""The model registry: which models exist, how to run them, and whether to load them.

Records live in the database, so the CLI and every gateway see the same registry; each
change bumps the database's change revision, and gateways reconcile their workers with the
``desired_state`` they read. Changes are admin-only and each one emits an audit event.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping

from bastion.audit.events import (
    MODEL_LOAD_REQUESTED,
    MODEL_REGISTERED,
    MODEL_REMOVED,
    MODEL_UNLOAD_REQUESTED,
    PROTECT_POLICY_CHANGED,
    EventSink,
    emit_change,
)
from bastion.config import check_limit_options, check_replica_options
from bastion.errors import ConfigurationError, Conflict, InvalidRequest, ModelNotFound
from bastion.identity.principal import Principal
from bastion.protection.policy import PROTECT_PREFIX, check_protection_options
from bastion.runtimes.base import RUNTIMES
from bastion.sandboxes.base import check_sandbox_option
from bastion.store.db import Database
from bastion.store.tables import DESIRED_STATES
from bastion.store.tables import models as models_table
from bastion.wire.batching import check_batch_options

MODEL_NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}")
MAX_DESCRIPTION_LENGTH = 2000
MAX_PATH_LENGTH = 4096
# Options are small runtime settings, not data; the cap keeps rows small.
MAX_OPTIONS_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One registered model."""

    name: str
    runtime: str
    path: str
    options: Mapping[str, Any]
    desired_state: str
    description: str
    created_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "runtime": self.runtime,
            "path": self.path,
            "options": dict(self.options),
            "desired_state": self.desired_state,
            "description": self.description,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


class ModelRegistry:
    """Register, list, load, unload and remove models, on behalf of a principal."""

    def __init__(
        self,
        db: Database,
        events: EventSink,
        *,
        clock: Callable[[], float] = time.time,
        extra_runtimes: Mapping[str, str] | None = None,
    ) -> None:
        self._db = db
        self._events = events
        self._clock = clock
        # The operator's own runtimes (BASTION_EXTRA_RUNTIMES) beside the built-in ones.
        self.runtimes = {**(extra_runtimes or {}), **RUNTIMES}

    def register(
        self,
        actor: Principal,
        *,
        name: str,
        runtime: str,
        path: str,
        options: Mapping[str, Any] | None = None,
        description: str = "",
        desired_state: str = "loaded",
        replace: bool = False,
    ) -> ModelRecord:
        """Add a model (admin only); Conflict if the name is taken, unless `replace`."""
        actor.require_admin()
        validate_model_name(name)
        if runtime not in self.runtimes:
            raise InvalidRequest(
                f"Unknown runtime; expected one of {', '.join(sorted(self.runtimes))}.",
                param="runtime",
            )
        _validate_desired_state(desired_state)
        if not isinstance(path, str) or not path or len(path) > MAX_PATH_LENGTH or "\0" in path:
            raise InvalidRequest("The model path must be a non-empty path.", param="path")
        if (
            not isinstance(description, str)
            or len(description) > MAX_DESCRIPTION_LENGTH
            # PostgreSQL refuses a NUL in text (SQLite kept it).
            or "\0" in description
        ):
            raise InvalidRequest(
                f"The description must be text of at most {MAX_DESCRIPTION_LENGTH} characters.",
                param="description",
            )
        checked_options = _validate_options(options)
        now = self._now()
        values: dict[str, Any] = {
            "runtime": runtime,
            "path": path,
            "options": checked_options,
            "desired_state": desired_state,
            "description": description,
            "updated_at": now,
        }
        try:
            with self._db.write() as conn:
                existing = _row(conn, name)
                if existing is not None and not replace:
                    raise Conflict("A model with this name already exists.", param="name")
                if existing is None:
                    conn.execute(
                        sa.insert(models_table).values(name=name, created_at=now, **values)
                    )
                    created_at = now
                else:
                    conn.execute(
                        sa.update(models_table).where(models_table.c.name == name).values(**values)
                    )
                    created_at = existing["created_at"]
        except sa.exc.IntegrityError as exc:  # a concurrent register won the race
            raise Conflict("A model with this name already exists.", param="name") from exc
        record = ModelRecord(
            name=name,
            runtime=runtime,
            path=path,
            options=checked_options,
            desired_state=desired_state,
            description=description,
            created_at=created_at,
            updated_at=now,
        )
        emit_change(
            self._events,
            MODEL_REGISTERED,
            actor.actor,
            name,
            detail={
                "runtime": runtime,
                "replaced": existing is not None,
                "desired_state": desired_state,
            },
            at=self._clock(),
        )
        return record

    def list(self) -> list[ModelRecord]:
        """Every registered model, by name."""
        with self._db.read() as conn:
            rows = conn.execute(sa.select(models_table).order_by(models_table.c.name)).mappings()
            return [_record(row) for row in rows]

    def get(self, name: str) -> ModelRecord:
        """One model; ModelNotFound if no model has this name."""
        with self._db.read() as conn:
            row = _row(conn, name)
        if row is None:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        return _record(row)

    def set_desired_state(self, actor: Principal, name: str, state: str) -> ModelRecord:
        """Ask gateways to load ("loaded") or unload ("unloaded") a model (admin only).

        Asking again for the current state still counts as a change, so a model that
        failed to load can be retried with another "loaded".
        """
        actor.require_admin()
        _validate_desired_state(state)
        now = self._now()
        with self._db.write() as conn:
            row = _row(conn, name)
            if row is None:
                raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
            conn.execute(
                sa.update(models_table)
                .where(models_table.c.name == name)
                .values(desired_state=state, updated_at=now)
            )
            record = _record({**row, "desired_state": state, "updated_at": now})
        kind = MODEL_LOAD_REQUESTED if state == "loaded" else MODEL_UNLOAD_REQUESTED
        emit_change(self._events, kind, actor.actor, name, at=self._clock())
        return record

    def set_protection(
        self, actor: Principal, name: str, changes: Mapping[str, str | None]
    ) -> ModelRecord:
        """Set (a value) or reset to the default (None) a model's protection options, the
        ``protect.*`` keys of its options (admin only). A running server restarts its
        worker with the new policy."""
        actor.require_admin()
        unknown = [key for key in changes if not key.startswith(PROTECT_PREFIX)]
        if unknown:
            raise InvalidRequest(f"Not a protection option: {unknown[0]}.", param="options")
        now = self._now()
        with self._db.write() as conn:
            row = _row(conn, name)
            if row is None:
                raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
            options = dict(_record(row).options)
            for key, value in changes.items():
                if value is None:
                    options.pop(key, None)
                else:
                    options[key] = value
            checked = _validate_options(options)
            conn.execute(
                sa.update(models_table)
                .where(models_table.c.name == name)
                .values(options=checked, updated_at=now)
            )
            record = _record({**row, "options": checked, "updated_at": now})
        detail = {key: value if value is not None else "default" for key, value in changes.items()}
        emit_change(
            self._events, PROTECT_POLICY_CHANGED, actor.actor, name, detail=detail, at=self._clock()
        )
        return record

    def remove(self, actor: Principal, name: str) -> None:
        """Remove a model from the registry (admin only); gateways then unload it."""
        actor.require_admin()
        with self._db.write() as conn:
            deleted = conn.execute(
                sa.delete(models_table).where(models_table.c.name == name)
            ).rowcount
            if not deleted:
                raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        emit_change(self._events, MODEL_REMOVED, actor.actor, name, at=self._clock())

    # ------------------------------------------------------------------ internals

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)


def validate_model_name(name: str) -> None:
    """Raise InvalidRequest unless `name` is a valid model name."""
    if not isinstance(name, str) or MODEL_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidRequest(
            "Model names are 1-64 characters of letters, digits, '.', '_' and '-', "
            "starting with a letter or digit.",
            param="name",
        )


def _validate_desired_state(state: str) -> None:
    if state not in DESIRED_STATES:
        raise InvalidRequest("desired_state must be 'loaded' or 'unloaded'.", param="desired_state")


def _validate_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON object of small size; returned as a plain dict as it will be stored."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise InvalidRequest("options must be a JSON object.", param="options")
    try:
        encoded = json.dumps(dict(options), allow_nan=False)
    except (TypeError, ValueError):
        raise InvalidRequest("options must be JSON-serialisable.", param="options") from None
    if len(encoded) > MAX_OPTIONS_BYTES:
        raise InvalidRequest("options are too large.", param="options")
    decoded: dict[str, Any] = json.loads(encoded)
    try:
        check_sandbox_option(decoded)
        check_limit_options(decoded)
        check_replica_options(decoded)
        check_protection_options(decoded)
        check_batch_options(decoded)
    except ConfigurationError as exc:
        raise InvalidRequest(exc.message, param="options") from None
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="options") from None
    return decoded


def _row(conn: sa.Connection, name: str) -> RowMapping | None:
    if not isinstance(name, str) or MODEL_NAME_PATTERN.fullmatch(name) is None:
        return None
    query = sa.select(models_table).where(models_table.c.name == name)
    return conn.execute(query).mappings().one_or_none()


def _record(row: RowMapping | dict[str, Any]) -> ModelRecord:
    return ModelRecord(
        name=row["name"],
        runtime=row["runtime"],
        path=row["path"],
        options=dict(row["options"]),
        desired_state=row["desired_state"],
        description=row["description"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
