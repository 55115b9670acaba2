"""Quotas per tenant and per key, and metered usage per tenant, model and hour.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "quotas",
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("requests_per_minute", sa.BigInteger, nullable=True),
        sa.Column("tokens_per_minute", sa.BigInteger, nullable=True),
        sa.Column("concurrent_requests", sa.BigInteger, nullable=True),
        sa.Column("tokens_per_day", sa.BigInteger, nullable=True),
        sa.Column("max_request_bytes", sa.BigInteger, nullable=True),
        sa.Column("weight", sa.Float, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "subject", name=op.f("pk_quotas")),
        sa.CheckConstraint("kind IN ('tenant', 'key')", name=op.f("ck_quotas_kind_valid")),
    )
    op.create_table(
        "usage",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("refused", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("compute_seconds", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "model", "hour", name=op.f("pk_usage")),
    )
    op.create_index("ix_usage_hour", "usage", ["hour"])


def downgrade() -> None:
    op.drop_index("ix_usage_hour", table_name="usage")
    op.drop_table("usage")
    op.drop_table("quotas")
