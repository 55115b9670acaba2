"""Print docs/configuration.md: every BASTION_* variable, by section, from Settings itself.

    .venv/bin/python scripts/configuration_doc.py > docs/configuration.md

tests/unit/test_config.py fails when the committed file is not this script's output.
"""

from __future__ import annotations

import dataclasses
import sys

from bastion.config import ENVIRONMENT, SECTIONS, Settings

_UNITS = {1024 * 1024 * 1024: "GiB", 1024 * 1024: "MiB"}


def _default(value: object) -> str:
    if value is None or value == "":
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value >= 1024 * 1024:
        for size, unit in _UNITS.items():
            if value % size == 0:
                return f"{value // size:,} {unit}".replace(",", " ")
    return str(value)


def render() -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    kinds = {f.name: str(f.type).replace(" | None", "") for f in dataclasses.fields(Settings)}
    lines = [
        "# Configuration reference",
        "",
        "Every setting is an environment variable `BASTION_<NAME>` (and some are `bastion serve`",
        "flags too, which win over the environment). This list is generated from",
        "`src/bastion/config.py` (`scripts/configuration_doc.py`), where a comment above each",
        "setting says what it does; the README's Configuration section explains the common ones.",
        "Secrets (`BASTION_TRANSIT_TOKEN`) are never shown in logs or reprs.",
    ]
    for section in SECTIONS:
        lines += [
            "",
            f"## {section.capitalize()}",
            "",
            "| variable | type | default |",
            "|---|---|---|",
        ]
        for variable in ENVIRONMENT.values():
            if variable.section == section:
                default = _default(defaults[variable.setting])
                if variable.setting == "home":
                    default = "./.bastion"
                lines.append(f"| `{variable.name}` | {kinds[variable.setting]} | {default} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
