"""Protection settings per tenant or API key, overriding a model's own.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "protect_overrides",
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("options", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('tenant', 'key')", name=op.f("ck_protect_overrides_kind_valid")
        ),
        sa.PrimaryKeyConstraint("kind", "subject", "model", name=op.f("pk_protect_overrides")),
    )


def downgrade() -> None:
    op.drop_table("protect_overrides")
