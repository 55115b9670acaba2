"""The console's HTML: Jinja2 templates with autoescaping, and its two static files.

Templates live in this package's ``templates/`` folder, the stylesheet and the script in
``static/``; both ship as package data, so the console needs nothing from another origin.
Every value a template shows is escaped (autoescape on, and ``StrictUndefined`` so that a
misspelt name fails the page instead of showing nothing).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse, Response

from bastion.console.guard import PAGE_HEADERS

# The static files the console serves, and their media types. Nothing else is served.
STATIC_FILES = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}


def when(value: datetime | float | int | None, unit: str = "s") -> str:
    """A time for people: ``2026-12-06 20:39:14 UTC`` (from a datetime, or Unix seconds,
    or milliseconds with unit "ms"); an empty string for None."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        moment = value.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(value / 1000 if unit == "ms" else value, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def number(value: float | int | None) -> str:
    """A count with thousands separators; a float with at most two decimals."""
    if value is None:
        return ""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


class Pages:
    """The templates, and answers rendered from them."""

    def __init__(self) -> None:
        self.env = Environment(
            loader=PackageLoader("bastion.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = when
        self.env.filters["number"] = number

    def render(self, template: str, context: dict[str, Any], status: int = 200) -> Response:
        html = self.env.get_template(template).render(context)
        return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


class Assets:
    """The console's stylesheet and script, read once from the package."""

    def __init__(self) -> None:
        folder = resources.files("bastion.console") / "static"
        self._files = {name: (folder / name).read_bytes() for name in STATIC_FILES}
        self._etags = {
            name: '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            for name, body in self._files.items()
        }

    def answer(self, name: str, if_none_match: str | None) -> Response | None:
        """The file `name` (304 if the browser has it), or None for a name not served."""
        body = self._files.get(name)
        if body is None:
            return None
        headers = {"etag": self._etags[name], "cache-control": "no-cache"}
        if if_none_match == self._etags[name]:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=STATIC_FILES[name], headers=headers)
