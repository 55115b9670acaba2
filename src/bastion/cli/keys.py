"""`bastion keys`: create, list, revoke and rotate API keys, and rotate the key ring's KEK."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from bastion.cli.common import (
    HomeOpt,
    JsonOpt,
    err,
    open_home,
    out,
    print_json,
    run,
    table,
)
from bastion.identity.principal import OPERATOR

app = typer.Typer(help="Manage API keys.", no_args_is_help=True)


def _expiry(value: str | None) -> datetime | None:
    from bastion.api.admin import parse_expiry

    return run(lambda: parse_expiry(value))


@app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")],
    role: Annotated[str, typer.Option(help="admin, tenant-admin or consumer.")] = "consumer",
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Allowed model name or glob (repeat).")
    ] = None,
    action: Annotated[
        list[str] | None, typer.Option("--action", help="Allowed action (repeat).")
    ] = None,
    expires_at: Annotated[str | None, typer.Option(help="ISO 8601 expiry with time zone.")] = None,
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Create an API key. Its secret is printed once."""
    h = open_home(home)
    expiry = _expiry(expires_at)
    info, token = run(
        lambda: h.identity.create_key(
            OPERATOR,
            tenant=tenant,
            role=role,
            models=model or None,
            actions=action or None,
            expires_at=expiry,
            name=name,
        )
    )
    if json_output:
        print_json({**info.to_dict(), "key": token})
    else:
        out.print(f"Created key {info.to_dict()['id']} (shown once):\n{token}", highlight=False)


@app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List keys (never their secrets)."""
    h = open_home(home)
    rows = [k.to_dict() for k in run(lambda: h.identity.list_keys(OPERATOR, tenant))]
    if json_output:
        print_json(rows)
    else:
        table(
            rows,
            ["id", "tenant", "role", "models", "actions", "expires_at", "revoked_at"],
            "API keys",
        )


@app.command("revoke")
def keys_revoke(key_id: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Revoke a key at once."""
    h = open_home(home)
    info = run(lambda: h.identity.revoke_key(OPERATOR, key_id)).to_dict()
    print_json(info) if json_output else out.print(f"Revoked key {info['id']}.")


@app.command("rotate-kek")
def keys_rotate_kek(home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Rotate the key-encryption key and rewrap every stored data key under it (no secret
    is re-encrypted); also moves envelopes of a former provider to the configured one."""
    from bastion.crypto.keyring import KeyRingError

    h = open_home(home)
    try:
        rotated = h.keyring.rotate_kek()
        rewrapped = h.ohttp_keys.rewrap_all()
    except KeyRingError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    result = {
        "provider": h.keyring.provider.name,
        "kek": h.keyring.provider.kek_id,
        "rotation": rotated,
        "rewrapped": rewrapped,
    }
    if json_output:
        print_json(result)
    else:
        out.print(f"{rotated}; {rewrapped} data key(s) rewrapped.")


@app.command("rotate")
def keys_rotate(key_id: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Replace a key by a new one with the same rights; the old one is revoked."""
    h = open_home(home)
    info, token = run(lambda: h.identity.rotate_key(OPERATOR, key_id))
    if json_output:
        print_json({**info.to_dict(), "key": token})
    else:
        out.print(f"New key {info.to_dict()['id']} (shown once):\n{token}", highlight=False)
