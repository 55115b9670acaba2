"""The relational schema, as SQLAlchemy Core tables.

The same schema runs on SQLite and PostgreSQL: only portable types, timezone-aware
timestamps and explicitly named constraints (so that migrations can refer to them). The
migrations in ``store/migrations`` create these tables; this module is what the code
queries. A change here needs a new migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

# Constraint names follow one pattern so that every backend gets the same, stable names.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

DESIRED_STATES = ("loaded", "unloaded")
# The `meta` row whose integer value changes with every change to tenants, keys or models.
REVISION_KEY = "revision"
# Columns that hold a principal's key id: an API key's, or a single sign-on user's
# ("jwt:<issuer host>:<subject>", up to 4 + 253 + 1 + 255 characters). PostgreSQL enforces
# the length (SQLite does not), so it must fit the longest such id (migration 0011).
PRINCIPAL_LENGTH = 512


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    SQLite keeps no time zone, so values are normalised to UTC on the way in and tagged
    as UTC on the way out. Naive datetimes are refused: their meaning is ambiguous.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError("timestamp column returned a non-datetime value")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("disabled_at", UTCDateTime, nullable=True),
    sa.UniqueConstraint("name", name="uq_tenants_name"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    # The public id of the key (the part of the token before the secret).
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column(
        "tenant_id",
        sa.Integer,
        sa.ForeignKey("tenants.id", name="fk_api_keys_tenant_id_tenants", ondelete="RESTRICT"),
        nullable=False,
    ),
    sa.Column("name", sa.String(128), nullable=True),
    # HMAC-SHA-256 of the token under a key derived from the master key; never the secret.
    sa.Column("digest", sa.LargeBinary(64), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("models", sa.JSON, nullable=False),
    sa.Column("actions", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Column(
        "rotated_from",
        sa.String(32),
        sa.ForeignKey("api_keys.id", name="fk_api_keys_rotated_from_api_keys"),
        nullable=True,
    ),
    sa.CheckConstraint("role IN ('admin', 'tenant-admin', 'consumer')", name="role_valid"),
    sa.Index("ix_api_keys_tenant_id", "tenant_id"),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("runtime", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("desired_state", sa.String(16), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.CheckConstraint("desired_state IN ('loaded', 'unloaded')", name="desired_state_valid"),
)

# What each running gateway last saw of each model's workers (written by that gateway
# without bumping the revision; one row per gateway and model, migration 0012): the CLI and
# the admin API read it to show live states, such as integrity_failed.
GATEWAY_NAME_LENGTH = 128
model_status = sa.Table(
    "model_status",
    metadata,
    sa.Column("gateway", sa.String(GATEWAY_NAME_LENGTH), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("restarts", sa.Integer, nullable=False),
    sa.Column("since", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

OHTTP_KEY_STATES = ("current", "previous", "retired")

ohttp_keys = sa.Table(
    "ohttp_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # The one-byte key identifier of RFC 9458; reused only after its key is retired.
    sa.Column("key_id", sa.Integer, nullable=False),
    sa.Column("kem_id", sa.Integer, nullable=False),
    # [[kdf_id, aead_id], ...] in order of preference.
    sa.Column("suites", sa.JSON, nullable=False),
    # The length is not enforced by SQLite or PostgreSQL (bytea), which both hold the
    # 1,216 bytes of a post-quantum (MLKEM768-X25519) public key; migration 0002 said 256.
    sa.Column("public_key", sa.LargeBinary(256), nullable=False),
    # The private key in a key ring envelope; erased when the key is retired.
    sa.Column("private_envelope", sa.LargeBinary(1024), nullable=True),
    sa.Column("fingerprint", sa.String(80), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # For a previous key: when it stops being accepted.
    sa.Column("retire_at", UTCDateTime, nullable=True),
    sa.Column("retired_at", UTCDateTime, nullable=True),
    sa.CheckConstraint("state IN ('current', 'previous', 'retired')", name="state_valid"),
    sa.CheckConstraint("key_id >= 0 AND key_id <= 255", name="key_id_range"),
)

QUOTA_KINDS = ("tenant", "key")

# Limits per tenant or per API key (`subject` is the tenant's name or the key's id; the
# tenant "*" holds the defaults of tenants without a value of their own). NULL: no limit.
quotas = sa.Table(
    "quotas",
    metadata,
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("subject", sa.String(PRINCIPAL_LENGTH), primary_key=True),
    sa.Column("requests_per_minute", sa.BigInteger, nullable=True),
    sa.Column("tokens_per_minute", sa.BigInteger, nullable=True),
    sa.Column("concurrent_requests", sa.BigInteger, nullable=True),
    sa.Column("tokens_per_day", sa.BigInteger, nullable=True),
    sa.Column("max_request_bytes", sa.BigInteger, nullable=True),
    # The tenant's share in its models' fair queues (tenants only; NULL: 1).
    sa.Column("weight", sa.Float, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.CheckConstraint("kind IN ('tenant', 'key')", name="kind_valid"),
)

# Metered usage per tenant, model and hour (written by gateways without bumping the
# revision). `refused` counts requests turned away by a quota or a full queue.
usage = sa.Table(
    "usage",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("hour", UTCDateTime, primary_key=True),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("refused", sa.BigInteger, nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("compute_seconds", sa.Float, nullable=False),
    sa.Index("ix_usage_hour", "hour"),
)

# The usage journal files whose counts are in `usage` (see quotas/journal.py).
usage_flushes = sa.Table(
    "usage_flushes",
    metadata,
    sa.Column("journal", sa.String(80), primary_key=True),
    sa.Column("flushed_at", UTCDateTime, nullable=False),
    sa.Index("ix_usage_flushes_flushed_at", "flushed_at"),
)

# Extraction risk per API key and model, as the gateway last heard it from the model's
# worker (written without bumping the revision), and the blocks it decided (a block or
# its clearing bumps the revision, so every gateway picks it up). Never any input.
extraction_risk = sa.Table(
    "extraction_risk",
    metadata,
    sa.Column("key_id", sa.String(PRINCIPAL_LENGTH), primary_key=True),
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("risk", sa.Float, nullable=False),
    sa.Column("level", sa.String(16), nullable=False),
    sa.Column("queries", sa.BigInteger, nullable=False),
    sa.Column("signals", sa.Text, nullable=False),
    sa.Column("blocked_at", UTCDateTime, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_extraction_risk_tenant", "tenant"),
)

# Sealed records of a classifier's watermarked answers ("marks") and a keyed sample of its
# plain ones ("controls"), for `bastion protect verify`. The blob is sealed in the worker
# to a key only the home's key ring opens; rows older than the retention are deleted.
watermark_records = sa.Table(
    "watermark_records",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(PRINCIPAL_LENGTH), nullable=True),
    sa.Column("tenant", sa.String(64), nullable=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("classes", sa.Integer, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("blob", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_watermark_records_model", "model"),
    sa.Index("ix_watermark_records_created_at", "created_at"),
    sa.CheckConstraint("kind IN ('marks', 'controls')", name="kind_valid"),
)

# Protection settings of one tenant or API key, on one model or every model ('*'): they
# override the model's own protect.* options for that caller (key over tenant, a model
# over '*').
protect_overrides = sa.Table(
    "protect_overrides",
    metadata,
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("subject", sa.String(PRINCIPAL_LENGTH), primary_key=True),
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("options", sa.Text, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.CheckConstraint("kind IN ('tenant', 'key')", name="kind_valid"),
)

# The tamper-evident audit log (bastion.audit.log). Its sequence numbers are the leaves'
# indexes in the Merkle tree: a rowid alias on SQLite, so that appends and ordered scans
# need no second index.
_SEQUENCE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The log's checkpoint signing key: the Ed25519 seed sealed by the key ring.
audit_keys = sa.Table(
    "audit_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("origin", sa.String(128), nullable=False),
    sa.Column("public_key", sa.LargeBinary(32), nullable=False),
    sa.Column("sealed_seed", sa.LargeBinary(1024), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# One row per record; `entry` holds the exact bytes hashed as the leaf (canonical JSON),
# the other columns repeat its fields for queries and are checked against it.
audit_records = sa.Table(
    "audit_records",
    metadata,
    sa.Column("seq", _SEQUENCE, primary_key=True, autoincrement=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("actor", sa.String(128), nullable=True),
    sa.Column("tenant", sa.String(63), nullable=True),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(255), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("entry", sa.Text, nullable=False),
    # HMAC-SHA-256 of the entry under a key derived from the signing seed: a database
    # writer without the key ring cannot add a record the log's writer would sign.
    sa.Column("mac", sa.LargeBinary(32), nullable=False),
    sa.Index("ix_audit_records_at_ms", "at_ms"),
    sa.Index("ix_audit_records_tenant", "tenant"),
)

# Signed checkpoints (c2sp.org/tlog-checkpoint in a signed note) by tree size; `frontier`
# caches the tree's frontier at that size so a writer resumes without rereading the log
# (checked against the signed root before use).
audit_checkpoints = sa.Table(
    "audit_checkpoints",
    metadata,
    sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("frontier", sa.LargeBinary, nullable=False),
)

# Signed notes of what retention pruned: every record below `size`, with the frontier
# that lets verification go on from there.
audit_prunes = sa.Table(
    "audit_prunes",
    metadata,
    sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("note", sa.Text, nullable=False),
)

# The cluster's certificate authority (one row): its certificate, and its private key
# sealed by the key ring (bastion init --cluster; docs/scaling.md).
cluster_ca = sa.Table(
    "cluster_ca",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("certificate", sa.Text, nullable=False),
    sa.Column("sealed_key", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("id = 1", name="one"),
)
