"""Sealed records of watermarked classifier answers, for ownership verification.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "watermark_records",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("tenant", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("classes", sa.Integer, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("blob", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('marks', 'controls')", name=op.f("ck_watermark_records_kind_valid")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_watermark_records")),
    )
    op.create_index("ix_watermark_records_model", "watermark_records", ["model"])
    op.create_index("ix_watermark_records_created_at", "watermark_records", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_watermark_records_created_at", table_name="watermark_records")
    op.drop_index("ix_watermark_records_model", table_name="watermark_records")
    op.drop_table("watermark_records")
