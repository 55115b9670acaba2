"""What every `bastion` command shares: the --home and --json options, the consoles, opening
the home directory, and printing tables or JSON. Bastion errors become a message and a
non-zero exit, never a traceback."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from bastion.bootstrap import Home, initialise
from bastion.config import Settings
from bastion.errors import BastionError

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Home directory (default: $BASTION_HOME or ./.bastion)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

out = Console()
err = Console(stderr=True)
T = TypeVar("T")


def settings_of(home: Path | None, **overrides: Any) -> Settings:
    try:
        return Settings.load(home=home, **overrides)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def run(action: Callable[[], T]) -> T:
    """Run a management action; Bastion errors become a message and a non-zero exit."""
    try:
        return action()
    except BastionError as exc:
        err.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(1) from None


def open_home(home: Path | None) -> Home:
    settings = settings_of(home)
    return run(lambda: initialise(settings).home)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[cell(row.get(c)) for c in columns])
    out.print(table)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)
