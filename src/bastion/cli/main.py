"""The `bastion` command: serve, init, tenants, keys, models, quotas, usage, ohttp, chat.

Every command takes --home and --json. Management commands work on the home directory
directly, through the same service layer as the admin API; a running server picks the
changes up from the database within its refresh interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bastion.bootstrap import Home, initialise
from bastion.cli import audit, bundles, chat, db, keys, models, ohttp, protect, quotas, tenants
from bastion.cli.common import HomeOpt, JsonOpt, err, out, print_json, run, settings_of
from bastion.config import Settings
from bastion.tls import DevCertificate, dev_certificate_paths, ensure_dev_certificate

app = typer.Typer(help="Bastion: a secure Model-as-a-Service server.", no_args_is_help=True)
app.add_typer(tenants.app, name="tenants")
app.add_typer(keys.app, name="keys")
app.add_typer(models.app, name="models")
app.add_typer(ohttp.app, name="ohttp")
app.add_typer(quotas.app, name="quotas")
app.add_typer(protect.app, name="protect")
app.add_typer(audit.app, name="audit")
app.add_typer(db.app, name="db")

# ---------------------------------------------------------------- serve / init

SelfSignedOpt = Annotated[
    bool,
    typer.Option(
        "--self-signed",
        help="Use the home's development TLS certificate (tls/cert.pem), written first if "
        "missing or expiring: for development only.",
    ),
]


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
    tls_cert: Annotated[
        Path | None, typer.Option(help="TLS certificate (PEM, chain first); needs --tls-key.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The TLS certificate's key (PEM).")] = None,
    self_signed: SelfSignedOpt = False,
    admin_listen: Annotated[
        str | None,
        typer.Option(
            help="Serve the admin API on a listener of its own, HOST:PORT (or PORT, on "
            "127.0.0.1); the public listener then refuses admin routes."
        ),
    ] = None,
    admin_client_ca: Annotated[
        Path | None,
        typer.Option(
            help="Require admin clients to present a certificate issued by this CA (PEM): "
            "mutual TLS on the admin listener."
        ),
    ] = None,
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
        tls_cert=str(tls_cert) if tls_cert else None,
        tls_key=str(tls_key) if tls_key else None,
        admin_listen=admin_listen,
        admin_tls_client_ca=str(admin_client_ca) if admin_client_ca else None,
    )
    if self_signed:
        if settings.tls_cert or settings.tls_key:
            err.print("[red]error:[/] --self-signed replaces --tls-cert and --tls-key; give one.")
            raise typer.Exit(2)
        cert, key = dev_certificate_paths(settings.home)
        settings = settings.with_changes(tls_cert=str(cert), tls_key=str(key))
    # How the server listens is checked before the home is touched (its files at start).
    run(settings.listeners)
    configure_logging(settings.log_level)
    result = run(lambda: initialise(settings))
    _announce(result.admin_token, settings, json_output)
    if self_signed:
        created = ensure_dev_certificate(settings.home)
        if created.created and not json_output:
            _announce_certificate(created)
    run(lambda: run_server(result.home))


@app.command()
def init(
    home: HomeOpt = None,
    no_demo_models: Annotated[bool, typer.Option("--no-demo-models")] = False,
    self_signed: Annotated[
        bool,
        typer.Option(
            "--self-signed",
            help="Also write a development TLS certificate and key into the home (tls/): "
            "ECDSA P-256 for localhost, 127.0.0.1 and ::1, valid 90 days.",
        ),
    ] = False,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="Also create the cluster CA (kept in the database, its key sealed by the "
            "key ring) that gateways and their replicas on other hosts use for mutual TLS "
            "(docs/scaling.md). Does nothing if the database has one.",
        ),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Create the home directory, master key, admin key and demo models without serving."""
    settings = settings_of(home, demo_models=False if no_demo_models else None)
    result = run(lambda: initialise(settings))
    certificate = ensure_dev_certificate(settings.home) if self_signed else None
    authority = run(lambda: _cluster_authority(result.home)) if cluster else None
    if json_output:
        described: dict[str, object] = {
            "home": str(settings.home),
            "created": result.created,
            "admin_key": result.admin_token,
            "demo_models": result.demo_models,
        }
        if authority is not None:
            described["cluster_ca_fingerprint"] = authority[0]
            described["cluster_ca_created"] = authority[1]
        if certificate is not None:
            described["tls_cert"] = str(certificate.cert)
            described["tls_key"] = str(certificate.key)
            described["tls_not_after"] = certificate.not_after.isoformat()
        print_json(described)
        return
    _announce(result.admin_token, settings, False)
    if not result.created:
        out.print(f"Home {settings.home} already initialised.")
    if certificate is not None:
        _announce_certificate(certificate)
    if authority is not None:
        state = "created" if authority[1] else "already there"
        out.print(f"Cluster CA ({state}): SHA-256 {authority[0]}", highlight=False)


def _cluster_authority(home: Home) -> tuple[str, bool]:
    """The cluster CA's fingerprint, and whether it was created now."""
    from bastion.cluster.authority import create_authority

    authority, created = create_authority(home.db, home.keyring)
    return authority.fingerprint, created


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


def _announce_certificate(certificate: DevCertificate) -> None:
    state = "written" if certificate.created else "already there"
    out.print(
        f"[bold]Development TLS certificate[/] ({state}, valid until "
        f"{certificate.not_after:%Y-%m-%d}; for localhost, 127.0.0.1 and ::1 only):\n"
        f"  certificate {certificate.cert}\n  key         {certificate.key} (mode 0600)\n"
        "Serve over https with:  bastion serve --self-signed\n"
        f"  (or --tls-cert {certificate.cert} --tls-key {certificate.key})\n"
        f"Clients trust it as their CA:  curl --cacert {certificate.cert} "
        "https://localhost:8000/healthz\n"
        "  Python: httpx.Client(verify=ssl.create_default_context(cafile=<certificate>))",
        highlight=False,
    )


app.command("chat")(chat.chat)
app.command("usage")(quotas.usage)

# Registered on `bastion models` by importing it (its heavy modules load only when used).
_ = bundles


def main() -> None:
    app()
