"""`bastion models`: register, load and unload models (bundle commands: cli/bundles.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.cli.common import (
    HomeOpt,
    JsonOpt,
    err,
    open_home,
    out,
    print_json,
    run,
)
from bastion.identity.principal import OPERATOR
from bastion.protection.policy import check_protection_options

# The keys of --protect: model options protect.<key>.
PROTECT_KEYS = (
    "output",
    "scores",
    "monitor",
    "alert_at",
    "throttle_at",
    "block_at",
    "throttle_rps",
    "squeeze",
    "squeeze_range",
    "squeeze_bits",
    "squeeze_image",
    "squeeze_threshold",
    "watermark",
    "guards",
)

app = typer.Typer(help="Manage models.", no_args_is_help=True)


def _set_model_state(name: str, state: str, home: Path | None, json_output: bool) -> None:
    h = open_home(home)
    record = run(lambda: h.registry.set_desired_state(OPERATOR, name, state))
    if json_output:
        print_json({"name": record.name, "desired_state": record.desired_state})
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


ProtectOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--protect",
        help="Protection policy KEY=VALUE (repeat): output=full|label_only|top_k=K,decimals=D "
        "(what answers reveal of the scores; default label_only), "
        "scores=OUTPUT[,OUTPUT] (which outputs are scores), monitor=on|off (extraction "
        "monitor), alert_at|throttle_at|block_at=RISK|off, throttle_rps=N, squeeze=on|off "
        "(adversarial-input detector; squeeze_range=LO,HI, squeeze_bits=N, "
        "squeeze_image=H,W, squeeze_threshold=T). "
        "See docs/model-protection.md.",
    ),
]


def protect_options(pairs: list[str] | None) -> dict[str, str]:
    """`--protect` pairs as model options (protect.KEY), checked now: a bad policy is a
    clear error before anything is registered or imported."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in PROTECT_KEYS:
            err.print(
                f"[red]error:[/] --protect takes {' or '.join(PROTECT_KEYS)}=VALUE, got {pair!r}"
            )
            raise typer.Exit(2)
        options[f"protect.{key}"] = value
    try:
        check_protection_options(options)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    return options


@app.command("add")
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
    protect: ProtectOpt = None,
    unloaded: Annotated[bool, typer.Option("--unloaded", help="Register without loading.")] = False,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Register a model directory in place (a Hugging Face directory or an ONNX file)."""
    options = {**_parse_options(option), **protect_options(protect)}
    h = open_home(home)
    target = path.expanduser().resolve()
    if not target.exists():
        err.print(f"[red]error:[/] {path} does not exist")
        raise typer.Exit(2)
    if target.is_file():
        options.setdefault("file", target.name)
        target = target.parent
    record = run(
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
        print_json({"name": record.name, "runtime": record.runtime, "path": record.path})
    else:
        out.print(f"Registered model {record.name} ({record.runtime}).")


@app.command("load")
def models_load(name: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Ask the server to load a model."""
    _set_model_state(name, "loaded", home, json_output)


@app.command("unload")
def models_unload(name: str, home: HomeOpt = None, json_output: JsonOpt = False) -> None:
    """Ask the server to unload a model."""
    _set_model_state(name, "unloaded", home, json_output)
