"""Client-side helpers for Bastion: end-to-end encryption for httpx-based clients."""

from bastion.client.errors import OHTTPError, OHTTPKeyError
from bastion.client.ohttp import OHTTPTransport

__all__ = ["OHTTPError", "OHTTPKeyError", "OHTTPTransport"]
