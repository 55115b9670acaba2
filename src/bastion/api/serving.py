"""Which routes a listener serves (api/app.py's routes, api/openapi.py's document)."""

from __future__ import annotations

import enum


class Serving(enum.Enum):
    """Which routes an app serves: every one (one listener), or its listener's share when
    the admin API has a listener of its own (BASTION_ADMIN_LISTEN)."""

    # One listener: every route.
    ALL = "all"
    # The public listener of a split: inference, health, metrics, OpenAPI; admin routes
    # and the console 404.
    PUBLIC = "public"
    # The admin listener: the admin API, the console and the health probes; nothing else.
    ADMIN = "admin"
