"""A model's whole protection policy: the ``protect.*`` options of its record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bastion.protection.monitor import monitor_policy_of
from bastion.protection.output import PROTECT_PREFIX, check_policy_options

__all__ = ["PROTECT_PREFIX", "check_protection_options"]


def check_protection_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError unless every protection option of a model is valid."""
    check_policy_options(options)
    monitor_policy_of(options)
