"""OHTTP key configurations: public keys, private keys in key ring envelopes, rotation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ohttp_keys",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("key_id", sa.Integer, nullable=False),
        sa.Column("kem_id", sa.Integer, nullable=False),
        sa.Column("suites", sa.JSON, nullable=False),
        sa.Column("public_key", sa.LargeBinary(256), nullable=False),
        sa.Column("private_envelope", sa.LargeBinary(1024), nullable=True),
        sa.Column("fingerprint", sa.String(80), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ohttp_keys")),
        sa.CheckConstraint(
            "state IN ('current', 'previous', 'retired')", name=op.f("ck_ohttp_keys_state_valid")
        ),
        sa.CheckConstraint(
            "key_id >= 0 AND key_id <= 255", name=op.f("ck_ohttp_keys_key_id_range")
        ),
    )


def downgrade() -> None:
    op.drop_table("ohttp_keys")
