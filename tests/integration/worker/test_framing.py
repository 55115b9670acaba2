"""Length-prefixed frames, cut from a byte stream however it is chunked."""

from __future__ import annotations

import socket
import struct

import pytest

from bastion.wire.framing import HEADER_BYTES, FrameDecoder, FrameTooLarge, encode_frame
from bastion.wire.protocol import Heartbeat, TextDelta, decode_from_worker, encode

pytestmark = pytest.mark.integration

MESSAGES = [
    Heartbeat(in_flight=3),
    TextDelta(id=7, index=0, text="héllo"),
    TextDelta(id=8, index=1, text="x" * 5000),
]


def test_a_frame_is_a_little_endian_length_then_the_messagepack_body() -> None:
    message = TextDelta(id=1, index=0, text="abc")
    frame = bytes(encode_frame(message))
    body = encode(message)
    assert frame == struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 64, 4096, 1 << 20])
def test_frames_survive_any_chunking(chunk_size: int) -> None:
    stream = b"".join(bytes(encode_frame(message)) for message in MESSAGES)
    decoder = FrameDecoder()
    bodies: list[bytes] = []
    for start in range(0, len(stream), chunk_size):
        bodies.extend(decoder.feed(stream[start : start + chunk_size]))
    assert [decode_from_worker(body) for body in bodies] == MESSAGES
    assert decoder.buffered == 0


def test_frames_cross_a_real_socket() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        for message in MESSAGES:
            left.sendall(encode_frame(message))
        left.shutdown(socket.SHUT_WR)
        decoder = FrameDecoder()
        bodies: list[bytes] = []
        while chunk := right.recv(1000):
            bodies.extend(decoder.feed(chunk))
    assert [decode_from_worker(body) for body in bodies] == MESSAGES


def test_an_oversized_header_raises_before_anything_is_buffered() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    # Half a header waits; the rest completes it and is refused at once, body unsent.
    assert decoder.feed(struct.pack("<I", 2**31)[:2]) == []
    with pytest.raises(FrameTooLarge) as caught:
        decoder.feed(struct.pack("<I", 2**31)[2:])
    assert caught.value.size == 2**31
    assert caught.value.limit == 100


def test_the_limit_is_inclusive() -> None:
    decoder = FrameDecoder(max_frame_bytes=10)
    assert decoder.feed(struct.pack("<I", 10) + b"0123456789") == [b"0123456789"]
    with pytest.raises(FrameTooLarge):
        decoder.feed(struct.pack("<I", 11))


def test_a_partial_frame_is_held_until_complete() -> None:
    decoder = FrameDecoder()
    frame = bytes(encode_frame(MESSAGES[2]))
    assert decoder.feed(frame[: HEADER_BYTES + 10]) == []
    assert decoder.buffered == HEADER_BYTES + 10
    (body,) = decoder.feed(frame[HEADER_BYTES + 10 :])
    assert decode_from_worker(body) == MESSAGES[2]
    assert decoder.buffered == 0
