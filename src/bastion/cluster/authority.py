"""The cluster CA in the shared database: created once (`bastion init --cluster`), its
private key sealed by the key ring, so every gateway with the same master key (or KEK)
opens the same CA."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from bastion.crypto.cluster_ca import CA_CONTEXT, ClusterAuthority
from bastion.crypto.keyring import KeyRing
from bastion.errors import ConfigurationError
from bastion.store.db import Database
from bastion.store.tables import cluster_ca


def create_authority(db: Database, keyring: KeyRing) -> tuple[ClusterAuthority, bool]:
    """The cluster CA, created if the database has none; (authority, created)."""
    with db.write(bump_revision=False) as conn:
        row = conn.execute(sa.select(cluster_ca)).first()
        if row is not None:
            return _open(row, keyring), False
        authority = ClusterAuthority.generate()
        conn.execute(
            sa.insert(cluster_ca).values(
                id=1,
                certificate=authority.certificate_pem.decode(),
                sealed_key=keyring.seal(authority.private_key_der(), CA_CONTEXT),
                created_at=dt.datetime.now(dt.UTC),
            )
        )
        return authority, True


def load_authority(db: Database, keyring: KeyRing) -> ClusterAuthority:
    """The cluster CA; ConfigurationError if `bastion init --cluster` has not made one."""
    with db.read() as conn:
        row = conn.execute(sa.select(cluster_ca)).first()
    if row is None:
        raise ConfigurationError(
            "This deployment has no cluster CA: run `bastion init --cluster` once "
            "(with the shared database and master key) before serving with BASTION_CLUSTER."
        )
    return _open(row, keyring)


def _open(row: sa.Row[tuple[object, ...]], keyring: KeyRing) -> ClusterAuthority:
    key = keyring.open(bytes(row.sealed_key), CA_CONTEXT)
    return ClusterAuthority.load(str(row.certificate).encode(), key)
