"""The `bastion` command: serve, init, tenants, keys, models, quotas, usage, ohttp, chat.

Every command takes --home and --json. Management commands work on the home directory
directly, through the same service layer as the admin API; a running server picks the
changes up from the database within its refresh interval.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from bastion.bootstrap import Home, initialise
from bastion.config import Settings
from bastion.errors import BastionError
from bastion.identity.principal import OPERATOR

app = typer.Typer(help="Bastion: a secure Model-as-a-Service server.", no_args_is_help=True)
tenants_app = typer.Typer(help="Manage tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
models_app = typer.Typer(help="Manage models.", no_args_is_help=True)
ohttp_app = typer.Typer(
    help="Manage the Oblivious HTTP keys of end-to-end encryption.", no_args_is_help=True
)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(ohttp_app, name="ohttp")

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Home directory (default: $BASTION_HOME or ./.bastion)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

out = Console()
err = Console(stderr=True)
T = TypeVar("T")


def _settings(home: Path | None, **overrides: Any) -> Settings:
    try:
        return Settings.load(home=home, **overrides)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _run(action: Callable[[], T]) -> T:
    """Run a management action; Bastion errors become a message and a non-zero exit."""
    try:
        return action()
    except BastionError as exc:
        err.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(1) from None


def _open(home: Path | None) -> Home:
    settings = _settings(home)
    return _run(lambda: initialise(settings).home)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    out.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------- serve / init


@app.command()
def serve(
    home: HomeOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    no_demo_models: Annotated[
        bool, typer.Option("--no-demo-models", help="Do not build the demo models on first start.")
    ] = False,
    unsafe_no_sandbox: Annotated[
        bool,
        typer.Option(
            "--unsafe-no-sandbox",
            help="Run workers as plain subprocesses, without bubblewrap: only for trusted "
            "models (model code could read the master key and reach the network).",
        ),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Start the server (creating the home directory on first start)."""
    from bastion.observability.logging import configure_logging
    from bastion.server import serve as run_server

    settings = _settings(
        home,
        host=host,
        port=port,
        demo_models=False if no_demo_models else None,
        unsafe_no_sandbox=True if unsafe_no_sandbox else None,
    )
    configure_logging(settings.log_level)
    result = _run(lambda: initialise(settings))
    _announce(result.admin_token, settings, json_output)
    _run(lambda: run_server(result.home))


@app.command()
def init(
    home: HomeOpt = None,
    no_demo_models: Annotated[bool, typer.Option("--no-demo-models")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Create the home directory, master key, admin key and demo models without serving."""
    settings = _settings(home, demo_models=False if no_demo_models else None)
    result = _run(lambda: initialise(settings))
    if json_output:
        _print_json(
            {
                "home": str(settings.home),
                "created": result.created,
                "admin_key": result.admin_token,
                "demo_models": result.demo_models,
            }
        )
        return
    _announce(result.admin_token, settings, False)
    if not result.created:
        out.print(f"Home {settings.home} already initialised.")


def _announce(token: str | None, settings: Settings, json_output: bool) -> None:
    if token is None:
        return
    if json_output:
        _print_json({"admin_key": token, "admin_key_file": str(settings.admin_key_path)})
        return
    # Printed once, on the start that created it; it also lives in admin.key (mode 0600).
    out.print(
        f"[bold]Admin API key[/] (shown once, also in {settings.admin_key_path}):\n{token}",
        highlight=False,
    )


# ---------------------------------------------------------------- tenants


@tenants_app.command("create")
def tenants_create(name: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Create a tenant."""
    h = _open(home)
    tenant = _run(lambda: h.identity.create_tenant(OPERATOR, name)).to_dict()
    _print_json(tenant) if json_output else out.print(f"Created tenant {tenant['name']}.")


@tenants_app.command("list")
def tenants_list(home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """List tenants."""
    h = _open(home)
    rows = [t.to_dict() for t in _run(lambda: h.identity.list_tenants(OPERATOR))]
    if json_output:
        _print_json(rows)
    else:
        _table(rows, ["name", "disabled", "created_at"], "Tenants")


@tenants_app.command("disable")
def tenants_disable(name: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Disable a tenant: all its keys stop working."""
    h = _open(home)
    tenant = _run(lambda: h.identity.disable_tenant(OPERATOR, name)).to_dict()
    _print_json(tenant) if json_output else out.print(f"Disabled tenant {tenant['name']}.")


# ---------------------------------------------------------------- keys


def _expiry(value: str | None) -> datetime | None:
    from bastion.api.admin import parse_expiry

    return _run(lambda: parse_expiry(value))


@keys_app.command("create")
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
    h = _open(home)
    expiry = _expiry(expires_at)
    info, token = _run(
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
        _print_json({**info.to_dict(), "key": token})
    else:
        out.print(f"Created key {info.to_dict()['id']} (shown once):\n{token}", highlight=False)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List keys (never their secrets)."""
    h = _open(home)
    rows = [k.to_dict() for k in _run(lambda: h.identity.list_keys(OPERATOR, tenant))]
    if json_output:
        _print_json(rows)
    else:
        _table(
            rows,
            ["id", "tenant", "role", "models", "actions", "expires_at", "revoked_at"],
            "API keys",
        )


@keys_app.command("revoke")
def keys_revoke(key_id: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Revoke a key at once."""
    h = _open(home)
    info = _run(lambda: h.identity.revoke_key(OPERATOR, key_id)).to_dict()
    _print_json(info) if json_output else out.print(f"Revoked key {info['id']}.")


@keys_app.command("rotate-kek")
def keys_rotate_kek(home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Rotate the key-encryption key and rewrap every stored data key under it (no secret
    is re-encrypted); also moves envelopes of a former provider to the configured one."""
    from bastion.crypto.keyring import KeyRingError

    h = _open(home)
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
        _print_json(result)
    else:
        out.print(f"{rotated}; {rewrapped} data key(s) rewrapped.")


@keys_app.command("rotate")
def keys_rotate(key_id: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Replace a key by a new one with the same rights; the old one is revoked."""
    h = _open(home)
    info, token = _run(lambda: h.identity.rotate_key(OPERATOR, key_id))
    if json_output:
        _print_json({**info.to_dict(), "key": token})
    else:
        out.print(f"New key {info.to_dict()['id']} (shown once):\n{token}", highlight=False)


# ---------------------------------------------------------------- models


def _set_model_state(name: str, state: str, home: Path | None, json_output: bool) -> None:
    h = _open(home)
    record = _run(lambda: h.registry.set_desired_state(OPERATOR, name, state))
    if json_output:
        _print_json({"name": record.name, "desired_state": record.desired_state})
    else:
        verb = "load" if state == "loaded" else "unload"
        out.print(f"Model {record.name} marked to {verb}; a running server applies it shortly.")


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            err.print(f"[red]error:[/] --option takes KEY=VALUE, got {pair!r}")
            raise typer.Exit(2)
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


@models_app.command("add")
def models_add(
    name: str,
    runtime: Annotated[
        str, typer.Option(help="onnx, text-generation, sentence-embedding or echo.")
    ],
    path: Annotated[Path, typer.Option(help="Model directory (or .onnx file).")],
    option: Annotated[
        list[str] | None, typer.Option("--option", help="Runtime option KEY=VALUE (repeat).")
    ] = None,
    description: Annotated[str, typer.Option(help="A line about the model.")] = "",
    unloaded: Annotated[bool, typer.Option("--unloaded", help="Register without loading.")] = False,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Register a model directory in place (a Hugging Face directory or an ONNX file)."""
    h = _open(home)
    options = _parse_options(option)
    target = path.expanduser().resolve()
    if not target.exists():
        err.print(f"[red]error:[/] {path} does not exist")
        raise typer.Exit(2)
    if target.is_file():
        options.setdefault("file", target.name)
        target = target.parent
    record = _run(
        lambda: h.registry.register(
            OPERATOR,
            name=name,
            runtime=runtime,
            path=str(target),
            options=options,
            description=description,
            desired_state="unloaded" if unloaded else "loaded",
        )
    )
    if json_output:
        _print_json({"name": record.name, "runtime": record.runtime, "path": record.path})
    else:
        out.print(f"Registered model {record.name} ({record.runtime}).")


@models_app.command("load")
def models_load(name: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Ask the server to load a model."""
    _set_model_state(name, "loaded", home, json_output)


@models_app.command("unload")
def models_unload(name: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Ask the server to unload a model."""
    _set_model_state(name, "unloaded", home, json_output)


# ---------------------------------------------------------------- chat


# ---------------------------------------------------------------- ohttp

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: str) -> timedelta:
    """`90`, `90s`, `15m`, `24h` or `7d`."""
    text = value.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:])
    number = text[:-1] if unit is not None else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        err.print("[red]error:[/] a duration is a number with s, m, h or d, e.g. 24h")
        raise typer.Exit(2) from None
    if seconds < 0:
        err.print("[red]error:[/] a duration cannot be negative")
        raise typer.Exit(2)
    return timedelta(seconds=seconds)


_OHTTP_COLUMNS = ["key_id", "state", "fingerprint", "created_at", "retire_at"]


@ohttp_app.command("keys")
def ohttp_keys(
    all_keys: Annotated[bool, typer.Option("--all", help="Include retired keys.")] = False,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List the OHTTP keys: the current one, previous ones still accepted, (retired)."""
    h = _open(home)
    rows = [k.to_json() for k in _run(lambda: h.ohttp_keys.list_keys(include_retired=all_keys))]
    if json_output:
        _print_json(rows)
    else:
        _table(rows, _OHTTP_COLUMNS, "OHTTP keys")


@ohttp_app.command("rotate")
def ohttp_rotate(
    grace: Annotated[
        str | None,
        typer.Option(
            help="How long the previous key stays accepted, e.g. 24h; 0 retires it at once "
            "(default: BASTION_OHTTP_GRACE_PERIOD_S, 24h)."
        ),
    ] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Publish a new OHTTP key; the previous one is accepted for the grace period, then retired."""
    h = _open(home)
    period = (
        _duration(grace)
        if grace is not None
        else timedelta(seconds=h.settings.ohttp_grace_period_s)
    )
    info = _run(lambda: h.ohttp_keys.rotate(OPERATOR.key_id, period))
    if json_output:
        _print_json(info.to_json())
        return
    out.print(
        f"New OHTTP key {info.key_id} ({info.fingerprint}); the previous key is accepted for "
        f"{period}. A running server publishes it within seconds."
    )


# ---------------------------------------------------------------- chat


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="Model to chat with.")] = "tiny-chat",
    url: Annotated[str, typer.Option(help="Server URL.")] = "http://127.0.0.1:8000",
    key: Annotated[
        str | None, typer.Option(envvar="BASTION_API_KEY", help="API key (default: admin.key).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    e2e: Annotated[
        bool,
        typer.Option(
            "--e2e", help="Encrypt end to end (Oblivious HTTP): only the model's worker reads it."
        ),
    ] = False,
    fingerprint: Annotated[
        list[str] | None,
        typer.Option(
            "--fingerprint",
            help="With --e2e: the server's OHTTP key fingerprint (`bastion ohttp keys`); repeat "
            "for several. Without it the key is trusted on first use and pinned in --pin-file.",
        ),
    ] = None,
    pin_file: Annotated[
        Path | None,
        typer.Option(help="With --e2e: pins file (default ~/.config/bastion/ohttp-pins.json)."),
    ] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """A small interactive chat client (streams the answers). /quit ends it."""
    from bastion.cli.chat import run_chat

    settings = _settings(home)
    token = key
    if token is None:
        try:
            token = settings.admin_key_path.read_text().strip()
        except OSError:
            err.print("[red]error:[/] no --key given and no admin.key in the home directory")
            raise typer.Exit(2) from None
    transport = None
    if e2e:
        from bastion.client import OHTTPTransport

        if fingerprint:
            transport = OHTTPTransport(fingerprints=fingerprint)
        else:
            pins = pin_file or Path.home() / ".config" / "bastion" / "ohttp-pins.json"
            transport = OHTTPTransport(pin_file=pins)
    code = run_chat(
        url, token, model, max_tokens, temperature, json_output, out, err, transport=transport
    )
    raise typer.Exit(code)


def _register_bundle_commands() -> None:
    from bastion.cli.bundles import register

    register(models_app, _open, _print_json, _table, out, err)


_register_bundle_commands()


def _register_quota_commands() -> None:
    from bastion.cli.quotas import register

    register(app, _open, _run, _print_json, _table, out, err)


_register_quota_commands()


def main() -> None:
    app()
