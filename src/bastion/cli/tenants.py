"""`bastion tenants`: create, list and disable tenants."""

from __future__ import annotations

import typer

from bastion.cli.common import (
    HomeOpt,
    JsonOpt,
    open_home,
    out,
    print_json,
    run,
    table,
)
from bastion.identity.principal import OPERATOR

app = typer.Typer(help="Manage tenants.", no_args_is_help=True)


@app.command("create")
def tenants_create(name: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Create a tenant."""
    h = open_home(home)
    tenant = run(lambda: h.identity.create_tenant(OPERATOR, name)).to_dict()
    print_json(tenant) if json_output else out.print(f"Created tenant {tenant['name']}.")


@app.command("list")
def tenants_list(home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """List tenants."""
    h = open_home(home)
    rows = [t.to_dict() for t in run(lambda: h.identity.list_tenants(OPERATOR))]
    if json_output:
        print_json(rows)
    else:
        table(rows, ["name", "disabled", "created_at"], "Tenants")


@app.command("disable")
def tenants_disable(name: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Disable a tenant: all its keys stop working."""
    h = open_home(home)
    tenant = run(lambda: h.identity.disable_tenant(OPERATOR, name)).to_dict()
    print_json(tenant) if json_output else out.print(f"Disabled tenant {tenant['name']}.")
