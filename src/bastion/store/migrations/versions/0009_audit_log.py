"""The tamper-evident audit log: records, signed checkpoints, prune notes, signing key.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A rowid alias on SQLite (see store/tables.py).
_SEQUENCE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


# Columns that hold a principal's id: an SSO user's ("jwt:<issuer host>:<subject>") can be
# longer than an API key id. SQLite does not enforce lengths, PostgreSQL does; batch mode
# keeps the declared schema the same on both (SQLite copies these small tables).
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
    _resize(sa.String(64), sa.String(255))
    op.create_table(
        "audit_keys",
        sa.Column("id", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("origin", sa.String(128), nullable=False),
        sa.Column("public_key", sa.LargeBinary(32), nullable=False),
        sa.Column("sealed_seed", sa.LargeBinary(1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_keys")),
    )
    op.create_table(
        "audit_records",
        sa.Column("seq", _SEQUENCE, autoincrement=False, nullable=False),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("actor", sa.String(128), nullable=True),
        sa.Column("tenant", sa.String(63), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("entry", sa.Text, nullable=False),
        sa.Column("mac", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_records")),
    )
    op.create_index("ix_audit_records_at_ms", "audit_records", ["at_ms"])
    op.create_index("ix_audit_records_tenant", "audit_records", ["tenant"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("size", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("frontier", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("size", name=op.f("pk_audit_checkpoints")),
    )
    op.create_table(
        "audit_prunes",
        sa.Column("size", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("size", name=op.f("pk_audit_prunes")),
    )


def downgrade() -> None:
    _resize(sa.String(255), sa.String(64))
    op.drop_table("audit_prunes")
    op.drop_table("audit_checkpoints")
    op.drop_index("ix_audit_records_tenant", table_name="audit_records")
    op.drop_index("ix_audit_records_at_ms", table_name="audit_records")
    op.drop_table("audit_records")
    op.drop_table("audit_keys")
