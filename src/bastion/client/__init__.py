"""Client-side helpers for Bastion: end-to-end encryption for httpx-based clients."""

from bastion.client.ohttp import OHTTPError, OHTTPKeyError, OHTTPTransport

__all__ = ["OHTTPError", "OHTTPKeyError", "OHTTPTransport"]
