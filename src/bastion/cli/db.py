"""`bastion db`: the database's schema (status, migrate) and copying it elsewhere (copy).

Every command works on the configured database: SQLite in the home by default, or
BASTION_DATABASE_URL. URLs are printed with their password hidden (docs/database.md).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.bootstrap import open_database
from bastion.cli.common import HomeOpt, JsonOpt, err, out, print_json, run, settings_of, table
from bastion.errors import BastionError
from bastion.store.copy import DEFAULT_BATCH, TargetNotEmpty, copy_database
from bastion.store.db import Database, head_revision

app = typer.Typer(
    help="The database: schema status, migrations, and copying it to PostgreSQL.",
    no_args_is_help=True,
)


def _configured(home: HomeOpt) -> Database:
    return run(lambda: open_database(settings_of(home)))


@app.command("status")
def status(home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Which database this home uses, and whether its schema is the newest (exit 1 if
    not)."""
    db = _configured(home)
    try:
        current = run(db.schema_revision)
        head = head_revision()
        revision = run(db.revision) if current is not None else None
    finally:
        db.close()
    described: dict[str, Any] = {
        "backend": db.backend,
        "url": db.url,
        "schema": current,
        "newest": head,
        "up_to_date": current == head,
        "revision": revision,
    }
    if not db.is_sqlite:
        described["pool"] = {
            "size": db.pool.size,
            "max_overflow": db.pool.max_overflow,
            "timeout_s": db.pool.timeout_s,
            "connect_timeout_s": db.pool.connect_timeout_s,
            "recycle_s": db.pool.recycle_s,
        }
    if json_output:
        print_json(described)
    else:
        if current == head:
            state = "[green]up to date[/]"
        elif current is None:
            state = "[red]no schema yet[/]: run `bastion db migrate`"
        else:
            state = "[red]not the newest[/]: run `bastion db migrate`"
        out.print(f"database  {db.backend}  {db.url}", highlight=False)
        out.print(f"schema    {current or '-'} (newest {head}): {state}", highlight=False)
        if revision is not None:
            out.print(f"revision  {revision} (changes so far)", highlight=False)
        if not db.is_sqlite:
            pool = db.pool
            out.print(
                f"pool      {pool.size} connections, {pool.max_overflow} more under load; "
                f"wait {pool.timeout_s:g} s for one, {pool.connect_timeout_s} s to connect; "
                f"replaced after {pool.recycle_s:g} s",
                highlight=False,
            )
    if current != head:
        raise typer.Exit(1)


@app.command("migrate")
def migrate(home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Bring the database's schema to the newest migration (a no-op when it is)."""
    db = _configured(home)
    try:
        before = run(db.schema_revision)
        run(db.migrate)
        after = run(db.schema_revision)
    finally:
        db.close()
    if json_output:
        print_json({"url": db.url, "before": before, "after": after, "changed": before != after})
    elif before == after:
        out.print(f"{db.url}: already at migration {after}, the newest", highlight=False)
    else:
        out.print(
            f"{db.url}: migrated from {before or 'an empty database'} to {after}",
            highlight=False,
        )


@app.command("copy")
def copy(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="The target database's URL, e.g. postgresql+psycopg://bastion@db:5432/bastion "
            "(leave the password out: libpq reads PGPASSWORD or ~/.pgpass).",
        ),
    ],
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace whatever the target holds (it says what)."),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per INSERT batch.")] = DEFAULT_BATCH,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Copy every table of this home's database into another one (PostgreSQL), migrated
    first; in one transaction, keys as they are, row counts checked. Stop the server
    first: what changes during the copy is not in it."""
    source = _configured(home)
    target = run(lambda: Database(to, pool=source.pool))

    def progress(name: str, rows: int) -> None:
        if not json_output:
            out.print(f"  copied {name}: {rows} rows", highlight=False)

    if not json_output:
        out.print(f"copying {source.url} to {target.url}", highlight=False)
    try:
        report = copy_database(
            source, target, replace=force, batch_size=batch_size, progress=progress
        )
    except TargetNotEmpty as exc:
        err.print(f"[red]error:[/] {exc.message} Give --force to replace it.", highlight=False)
        raise typer.Exit(1) from None
    except BastionError as exc:
        err.print(f"[red]error:[/] {exc.message}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        source.close()
        target.close()
    if json_output:
        print_json(report.as_dict())
        return
    table(
        [
            {"table": t.name, "source rows": t.source_rows, "target rows": t.target_rows}
            for t in report.tables
        ],
        ["table", "source rows", "target rows"],
        f"copied {report.rows} rows (schema {report.schema})",
    )
    if report.replaced:
        replaced = ", ".join(f"{name} {rows}" for name, rows in report.replaced.items())
        out.print(f"[yellow]replaced[/] what the target held: {replaced} rows", highlight=False)
    if report.sequences:
        out.print(f"sequences set past the copied ids: {', '.join(report.sequences)}")
    out.print(
        "Every table's row count matches. Next: check the copy's audit log with\n"
        f"  BASTION_DATABASE_URL='{report.target}' bastion audit verify\n"
        "(with the password, or PGPASSWORD, in place of ***), then point every gateway "
        "at it with BASTION_DATABASE_URL (docs/database.md).",
        highlight=False,
    )
