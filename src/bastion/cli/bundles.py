"""`bastion models import|verify|export|list|remove`: models and their bundles (scanned,
signed, encrypted), with the live states a running server publishes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from bastion.bootstrap import Home
from bastion.cli.common import HomeOpt, JsonOpt, err, open_home, out, print_json, table
from bastion.cli.models import ProtectOpt, protect_options
from bastion.cli.models import app as models_app
from bastion.errors import BastionError

if TYPE_CHECKING:
    from bastion.models.bundle_store import BundleStore

VersionOpt = Annotated[str | None, typer.Option(help="Bundle version (default: the latest).")]


# The model modules (ONNX, signing) load only for these commands: every other
# `bastion` command starts as fast as before.
def _store(h: Home) -> BundleStore:
    from bastion.models.bundle_store import BundleStore

    return BundleStore(h.settings.home, h.keyring)


@contextmanager
def _failures() -> Iterator[None]:
    from bastion.models.bundle.reader import IntegrityError
    from bastion.models.scan import UnsafeModel

    try:
        yield
    except UnsafeModel as exc:
        err.print(f"[red]refused:[/] {exc.path}: {exc.reason}", highlight=False)
        raise typer.Exit(1) from None
    except IntegrityError as exc:
        err.print(f"[red]integrity check failed:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except BastionError as exc:
        err.print(f"[red]error:[/] {exc.message}", highlight=False)
        raise typer.Exit(1) from None


@contextmanager
def progress_bar(total: int, what: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    with Progress(
        TextColumn(what),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=total)
        yield lambda done: bar.advance(task, done)


@models_app.command("import")
def models_import(
    source: Annotated[Path, typer.Argument(help="HF directory, .onnx or .safetensors file.")],
    name: Annotated[str, typer.Option(help="Model name.")],
    version: Annotated[str | None, typer.Option(help="Version (default: next number).")] = None,
    runtime: Annotated[
        str | None,
        typer.Option(
            help="Also serve it with this runtime (onnx, text-generation, "
            "sentence-embedding): registered and loaded from the bundle."
        ),
    ] = None,
    signature: Annotated[
        Path | None,
        typer.Option(help="The publisher's OpenSSF Model Signing signature of the model."),
    ] = None,
    publisher_key: Annotated[
        Path | None,
        typer.Option(help="The publisher's public key (PEM) the signature must verify with."),
    ] = None,
    protect: ProtectOpt = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Scan a model, refuse anything unsafe, and store it signed and encrypted."""
    protection = protect_options(protect)
    if protection and runtime is None:
        err.print("[red]error:[/] --protect needs --runtime: a policy belongs to a served model")
        raise typer.Exit(2)
    if (signature is None) != (publisher_key is None):
        err.print("[red]error:[/] --signature and --publisher-key go together")
        raise typer.Exit(2)
    try:
        published = signature.read_bytes() if signature is not None else None
        publishers = [publisher_key.read_bytes()] if publisher_key is not None else []
    except OSError as exc:
        err.print(f"[red]error:[/] cannot read {exc.filename}")
        raise typer.Exit(2) from None
    from bastion.identity.principal import OPERATOR
    from bastion.models.bundle_store import BUNDLE_OPTION
    from bastion.models.scan import limits_from_settings

    h = open_home(home)
    bundles = _store(h)
    total = _source_bytes(source)
    started = time.monotonic()
    with _failures(), progress_bar(total, "importing", json_output) as advance:
        bundle = bundles.import_model(
            source,
            name,
            version,
            limits=limits_from_settings(h.settings),
            progress=advance,
            publisher_signature=published,
            publisher_keys=publishers,
        )
    seconds = time.monotonic() - started
    if runtime is not None:
        with _failures():
            h.registry.register(
                OPERATOR,
                name=bundle.name,
                runtime=runtime,
                path=bundles.relative_path(bundle),
                options={BUNDLE_OPTION: bundle.version, **protection},
                description=f"Signed, encrypted bundle version {bundle.version}.",
                replace=True,
            )
    result = {
        "name": bundle.name,
        "version": bundle.version,
        "served": runtime is not None,
        "files": [f.path for f in bundle.files],
        "bytes": bundle.total_bytes,
        "signer": bundle.signer,
        "seconds": round(seconds, 3),
        "mb_per_s": round(bundle.total_bytes / 1e6 / max(seconds, 1e-9), 1),
    }
    if json_output:
        print_json(result)
        return
    out.print(
        f"Imported {bundle.name} version {bundle.version}: {len(bundle.files)} files, "
        f"{bundle.total_bytes / 1e6:.1f} MB, signed and encrypted, in {seconds:.1f} s."
    )


@models_app.command("verify")
def models_verify(
    name: str, version: VersionOpt = None, home: HomeOpt = None, json_output: JsonOpt = False
) -> None:
    """Decrypt and check every file of a bundle against its signed manifest (in memory)."""
    bundles = _store(open_home(home))
    with _failures():
        bundle = bundles.get(name, version)
        started = time.monotonic()
        with progress_bar(bundle.total_bytes, "verifying", json_output) as advance:
            verified = bundles.verify(bundle, progress=advance)
    seconds = time.monotonic() - started
    result = {
        "name": bundle.name,
        "version": bundle.version,
        "ok": True,
        "files": len(verified.manifest.files),
        "signer": verified.manifest.signer_key_id,
        "mb_per_s": round(bundle.total_bytes / 1e6 / max(seconds, 1e-9), 1),
    }
    if json_output:
        print_json(result)
    else:
        out.print(f"{bundle.name} version {bundle.version}: every file verified.")


@models_app.command("export")
def models_export(
    name: str,
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for the files.")],
    version: VersionOpt = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Write a bundle's verified plaintext files and its signature (model.sig); the signing
    public key goes beside the directory, as <out>.public.pem."""
    bundles = _store(open_home(home))
    with _failures():
        bundle = bundles.get(name, version)
        with progress_bar(bundle.total_bytes, "verifying", json_output) as advance:
            bundles.export(bundle, out_dir, progress=advance)
    public = out_dir.parent / f"{out_dir.name}.public.pem"
    result = {
        "directory": str(out_dir),
        "signature": str(out_dir / "model.sig"),
        "public_key": str(public),
    }
    if json_output:
        print_json(result)
    else:
        out.print(
            f"Exported to {out_dir}. Check it with: model_signing verify key {out_dir} "
            f"--signature {out_dir / 'model.sig'} --public_key {public}"
        )


@models_app.command("list")
def models_list(home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """List models: registered ones, stored bundle versions, and the live state (such as
    integrity_failed, with its reason) that the running servers report."""
    from bastion.models.bundle_store import BUNDLE_OPTION
    from bastion.models.status import PublishedStatus, StatusBoard, summarize

    h = open_home(home)
    bundles = _store(h)
    with _failures():
        records = {r.name: r for r in h.registry.list()}
        published: dict[str, list[PublishedStatus]] = {}
        for report in StatusBoard(h.db).rows():
            published.setdefault(report.name, []).append(report)
        stored = {name: bundles.versions(name) for name in bundles.names()}
    rows: list[dict[str, Any]] = []
    for name in sorted(records.keys() | stored.keys()):
        record = records.get(name)
        reports = published.get(name, [])
        # Ready if a running server has it ready (see bastion.models.status.summarize).
        status = summarize(reports) if reports else None
        served = record.options.get(BUNDLE_OPTION) if record is not None else None
        rows.append(
            {
                "name": name,
                "runtime": record.runtime if record is not None else None,
                "registered": record is not None,
                # The bundle version served; None for a plain directory registered in place.
                "version": served,
                "bundle_versions": stored.get(name, []),
                "desired_state": record.desired_state if record is not None else None,
                # As last published by the running servers; None when none reports it.
                "state": status.state if status is not None else None,
                # True when no server has confirmed it lately (they may be gone).
                "state_stale": status.stale() if status is not None else None,
                "detail": status.detail if status is not None else None,
                "restarts": status.restarts if status is not None else None,
                "state_since": status.since.isoformat() if status is not None else None,
                # What each server (gateway) sharing the database reports.
                "gateways": [
                    {
                        "gateway": report.gateway,
                        "state": report.state,
                        "detail": report.detail,
                        "restarts": report.restarts,
                        "since": report.since.isoformat(),
                        "stale": report.stale(),
                    }
                    for report in reports
                ],
                "description": record.description if record is not None else "",
            }
        )
    if json_output:
        print_json(rows)
        return
    for row in rows:
        live = [g for g in row["gateways"] if not g["stale"]]
        if row["state_stale"]:
            row["state"] = f"{row['state']} (stale: no server reports it)"
        elif len(live) > 1 and len({g["state"] for g in live}) > 1:
            agreeing = sum(1 for g in live if g["state"] == row["state"])
            row["state"] = f"{row['state']} ({agreeing} of {len(live)} servers)"
        if row["version"] is None and row["registered"]:
            row["version"] = "plain"
        elif not row["registered"]:
            row["desired_state"] = "not served"
    table(
        rows,
        ["name", "runtime", "version", "bundle_versions", "desired_state", "state", "detail"],
        "Models",
    )


@models_app.command("remove")
def models_remove(
    name: str,
    version: Annotated[
        str | None,
        typer.Option(help="Delete only this stored bundle version (not the one served)."),
    ] = None,
    keep_bundles: Annotated[
        bool, typer.Option("--keep-bundles", help="Unregister, but keep the stored bundles.")
    ] = False,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Unregister a model (a running server stops its worker) and delete its bundles."""
    from bastion.errors import Conflict, ModelNotFound, NotFound
    from bastion.identity.principal import OPERATOR
    from bastion.models.bundle_store import BUNDLE_OPTION

    h = open_home(home)
    bundles = _store(h)
    with _failures():
        try:
            record = h.registry.get(name)
        except ModelNotFound:
            record = None
        if version is not None:
            if record is not None and record.options.get(BUNDLE_OPTION) == version:
                raise Conflict(
                    f"Version {version} of '{name}' is the one served: import or choose "
                    "another first, or remove the model."
                )
            deleted = bundles.remove(name, version)
            unregistered = False
        else:
            has_bundles = bool(bundles.versions(name))
            if record is None and not has_bundles:
                raise NotFound(f"The model '{name}' does not exist.")
            if record is not None:
                h.registry.remove(OPERATOR, name)
            deleted = bundles.remove(name) if has_bundles and not keep_bundles else []
            unregistered = record is not None
    result = {"name": name, "unregistered": unregistered, "deleted_versions": deleted}
    if json_output:
        print_json(result)
        return
    done = ["unregistered"] if unregistered else []
    if deleted:
        done.append(
            "deleted bundle version" + ("s " if len(deleted) > 1 else " ") + ", ".join(deleted)
        )
    out.print(f"{name}: {' and '.join(done)}.", highlight=False)


def _source_bytes(source: Path) -> int:
    if source.is_file():
        return source.stat().st_size
    return sum(p.stat().st_size for p in source.rglob("*") if p.is_file() and not p.is_symlink())
