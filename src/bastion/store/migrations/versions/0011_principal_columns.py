"""Columns holding a principal's key id take the longest single sign-on id (512).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

A single sign-on user's key id is "jwt:<issuer host>:<subject>": up to 4 + 253 + 1 + 255
characters, and quotas accept up to 512. SQLite never enforced the 255 of migration 0009;
PostgreSQL does, and refused such a user's quota, risk score or watermark record.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PRINCIPAL_COLUMNS = (
    ("quotas", "subject", False),
    ("extraction_risk", "key_id", False),
    ("watermark_records", "key_id", True),
    ("protect_overrides", "subject", False),
)


def _resize(old: sa.String, new: sa.String) -> None:
    for table, column, nullable in _PRINCIPAL_COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, type_=new, existing_type=old, existing_nullable=nullable)


def upgrade() -> None:
    _resize(sa.String(255), sa.String(512))


def downgrade() -> None:
    _resize(sa.String(512), sa.String(255))
