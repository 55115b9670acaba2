"""The initial schema: tenants, API keys, models and the change revision.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

The tables are written out here rather than taken from ``bastion.store.tables`` so that
this migration keeps creating the same schema when the tables module changes later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        _timestamp("created_at", nullable=False),
        _timestamp("disabled_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("digest", sa.LargeBinary(64), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("actions", sa.JSON, nullable=False),
        _timestamp("created_at", nullable=False),
        _timestamp("expires_at", nullable=True),
        _timestamp("revoked_at", nullable=True),
        sa.Column("rotated_from", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_api_keys_tenant_id_tenants"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["rotated_from"], ["api_keys.id"], name=op.f("fk_api_keys_rotated_from_api_keys")
        ),
        sa.CheckConstraint(
            "role IN ('admin', 'tenant-admin', 'consumer')", name=op.f("ck_api_keys_role_valid")
        ),
    )
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"])
    op.create_table(
        "models",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("runtime", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("desired_state", sa.String(16), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        _timestamp("created_at", nullable=False),
        _timestamp("updated_at", nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_models")),
        sa.CheckConstraint(
            "desired_state IN ('loaded', 'unloaded')", name=op.f("ck_models_desired_state_valid")
        ),
    )
    meta = op.create_table(
        "meta",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_meta")),
    )
    op.bulk_insert(meta, [{"key": "revision", "value": "0"}])


def downgrade() -> None:
    op.drop_table("meta")
    op.drop_table("models")
    op.drop_index(op.f("ix_api_keys_tenant_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
