"""Extraction risk per API key and model, and the keys blocked as suspected thieves.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "extraction_risk",
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("risk", sa.Float, nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("queries", sa.BigInteger, nullable=False),
        sa.Column("signals", sa.Text, nullable=False),
        sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "model", name=op.f("pk_extraction_risk")),
    )
    op.create_index("ix_extraction_risk_tenant", "extraction_risk", ["tenant"])


def downgrade() -> None:
    op.drop_index("ix_extraction_risk_tenant", table_name="extraction_risk")
    op.drop_table("extraction_risk")
