"""The errors the client raises: httpx transport errors, so callers see them as such."""

from __future__ import annotations

import httpx


class OHTTPError(httpx.TransportError):
    """The exchange could not be protected or its answer could not be opened."""


class OHTTPKeyError(OHTTPError):
    """The server's key configuration is unusable or does not match the pin."""
