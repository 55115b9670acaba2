"""The cluster's certificate authority (mutual TLS with replicas on other hosts).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cluster_ca",
        sa.Column("id", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("certificate", sa.Text, nullable=False),
        sa.Column("sealed_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_cluster_ca_one")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cluster_ca")),
    )


def downgrade() -> None:
    op.drop_table("cluster_ca")
