"""Model states keyed by gateway and model: each gateway publishes and clears its own rows.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08

Keyed by the model alone, the rows of several gateways sharing one database overwrote one
another, and a gateway's first publish deleted every other gateway's. The rows are live
states that each running gateway writes again within seconds, so the table is made anew
rather than altered (which SQLite could only do by copying it anyway): a gateway running
during the upgrade publishes its states again at its next touch.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _create(*, per_gateway: bool) -> None:
    key = ("gateway", "name") if per_gateway else ("name",)
    gateway = [sa.Column("gateway", sa.String(128), nullable=False)] if per_gateway else []
    op.create_table(
        "model_status",
        *gateway,
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("restarts", sa.Integer, nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(*key, name=op.f("pk_model_status")),
    )


def upgrade() -> None:
    op.drop_table("model_status")
    _create(per_gateway=True)


def downgrade() -> None:
    op.drop_table("model_status")
    _create(per_gateway=False)
