"""Length-prefixed frames: how IPC messages travel over a Unix stream socket.

A frame is a 4-byte little-endian body length followed by the body, one msgspec MessagePack
message (:mod:`bastion.wire.protocol`). Both sides use :func:`encode_frame` to write and a
:class:`FrameDecoder` to cut the byte stream back into bodies. The decoder checks every
announced length against its limit as soon as the 4-byte header is in, before buffering
any of the body, so a peer that announces a huge frame costs nothing but a fault.
"""

from __future__ import annotations

import struct

import msgspec

from bastion.wire.protocol import Message

MiB = 1024 * 1024
#: Largest frame body accepted by default, in either direction.
MAX_MESSAGE_BYTES = 64 * MiB
HEADER = struct.Struct("<I")
HEADER_BYTES = HEADER.size

# The same MessagePack settings as protocol.encode; encode_into lets the header and the body
# share one buffer, so a frame is built without copying the body.
_encoder = msgspec.msgpack.Encoder()


class FrameTooLarge(Exception):
    """A frame header announced more bytes than the reader accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a frame of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


def encode_frame(message: Message) -> bytearray:
    """`message` as one frame: header and MessagePack body in a single buffer."""
    frame = bytearray(HEADER_BYTES)
    _encoder.encode_into(message, frame, HEADER_BYTES)
    HEADER.pack_into(frame, 0, len(frame) - HEADER_BYTES)
    return frame


class FrameDecoder:
    """Cuts a byte stream into frame bodies; not thread-safe (one reader per stream).

    :meth:`feed` returns the bodies completed by a chunk. A frame that spans chunks is
    gathered in a private buffer, which is joined only once the frame is complete.
    """

    __slots__ = ("_buffer", "_limit", "_wanted")

    def __init__(self, max_frame_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._limit = max_frame_bytes
        self._buffer = bytearray()
        # Bytes the buffer needs before the pending frame (or its header) is complete.
        self._wanted = HEADER_BYTES

    @property
    def buffered(self) -> int:
        """Bytes held for a frame that is not complete yet."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[bytes]:
        """The bodies of the frames that `chunk` completes, in order.

        Raises FrameTooLarge as soon as a header announces more than the limit; the stream
        cannot be resynchronised after that, so the caller must drop the connection.
        """
        buffer = self._buffer
        if buffer:
            buffer += chunk
            if len(buffer) < self._wanted:
                return []
            chunk = bytes(buffer)
            buffer.clear()
        end = len(chunk)
        bodies: list[bytes] = []
        position = 0
        limit = self._limit
        unpack_from = HEADER.unpack_from
        while end - position >= HEADER_BYTES:
            (size,) = unpack_from(chunk, position)
            if size > limit:
                raise FrameTooLarge(size, limit)
            start = position + HEADER_BYTES
            if end - start < size:
                self._wanted = HEADER_BYTES + size
                break
            position = start + size
            bodies.append(chunk[start:position])
        else:
            self._wanted = HEADER_BYTES
        if position < end:
            buffer += chunk[position:] if position else chunk
        return bodies
