"""Runtime model protection: what a model's answers reveal (:mod:`.output`).

Everything here is enforced in the worker, next to the model, so it holds for plaintext
and end-to-end encrypted requests alike; it imports only :mod:`bastion.wire` and
:mod:`bastion.errors`.
"""
