"""`bastion ohttp`: the Oblivious HTTP keys of end-to-end encryption."""

from __future__ import annotations

from datetime import timedelta
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
from bastion.crypto import hpke
from bastion.identity.principal import OPERATOR

app = typer.Typer(
    help="Manage the Oblivious HTTP keys of end-to-end encryption.", no_args_is_help=True
)


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


_OHTTP_COLUMNS = ["key_id", "kem", "state", "published", "fingerprint", "created_at", "retire_at"]


def _kem(name: str, also: str = "") -> int:
    """The KEM id a --kem value names; a clear error (exit 2) for an unknown one."""
    kem_id = hpke.KEM_NAMES.get(name.strip().lower())
    if kem_id is None:
        known = ", ".join(hpke.KEM_NAMES) + (f" {also}" if also else "")
        err.print(f"[red]error:[/] unknown KEM {name[:40]!r}; use one of {known}")
        raise typer.Exit(2)
    return kem_id


@app.command("keys")
def ohttp_keys(
    all_keys: Annotated[bool, typer.Option("--all", help="Include retired keys.")] = False,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List the OHTTP keys: the current one of each KEM, previous ones still accepted,
    (retired). The KEM says which suite protects a client's requests: mlkem768-x25519 is
    post-quantum (hybrid), x25519 classical."""
    h = open_home(home)
    offered = h.ohttp_keys.kems
    rows = [
        {**k.to_json(), "published": k.state == "current" and k.kem_id in offered}
        for k in run(lambda: h.ohttp_keys.list_keys(include_retired=all_keys))
    ]
    if json_output:
        print_json(rows)
    else:
        table(rows, _OHTTP_COLUMNS, "OHTTP keys")


@app.command("rotate")
def ohttp_rotate(
    grace: Annotated[
        str | None,
        typer.Option(
            help="How long the previous key stays accepted, e.g. 24h; 0 retires it at once "
            "(default: BASTION_OHTTP_GRACE_PERIOD_S, 24h)."
        ),
    ] = None,
    kem: Annotated[
        str,
        typer.Option(
            help="Which KEM's key to rotate: mlkem768-x25519, mlkem768, x25519, or all "
            "(every KEM the server offers, BASTION_OHTTP_KEMS)."
        ),
    ] = "all",
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Publish a new OHTTP key; the previous one is accepted for the grace period, then retired."""
    kem_id = None if kem.strip().lower() == "all" else _kem(kem, also="or all")
    given = _duration(grace) if grace is not None else None
    h = open_home(home)
    period = given if given is not None else timedelta(seconds=h.settings.ohttp_grace_period_s)
    infos = run(lambda: h.ohttp_keys.rotate(OPERATOR.key_id, period, kem_id))
    if json_output:
        print_json([info.to_json() for info in infos])
        return
    for info in infos:
        out.print(
            f"New {info.kem} OHTTP key {info.key_id} ({info.fingerprint}); the previous "
            f"{info.kem} key is accepted for {period}."
        )
    out.print("A running server publishes them within seconds.")


@app.command("retire")
def ohttp_retire(
    kem: Annotated[
        str,
        typer.Option(help="The KEM no longer offered whose keys to retire, e.g. x25519."),
    ],
    grace: Annotated[
        str,
        typer.Option(help="How long until they are retired, e.g. 24h; 0 retires them at once."),
    ] = "0",
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Retire the keys of a KEM the server no longer offers (taken out of
    BASTION_OHTTP_KEMS, or classical under BASTION_OHTTP_REQUIRE_PQ): they are neither
    published nor accepted, but their private keys stay in the database until retired."""
    kem_id = _kem(kem)
    period = _duration(grace)
    h = open_home(home)
    infos = run(lambda: h.ohttp_keys.retire_kem(OPERATOR.key_id, kem_id, period))
    if json_output:
        print_json([info.to_json() for info in infos])
        return
    when = "now" if not period else f"in {period}"
    out.print(f"{len(infos)} {hpke.kem_name(kem_id)} OHTTP key(s) retired {when}.")
