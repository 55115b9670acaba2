"""The OHTTP key configurations a Bastion home serves: creation, rotation, retirement.

One key is *current*: it is published at ``/.well-known/ohttp-gateway`` and new clients
encrypt to it. :meth:`OhttpKeyStore.rotate` makes a new current key and keeps the old one
as *previous*, still accepted until its ``retire_at`` (the grace period), so clients that
fetched the configuration a moment ago are not cut off. Past that time the key is
*retired*: refused everywhere, and its private key is erased from the database.

Private keys are stored only in key ring envelopes (:mod:`bastion.crypto.keyring`) bound
to the key's id and fingerprint; the database alone never reveals them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from bastion.audit.events import (
    OHTTP_KEY_CREATED,
    OHTTP_KEY_RETIRED,
    OHTTP_KEY_ROTATED,
    EventSink,
    emit_change,
)
from bastion.crypto import hpke
from bastion.crypto.keyring import KeyRing
from bastion.crypto.ohttp import GatewayKey, KeyConfig
from bastion.errors import Conflict, InvalidRequest
from bastion.store.db import Database
from bastion.store.tables import ohttp_keys

DEFAULT_SUITES: tuple[tuple[int, int], ...] = (
    (hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),
    (hpke.KDF_HKDF_SHA256, hpke.AEAD_CHACHA20_POLY1305),
)
_ACCEPTED_STATES = ("current", "previous")


@dataclass(frozen=True, slots=True)
class OhttpKeyInfo:
    """What may be shown about a key: everything but its private half."""

    key_id: int
    kem_id: int
    suites: tuple[tuple[int, int], ...]
    public_key: bytes
    fingerprint: str
    state: str
    created_at: datetime
    retire_at: datetime | None
    retired_at: datetime | None

    def config(self) -> KeyConfig:
        return KeyConfig(
            key_id=self.key_id, kem_id=self.kem_id, public_key=self.public_key, suites=self.suites
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "kem_id": self.kem_id,
            "suites": [{"kdf_id": kdf, "aead_id": aead} for kdf, aead in self.suites],
            "public_key": self.public_key.hex(),
            "fingerprint": self.fingerprint,
            "state": self.state,
            "created_at": self.created_at.isoformat(),
            "retire_at": self.retire_at.isoformat() if self.retire_at else None,
            "retired_at": self.retired_at.isoformat() if self.retired_at else None,
        }


@dataclass(frozen=True, slots=True)
class ActiveKey:
    """A key that is accepted now, with its private half, for the gateway and its workers."""

    key: GatewayKey
    info: OhttpKeyInfo


def _context(key_id: int, fingerprint: str) -> str:
    return f"ohttp-key/{key_id}/{fingerprint}"


class OhttpKeyStore:
    """OHTTP keys in the database, sealed by a key ring."""

    def __init__(
        self,
        db: Database,
        keyring: KeyRing,
        events: EventSink,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._events = events
        self._clock = clock

    def ensure_current(self, actor: str) -> OhttpKeyInfo | None:
        """Create the first current key if there is none; returns it when created."""
        with self._db.read() as conn:
            exists = conn.execute(
                sa.select(ohttp_keys.c.id).where(ohttp_keys.c.state == "current")
            ).first()
        if exists is not None:
            return None
        with self._db.write() as conn:
            # Checked again inside the write transaction: two processes may race here.
            if conn.execute(
                sa.select(ohttp_keys.c.id).where(ohttp_keys.c.state == "current")
            ).first():
                return None
            info = self._insert_new(conn)
        emit_change(
            self._events,
            OHTTP_KEY_CREATED,
            actor,
            str(info.key_id),
            detail={"fingerprint": info.fingerprint},
            at=info.created_at.timestamp(),
        )
        return info

    def rotate(self, actor: str, grace: timedelta) -> OhttpKeyInfo:
        """Publish a new current key; the old ones stay accepted for at most `grace`."""
        if grace < timedelta(0):
            raise InvalidRequest("The grace period cannot be negative.", param="grace")
        now = self._clock()
        with self._db.write() as conn:
            conn.execute(
                ohttp_keys.update()
                .where(ohttp_keys.c.state == "current")
                .values(state="previous", retire_at=now + grace)
            )
            # No key stays accepted longer than the latest rotation allows: a rotation with
            # grace 0 (an exposed key) ends every older key's grace period too.
            conn.execute(
                ohttp_keys.update()
                .where(ohttp_keys.c.state == "previous", ohttp_keys.c.retire_at > now + grace)
                .values(retire_at=now + grace)
            )
            self._retire_due(conn, now)
            info = self._insert_new(conn)
        emit_change(
            self._events,
            OHTTP_KEY_ROTATED,
            actor,
            str(info.key_id),
            detail={"fingerprint": info.fingerprint, "grace_s": grace.total_seconds()},
            at=now.timestamp(),
        )
        return info

    def retire_expired(self, actor: str) -> list[OhttpKeyInfo]:
        """Retire previous keys whose grace period is over; returns them."""
        now = self._clock()
        with self._db.read() as conn:
            due = conn.execute(
                sa.select(ohttp_keys.c.id).where(
                    ohttp_keys.c.state == "previous", ohttp_keys.c.retire_at <= now
                )
            ).first()
        if due is None:
            return []
        with self._db.write() as conn:
            retired = self._retire_due(conn, now)
        for info in retired:
            emit_change(
                self._events,
                OHTTP_KEY_RETIRED,
                actor,
                str(info.key_id),
                detail={"fingerprint": info.fingerprint},
                at=now.timestamp(),
            )
        return retired

    def list_keys(self, *, include_retired: bool = True) -> list[OhttpKeyInfo]:
        """Keys, newest first."""
        query = sa.select(ohttp_keys).order_by(ohttp_keys.c.id.desc())
        if not include_retired:
            query = query.where(ohttp_keys.c.state.in_(_ACCEPTED_STATES))
        with self._db.read() as conn:
            return [_info(row) for row in conn.execute(query).mappings()]

    def rewrap_all(self) -> int:
        """Wrap every stored private key again under the key ring's current KEK (after a
        KEK rotation, or a move to another provider); returns how many were rewrapped."""
        with self._db.write(bump_revision=False) as conn:
            rows = list(
                conn.execute(
                    sa.select(
                        ohttp_keys.c.id,
                        ohttp_keys.c.key_id,
                        ohttp_keys.c.fingerprint,
                        ohttp_keys.c.private_envelope,
                    ).where(ohttp_keys.c.private_envelope.is_not(None))
                ).mappings()
            )
            for row in rows:
                context = _context(row["key_id"], row["fingerprint"])
                envelope = self._keyring.rewrap(bytes(row["private_envelope"]), context)
                conn.execute(
                    ohttp_keys.update()
                    .where(ohttp_keys.c.id == row["id"])
                    .values(private_envelope=envelope)
                )
        return len(rows)

    def active(self) -> list[ActiveKey]:
        """The keys accepted now (current first), with their private keys unsealed."""
        now = self._clock()
        query = (
            sa.select(ohttp_keys)
            .where(ohttp_keys.c.state.in_(_ACCEPTED_STATES))
            .order_by(ohttp_keys.c.id.desc())
        )
        with self._db.read() as conn:
            rows = list(conn.execute(query).mappings())
        keys: list[ActiveKey] = []
        for row in rows:
            info = _info(row)
            if info.retire_at is not None and info.retire_at <= now:
                continue
            secret = self._keyring.open(
                row["private_envelope"], _context(info.key_id, info.fingerprint)
            )
            private = hpke.PrivateKey.from_bytes(info.kem_id, secret)
            key = GatewayKey(key_id=info.key_id, private_key=private, suites=info.suites)
            keys.append(ActiveKey(key=key, info=info))
        keys.sort(key=lambda k: k.info.state != "current")
        return keys

    # ------------------------------------------------------------------ internals

    def _insert_new(self, conn: sa.Connection) -> OhttpKeyInfo:
        taken = set(
            conn.execute(
                sa.select(ohttp_keys.c.key_id).where(ohttp_keys.c.state.in_(_ACCEPTED_STATES))
            ).scalars()
        )
        last = conn.execute(sa.select(sa.func.max(ohttp_keys.c.id))).scalar()
        previous_id = -1
        if last is not None:
            previous_id = conn.execute(
                sa.select(ohttp_keys.c.key_id).where(ohttp_keys.c.id == last)
            ).scalar_one()
        # The next id after the last one used, skipping ids of keys still accepted: a
        # retired key's id comes back as late as possible.
        key_id = next(
            (
                candidate % 256
                for candidate in range(previous_id + 1, previous_id + 257)
                if candidate % 256 not in taken
            ),
            None,
        )
        if key_id is None:
            raise Conflict(
                "All 256 OHTTP key ids belong to keys still accepted; rotate with --grace 0 "
                "to retire the older ones."
            )
        key = GatewayKey.generate(key_id, suites=DEFAULT_SUITES)
        config = key.config()
        fingerprint = config.fingerprint()
        now = self._clock()
        envelope = self._keyring.seal(key.private_key.to_bytes(), _context(key_id, fingerprint))
        conn.execute(
            ohttp_keys.insert().values(
                key_id=key_id,
                kem_id=config.kem_id,
                suites=[list(s) for s in config.suites],
                public_key=config.public_key,
                private_envelope=envelope,
                fingerprint=fingerprint,
                state="current",
                created_at=now,
            )
        )
        return OhttpKeyInfo(
            key_id=key_id,
            kem_id=config.kem_id,
            suites=tuple(config.suites),
            public_key=config.public_key,
            fingerprint=fingerprint,
            state="current",
            created_at=now,
            retire_at=None,
            retired_at=None,
        )

    def _retire_due(self, conn: sa.Connection, now: datetime) -> list[OhttpKeyInfo]:
        due = [
            _info(row)
            for row in conn.execute(
                sa.select(ohttp_keys).where(
                    ohttp_keys.c.state == "previous", ohttp_keys.c.retire_at <= now
                )
            ).mappings()
        ]
        if due:
            conn.execute(
                ohttp_keys.update()
                .where(ohttp_keys.c.state == "previous", ohttp_keys.c.retire_at <= now)
                .values(state="retired", retired_at=now, private_envelope=None)
            )
        return due


def _info(row: sa.RowMapping) -> OhttpKeyInfo:
    return OhttpKeyInfo(
        key_id=row["key_id"],
        kem_id=row["kem_id"],
        suites=tuple((int(kdf), int(aead)) for kdf, aead in row["suites"]),
        public_key=bytes(row["public_key"]),
        fingerprint=row["fingerprint"],
        state=row["state"],
        created_at=row["created_at"],
        retire_at=row["retire_at"],
        retired_at=row["retired_at"],
    )
