"""What the gateway and the sandboxed worker both speak, and nothing else.

The IPC messages (:mod:`.protocol`) and their framing (:mod:`.framing`), Binary HTTP
(:mod:`.bhttp`, the inner format of end-to-end encrypted requests) and the one QUIC
variable-length integer codec they share (:mod:`.varint`). This package is the bottom of
the import graph: it imports nothing of Bastion's but :mod:`bastion.errors`.
"""
