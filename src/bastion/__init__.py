"""Bastion: a self-hosted, secure Model-as-a-Service server."""

__version__ = "0.1.0"
