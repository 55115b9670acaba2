"""A model's whole protection policy: the ``protect.*`` options of its record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bastion.protection.guards import guard_names
from bastion.protection.monitor import monitor_policy_of
from bastion.protection.output import (
    DEFAULT_POLICY,
    POLICY_OPTION,
    PROTECT_PREFIX,
    SCORES_OPTION,
    check_policy_options,
)
from bastion.protection.shield import WATERMARK_OPTION, watermark_on, watermark_rate_of
from bastion.protection.squeeze import Squeezer

__all__ = [
    "PROTECT_PREFIX",
    "WATERMARK_OPTION",
    "check_protection_options",
    "policy_view",
    "watermark_on",
]


def check_protection_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError unless every protection option of a model is valid."""
    if str(options.get(WATERMARK_OPTION, "on")).strip().lower() not in ("on", "off"):
        raise ValueError(f"{WATERMARK_OPTION} is on or off.")
    check_policy_options(options)
    watermark_rate_of(options)
    # Names only: a plug-in guard's code is loaded in the model's worker, never here.
    guard_names(options)
    monitor_policy_of(options)
    Squeezer.from_options(options)


def policy_view(options: Mapping[str, Any]) -> dict[str, Any]:
    """A model's protection as shown to its owner: its own settings, or the defaults."""
    try:
        monitor: dict[str, Any] | str = monitor_policy_of(options).describe()
    except ValueError:
        monitor = "invalid"
    return {
        "output": str(options.get(POLICY_OPTION, DEFAULT_POLICY)),
        "output_is_default": POLICY_OPTION not in options,
        "scores": options.get(SCORES_OPTION),
        "monitor": monitor,
        "squeeze": str(options.get("protect.squeeze", "off")),
        "watermark": "on" if watermark_on(options) else "off",
        "guards": guard_names(options) if _valid_guards(options) else "invalid",
    }


def _valid_guards(options: Mapping[str, Any]) -> bool:
    try:
        guard_names(options)
    except ValueError:
        return False
    return True
