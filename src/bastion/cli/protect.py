"""`bastion protect`: each model's protection policy (what its answers reveal).

`show` lists every model's policy, its own or the default; `set` changes one model's
(a running server restarts its worker with it, within its refresh interval). See
docs/model-protection.md.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bastion.cli.common import HomeOpt, JsonOpt, err, open_home, out, print_json, run, table
from bastion.cli.models import PROTECT_KEYS, protect_options
from bastion.identity.principal import OPERATOR
from bastion.models.registry import ModelRecord
from bastion.protection.output import DEFAULT_POLICY, POLICY_OPTION, SCORES_OPTION

app = typer.Typer(
    help="Model protection: what each model's answers reveal (see docs/model-protection.md).",
    no_args_is_help=True,
)
_COLUMNS = ["model", "output", "scores"]


@app.command("show")
def protect_show(
    model: Annotated[str | None, typer.Option("--model", help="One model only.")] = None,
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Each model's output policy: its own, or the default."""
    h = open_home(home)
    records = [run(lambda: h.registry.get(model))] if model else run(h.registry.list)
    rows = [_policy(r) for r in records]
    if json_output:
        print_json(rows)
    else:
        table(rows, _COLUMNS, "Protection policies")


@app.command("set")
def protect_set(
    model: Annotated[str, typer.Argument(help="The model.")],
    settings: Annotated[
        list[str],
        typer.Argument(
            help="output=full|label_only|top_k=K,decimals=D|default, scores=OUTPUT[,OUTPUT]|default"
        ),
    ],
    home: HomeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Change a model's policy; `default` goes back to the default."""
    given = [s for s in settings if not s.endswith("=default")]
    changes: dict[str, str | None] = dict(protect_options(given))
    for reset in (s.removesuffix("=default") for s in settings if s.endswith("=default")):
        if reset not in PROTECT_KEYS:
            err.print(f"[red]error:[/] --protect takes {' or '.join(PROTECT_KEYS)}, got {reset!r}")
            raise typer.Exit(2)
        changes[f"protect.{reset}"] = None
    h = open_home(home)
    record = run(lambda: h.registry.set_protection(OPERATOR, model, changes))
    result = _policy(record)
    if json_output:
        print_json(result)
    else:
        out.print(
            f"Model {record.name}: output {result['output']}; a running server applies it shortly."
        )


def _policy(record: ModelRecord) -> dict[str, str]:
    """A model's policy as shown: its own settings, or what it gets by default."""
    return {
        "model": record.name,
        "output": str(record.options.get(POLICY_OPTION, f"{DEFAULT_POLICY} (default)")),
        "scores": str(record.options.get(SCORES_OPTION, "(by name: prob, score, logit)")),
    }
