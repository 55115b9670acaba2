"""`bastion quotas set|show|remove` and `bastion usage`: tenant governance from the CLI.

They work on the home directory through the same services as the admin API
(:class:`~bastion.quotas.store.QuotaStore`, :func:`~bastion.quotas.usage.usage_report`); a
running server applies quota changes within its refresh interval, and writes its metered
usage every few seconds (BASTION_USAGE_FLUSH_INTERVAL_S).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer

from bastion.cli.common import HomeOpt, JsonOpt, err, open_home, out, print_json, run, table
from bastion.identity.principal import OPERATOR
from bastion.quotas.store import KEY, LIMIT_FIELDS, TENANT
from bastion.quotas.usage import GROUPS, parse_since, usage_report

T = TypeVar("T")

_QUOTA_COLUMNS = ["kind", "subject", *LIMIT_FIELDS, "weight", "updated_at"]
_USAGE_COLUMNS = [
    "tenant",
    "model",
    "requests",
    "refused",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "compute_seconds",
]

TenantOpt = Annotated[
    str | None, typer.Option("--tenant", help="A tenant's name (* for every tenant's defaults).")
]
KeyOpt = Annotated[str | None, typer.Option("--key", help="An API key's id.")]


def _limit_option(flag: str, what: str) -> Any:
    return typer.Option(flag, help=f"{what}; 'none' clears it.", metavar="N|none")


app = typer.Typer(
    help="Manage quotas of tenants and API keys (rates, tokens, concurrency, budgets).",
    no_args_is_help=True,
)


def _subject(tenant: str | None, key: str | None) -> tuple[str, str]:
    if (tenant is None) == (key is None):
        err.print("[red]error:[/] name exactly one of --tenant or --key")
        raise typer.Exit(2)
    return (TENANT, tenant) if tenant is not None else (KEY, key or "")


def _number(flag: str, raw: str, parse: Callable[[str], T]) -> T | None:
    if raw.strip().lower() == "none":
        return None
    try:
        return parse(raw)
    except ValueError:
        err.print(f"[red]error:[/] {flag} takes a number or 'none', got {raw!r}")
        raise typer.Exit(2) from None


@app.command("set")
def quotas_set(
    tenant: TenantOpt = None,
    key: KeyOpt = None,
    rpm: Annotated[str | None, _limit_option("--rpm", "Requests per minute")] = None,
    tpm: Annotated[
        str | None, _limit_option("--tpm", "Tokens per minute (prompt + completion)")
    ] = None,
    concurrency: Annotated[
        str | None, _limit_option("--concurrency", "Requests in progress at once")
    ] = None,
    tokens_per_day: Annotated[
        str | None, _limit_option("--tokens-per-day", "Tokens per day (UTC)")
    ] = None,
    max_request_bytes: Annotated[
        str | None, _limit_option("--max-request-bytes", "Largest request body in bytes")
    ] = None,
    weight: Annotated[
        str | None,
        typer.Option(
            "--weight",
            help="Share in the fair queues (tenants; default 1); 'none' clears it.",
            metavar="W|none",
        ),
    ] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Set (or clear with 'none') limits of a tenant or key; others are kept."""
    kind, name = _subject(tenant, key)
    given = {
        "requests_per_minute": ("--rpm", rpm),
        "tokens_per_minute": ("--tpm", tpm),
        "concurrent_requests": ("--concurrency", concurrency),
        "tokens_per_day": ("--tokens-per-day", tokens_per_day),
        "max_request_bytes": ("--max-request-bytes", max_request_bytes),
    }
    changes: dict[str, int | float | None] = {
        field: _number(flag, raw, int) for field, (flag, raw) in given.items() if raw is not None
    }
    if weight is not None:
        changes["weight"] = _number("--weight", weight, float)
    if not changes:
        err.print("[red]error:[/] give at least one limit (see --help)")
        raise typer.Exit(2)
    h = open_home(home)
    quota = run(lambda: h.quotas.set(OPERATOR, kind, name, changes)).to_dict()
    if json_output:
        print_json(quota)
    else:
        table([quota], _QUOTA_COLUMNS, f"Quota of {kind} {name}")


@app.command("show")
def quotas_show(
    tenant: TenantOpt = None,
    key: KeyOpt = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show every quota, or one tenant's or key's."""
    h = open_home(home)
    if tenant is None and key is None:
        rows = [q.to_dict() for q in run(lambda: h.quotas.list(OPERATOR))]
    else:
        kind, name = _subject(tenant, key)
        rows = [run(lambda: h.quotas.get(OPERATOR, kind, name)).to_dict()]
    if json_output:
        print_json(rows)
    else:
        table(rows, _QUOTA_COLUMNS, "Quotas (- : no limit)")


@app.command("remove")
def quotas_remove(
    tenant: TenantOpt = None,
    key: KeyOpt = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Remove every limit of a tenant (back to the defaults) or key."""
    kind, name = _subject(tenant, key)
    h = open_home(home)
    run(lambda: h.quotas.remove(OPERATOR, kind, name))
    if json_output:
        print_json({"kind": kind, "subject": name, "removed": True})
    else:
        out.print(f"Removed the quota of {kind} {name}.")


def usage(
    tenant: Annotated[str | None, typer.Option("--tenant", help="One tenant only.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="One model only.")] = None,
    since: Annotated[
        str, typer.Option("--since", help="A duration (30m, 24h, 7d) or an ISO 8601 time.")
    ] = "24h",
    until: Annotated[
        str | None, typer.Option("--until", help="End (a duration ago or ISO 8601 time).")
    ] = None,
    group: Annotated[str, typer.Option("--by", help=f"Rows per {' | '.join(GROUPS)}.")] = "total",
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Metered requests, tokens and worker compute seconds per tenant and model."""
    h = open_home(home)
    now = datetime.now(UTC)
    start = run(lambda: parse_since(since, now))
    end = run(lambda: parse_since(until, now)) if until is not None else None
    rows = run(
        lambda: usage_report(h.db, since=start, until=end, tenant=tenant, model=model, group=group)
    )
    if json_output:
        print_json(rows)
        return
    columns = (["period"] if group != "total" else []) + _USAGE_COLUMNS
    table(rows, columns, f"Usage since {start.isoformat(timespec='minutes')}")
