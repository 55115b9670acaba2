"""The gateway's side of its workers: starting, watching, restarting and talking to them.

:mod:`.supervisor` keeps one worker per model, :mod:`.lifecycle` one worker's life,
:mod:`.channel` and :mod:`.connection` the framed IPC channel and :mod:`.peer` who is on
the other end of it. How a worker is confined is :mod:`bastion.sandboxes`' business.
"""
