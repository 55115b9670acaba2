"""QUIC variable-length integers (RFC 9000 section 16), as Binary HTTP (RFC 9292) and
chunked Oblivious HTTP use them: the one codec both share."""

from __future__ import annotations

MAX = (1 << 62) - 1
_MASKS = (0x3F, 0x3FFF, 0x3FFF_FFFF, 0x3FFF_FFFF_FFFF_FFFF)
_SMALL = tuple(bytes((value,)) for value in range(64))


def encode(value: int) -> bytes:
    """`value` in its shortest form; ValueError if it is negative or above :data:`MAX`."""
    if 0 <= value < 0x40:
        return _SMALL[value]
    if 0x40 <= value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if 0x4000 <= value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    if 0x4000_0000 <= value <= MAX:
        return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
    raise ValueError("value out of range for a variable-length integer")


def read(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """The integer at `pos` and the position after it, or None if it is not all there
    before `end`. Longer forms than needed are accepted, as RFC 9000 allows."""
    if pos >= end:
        return None
    first = data[pos]
    prefix = first >> 6
    if prefix == 0:
        return first, pos + 1
    stop = pos + (1 << prefix)
    if stop > end:
        return None
    return int.from_bytes(data[pos:stop], "big") & _MASKS[prefix], stop
