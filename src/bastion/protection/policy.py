"""A model's whole protection policy: the ``protect.*`` options of its record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bastion.protection.monitor import monitor_policy_of
from bastion.protection.output import (
    DEFAULT_POLICY,
    POLICY_OPTION,
    PROTECT_PREFIX,
    SCORES_OPTION,
    check_policy_options,
)
from bastion.protection.squeeze import Squeezer

__all__ = ["PROTECT_PREFIX", "check_protection_options", "policy_view"]


def check_protection_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError unless every protection option of a model is valid."""
    check_policy_options(options)
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
    }
