"""Alembic environment: runs migrations on the connection that `Database.migrate` passes in.

There is no alembic.ini: :meth:`bastion.store.db.Database.migrate` builds the configuration
in code, so the package carries everything it needs.
"""

from __future__ import annotations

from alembic import context

from bastion.store.tables import metadata


def run_migrations_offline() -> None:
    """Render the migrations as SQL for the dialect named in the config (for review)."""
    context.configure(
        dialect_name=context.config.attributes["dialect_name"],
        target_metadata=metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("Bastion migrations run through Database.migrate(), not the CLI.")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
