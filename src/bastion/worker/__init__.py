"""The worker process: everything in this package runs *inside* the sandbox.

``python -m bastion.worker.main`` loads one model through its runtime, serves the IPC
channel to the gateway, and opens, serves and seals end-to-end encrypted requests
(:mod:`.sealed`, through the pipeline of :mod:`.inner`). It may import
:mod:`bastion.wire`, :mod:`bastion.runtimes`, :mod:`bastion.crypto` and the route
contract, never the gateway's own machinery (database, identities, quotas, HTTP server):
``tests/test_layering.py`` holds it to that.
"""
