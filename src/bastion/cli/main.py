"""The `bastion` command: serve, init, tenants, keys, models, quotas, usage, ohttp, chat.

Every command takes --home and --json. Management commands work on the home directory
directly, through the same service layer as the admin API; a running server picks the
changes up from the database within its refresh interval.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bastion.bootstrap import initialise
from bastion.cli import bundles, chat, keys, models, ohttp, protect, quotas, tenants
from bastion.cli.common import HomeOpt, JsonOpt, out, print_json, run, settings_of
from bastion.config import Settings

app = typer.Typer(help="Bastion: a secure Model-as-a-Service server.", no_args_is_help=True)
app.add_typer(tenants.app, name="tenants")
app.add_typer(keys.app, name="keys")
app.add_typer(models.app, name="models")
app.add_typer(ohttp.app, name="ohttp")
app.add_typer(quotas.app, name="quotas")
app.add_typer(protect.app, name="protect")

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

    settings = settings_of(
        home,
        host=host,
        port=port,
        demo_models=False if no_demo_models else None,
        unsafe_no_sandbox=True if unsafe_no_sandbox else None,
    )
    configure_logging(settings.log_level)
    result = run(lambda: initialise(settings))
    _announce(result.admin_token, settings, json_output)
    run(lambda: run_server(result.home))


@app.command()
def init(
    home: HomeOpt = None,
    no_demo_models: Annotated[bool, typer.Option("--no-demo-models")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Create the home directory, master key, admin key and demo models without serving."""
    settings = settings_of(home, demo_models=False if no_demo_models else None)
    result = run(lambda: initialise(settings))
    if json_output:
        print_json(
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
        print_json({"admin_key": token, "admin_key_file": str(settings.admin_key_path)})
        return
    # Printed once, on the start that created it; it also lives in admin.key (mode 0600).
    out.print(
        f"[bold]Admin API key[/] (shown once, also in {settings.admin_key_path}):\n{token}",
        highlight=False,
    )


app.command("chat")(chat.chat)
app.command("usage")(quotas.usage)

# Registered on `bastion models` by importing it (its heavy modules load only when used).
_ = bundles


def main() -> None:
    app()
