"""The QUIC variable-length integer codec that Binary HTTP and chunked OHTTP share."""

from __future__ import annotations

import pytest

from bastion.wire import varint

# RFC 9000 appendix A.1: sample variable-length integer decodings.
RFC_9000_SAMPLES = [
    ("c2197c5eff14e88c", 151_288_809_941_952_652),
    ("9d7f3e7d", 494_878_333),
    ("7bbd", 15_293),
    ("25", 37),
    ("4025", 37),  # a longer form than needed is still 37
]


@pytest.mark.parametrize(("encoded", "value"), RFC_9000_SAMPLES)
def test_the_rfc_samples_decode(encoded: str, value: int) -> None:
    data = bytes.fromhex(encoded)
    assert varint.read(data, 0, len(data)) == (value, len(data))


@pytest.mark.parametrize("value", [0, 63, 64, 16_383, 16_384, 2**30 - 1, 2**30, varint.MAX])
def test_encoding_is_shortest_and_round_trips(value: int) -> None:
    data = varint.encode(value)
    assert len(data) == (1 if value < 64 else 2 if value < 2**14 else 4 if value < 2**30 else 8)
    assert varint.read(b"xx" + data, 2, 2 + len(data)) == (value, 2 + len(data))


@pytest.mark.parametrize("value", [-1, varint.MAX + 1])
def test_out_of_range_values_are_refused(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        varint.encode(value)


def test_an_integer_cut_short_reads_as_not_there_yet() -> None:
    data = bytes.fromhex("9d7f3e7d")
    assert varint.read(data, 0, 3) is None
    assert varint.read(data, 4, 4) is None
