"""The OHTTP key configurations a Bastion home serves: creation, rotation, retirement.

Each KEM the server offers (``BASTION_OHTTP_KEMS``: the post-quantum hybrid
MLKEM768-X25519 and classical X25519 by default) has one *current* key: the current keys
are published at ``/.well-known/ohttp-gateway``, the preferred KEM first, and new clients
encrypt to one of them. :meth:`OhttpKeyStore.rotate` makes a new current key and keeps the
old one as *previous*, still accepted until its ``retire_at`` (the grace period), so
clients that fetched the configuration a moment ago are not cut off. Past that time the
key is *retired*: refused everywhere, and its private key is erased from the database.

Private keys are stored only in key ring envelopes (:mod:`bastion.crypto.keyring`) bound
to the key's id and fingerprint; the database alone never reveals them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from bastion.config import Settings
from bastion.crypto import hpke
from bastion.crypto.keyring import KeyRing
from bastion.crypto.ohttp import GatewayKey, KeyConfig
from bastion.errors import ConfigurationError, Conflict, InvalidRequest
from bastion.store.db import Database
from bastion.store.tables import ohttp_keys

DEFAULT_SUITES: tuple[tuple[int, int], ...] = (
    (hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),
    (hpke.KDF_HKDF_SHA256, hpke.AEAD_CHACHA20_POLY1305),
)
_ACCEPTED_STATES = ("current", "previous")
# The KEMs a server offers unless told otherwise, preferred first.
DEFAULT_KEMS: tuple[int, ...] = (hpke.KEM_MLKEM768_X25519, hpke.KEM_X25519_SHA256)


def offered_kems(settings: Settings) -> tuple[int, ...]:
    """The KEMs `BASTION_OHTTP_KEMS` names, preferred first; only the post-quantum ones when
    `BASTION_OHTTP_REQUIRE_PQ` is on. ConfigurationError for an unknown name, or when
    nothing is left."""
    kems: list[int] = []
    for name in settings.ohttp_kems.split(","):
        name = name.strip().lower()
        if not name:
            continue
        kem_id = hpke.KEM_NAMES.get(name)
        if kem_id is None:
            raise ConfigurationError(
                f"BASTION_OHTTP_KEMS: unknown KEM {name[:40]!r}; known: "
                f"{', '.join(hpke.KEM_NAMES)}."
            )
        if kem_id not in kems:
            kems.append(kem_id)
    if settings.ohttp_require_pq:
        kems = [k for k in kems if hpke.is_post_quantum(k)]
    if not kems:
        raise ConfigurationError(
            "BASTION_OHTTP_KEMS names no KEM"
            + (
                " that is post-quantum, as BASTION_OHTTP_REQUIRE_PQ asks"
                if settings.ohttp_require_pq
                else ""
            )
            + f"; known: {', '.join(hpke.KEM_NAMES)}."
        )
    return tuple(kems)


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

    @property
    def kem(self) -> str:
        """The KEM's name: mlkem768-x25519 (post-quantum hybrid), mlkem768 or x25519."""
        return hpke.kem_name(self.kem_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "kem": self.kem,
            "post_quantum": hpke.is_post_quantum(self.kem_id),
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
        kems: Sequence[int] = DEFAULT_KEMS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._events = events
        self._clock = clock
        # The KEMs that get a current key, preferred first.
        self.kems = tuple(kems)

    def ensure_current(self, actor: str) -> list[OhttpKeyInfo]:
        """Create a current key for each offered KEM that has none; returns those created."""
        if not self._missing_kems():
            return []
        with self._db.write() as conn:
            # Checked again inside the write transaction: two processes may race here.
            created = [self._insert_new(conn, kem_id) for kem_id in self._missing_kems(conn)]
        for info in created:
            emit_change(
                self._events,
                OHTTP_KEY_CREATED,
                actor,
                str(info.key_id),
                detail={"fingerprint": info.fingerprint, "kem": info.kem},
                at=info.created_at.timestamp(),
            )
        return created

    def _missing_kems(self, conn: sa.Connection | None = None) -> list[int]:
        query = sa.select(ohttp_keys.c.kem_id).where(ohttp_keys.c.state == "current")
        if conn is None:
            with self._db.read() as reader:
                present = set(reader.execute(query).scalars())
        else:
            present = set(conn.execute(query).scalars())
        return [kem_id for kem_id in self.kems if kem_id not in present]

    def rotate(self, actor: str, grace: timedelta, kem_id: int | None = None) -> list[OhttpKeyInfo]:
        """Publish a new current key for `kem_id` (None: for every offered KEM); the old
        ones of that KEM stay accepted for at most `grace`. Returns the new keys."""
        if grace < timedelta(0):
            raise InvalidRequest("The grace period cannot be negative.", param="grace")
        if kem_id is not None and kem_id not in self.kems:
            offered = ", ".join(hpke.kem_name(k) for k in self.kems)
            raise InvalidRequest(
                f"This server does not offer the {hpke.kem_name(kem_id)} KEM (offered: "
                f"{offered}; see BASTION_OHTTP_KEMS).",
                param="kem",
            )
        kems = self.kems if kem_id is None else (kem_id,)
        now = self._clock()
        with self._db.write() as conn:
            for kem in kems:
                self._demote(conn, kem, now + grace)
            self._retire_due(conn, now)
            created = [self._insert_new(conn, kem) for kem in kems]
        self._emit(OHTTP_KEY_ROTATED, actor, created, grace, now)
        return created

    def retire_kem(self, actor: str, kem_id: int, grace: timedelta) -> list[OhttpKeyInfo]:
        """Stop using a KEM's keys once the server no longer offers it (BASTION_OHTTP_KEMS,
        BASTION_OHTTP_REQUIRE_PQ): they are neither published nor accepted any more, but
        stay in the database, private keys included, until retired. Its keys are retired
        after `grace` (0: now); returns the keys whose retirement this scheduled."""
        if grace < timedelta(0):
            raise InvalidRequest("The grace period cannot be negative.", param="grace")
        if kem_id in self.kems:
            raise InvalidRequest(
                f"This server offers the {hpke.kem_name(kem_id)} KEM: rotate its key instead, "
                "or take it out of BASTION_OHTTP_KEMS first.",
                param="kem",
            )
        now = self._clock()
        with self._db.write() as conn:
            affected = [
                _info(row)
                for row in conn.execute(
                    sa.select(ohttp_keys).where(
                        ohttp_keys.c.kem_id == kem_id, ohttp_keys.c.state.in_(_ACCEPTED_STATES)
                    )
                ).mappings()
            ]
            self._demote(conn, kem_id, now + grace)
            self._retire_due(conn, now)
        self._emit(OHTTP_KEY_RETIRED, actor, affected, grace, now)
        return affected

    def _demote(self, conn: sa.Connection, kem_id: int, retire_at: datetime) -> None:
        """The current key of `kem_id` becomes previous until `retire_at`; no older key of
        that KEM stays accepted longer (a rotation with grace 0, after a key was exposed,
        ends every older key's grace period too)."""
        of_kem = ohttp_keys.c.kem_id == kem_id
        conn.execute(
            ohttp_keys.update()
            .where(of_kem, ohttp_keys.c.state == "current")
            .values(state="previous", retire_at=retire_at)
        )
        conn.execute(
            ohttp_keys.update()
            .where(of_kem, ohttp_keys.c.state == "previous", ohttp_keys.c.retire_at > retire_at)
            .values(retire_at=retire_at)
        )

    def _emit(
        self,
        kind: str,
        actor: str,
        infos: Sequence[OhttpKeyInfo],
        grace: timedelta,
        now: datetime,
    ) -> None:
        for info in infos:
            detail: dict[str, str | float] = {
                "fingerprint": info.fingerprint,
                "kem": info.kem,
                "grace_s": grace.total_seconds(),
            }
            emit_change(
                self._events, kind, actor, str(info.key_id), detail=detail, at=now.timestamp()
            )

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
        """The current keys (the preferred KEM's first, as published), then the others
        newest first."""
        query = sa.select(ohttp_keys).order_by(ohttp_keys.c.id.desc())
        if not include_retired:
            query = query.where(ohttp_keys.c.state.in_(_ACCEPTED_STATES))
        with self._db.read() as conn:
            infos = [_info(row) for row in conn.execute(query).mappings()]
        return sorted(infos, key=self._published_order)

    def _published_order(self, info: OhttpKeyInfo) -> tuple[bool, int]:
        """Sorts current keys first, in the order of preference; a stable sort keeps the
        rest (and keys of KEMs no longer offered) as they were."""
        if info.state != "current":
            return (True, 0)
        preference = self.kems.index(info.kem_id) if info.kem_id in self.kems else len(self.kems)
        return (False, preference)

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
        # Current keys first, in the order of preference; then those in their grace period.
        keys.sort(key=lambda k: self._published_order(k.info))
        return keys

    # ------------------------------------------------------------------ internals

    def _insert_new(self, conn: sa.Connection, kem_id: int) -> OhttpKeyInfo:
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
        key = GatewayKey.generate(key_id, suites=DEFAULT_SUITES, kem_id=kem_id)
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
