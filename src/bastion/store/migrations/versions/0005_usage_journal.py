"""The usage journals already written to the usage table (so a replay never counts twice).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_flushes",
        sa.Column("journal", sa.String(80), nullable=False),
        sa.Column("flushed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("journal", name=op.f("pk_usage_flushes")),
    )
    op.create_index("ix_usage_flushes_flushed_at", "usage_flushes", ["flushed_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_flushes_flushed_at", table_name="usage_flushes")
    op.drop_table("usage_flushes")
