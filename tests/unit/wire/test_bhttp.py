"""Binary HTTP (RFC 9292): the RFC's own examples, round trips, streaming, and refusals."""

from __future__ import annotations

import dataclasses
import random

import pytest

from bastion.wire.bhttp import (
    BhttpError,
    Body,
    End,
    Head,
    Request,
    Response,
    ResponseDecoder,
    ResponseEncoder,
    ResponseEvent,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


def _hex(dump: str) -> bytes:
    return bytes.fromhex("".join(dump.split()))


# The hex dumps of RFC 9292 section 5, copied without their text columns.

# Section 5.1, "Known-Length Binary Encoding of Request".
RFC_REQUEST_KNOWN = _hex("""
    00034745 54056874 74707300 0a2f6865 6c6c6f2e 74787440 6c0a7573 65722d61
    67656e74 34637572 6c2f372e 31362e33 206c6962 6375726c 2f372e31 362e3320
    4f70656e 53534c2f 302e392e 376c207a 6c69622f 312e322e 3304686f 73740f77
    77772e65 78616d70 6c652e63 6f6d0f61 63636570 742d6c61 6e677561 67650665
    6e2c206d 690000
""")

# Section 5.1, "Indeterminate-Length Binary Encoding of Request" (with 10 bytes of padding).
RFC_REQUEST_INDETERMINATE = _hex("""
    02034745 54056874 74707300 0a2f6865 6c6c6f2e 7478740a 75736572 2d616765
    6e743463 75726c2f 372e3136 2e33206c 69626375 726c2f37 2e31362e 33204f70
    656e5353 4c2f302e 392e376c 207a6c69 622f312e 322e3304 686f7374 0f777777
    2e657861 6d706c65 2e636f6d 0f616363 6570742d 6c616e67 75616765 06656e2c
    206d6900 00000000 00000000 00000000
""")

# Section 5.2, "Binary Response, including Informational Responses" (indeterminate-length).
RFC_RESPONSE_INFORMATIONAL = _hex("""
    03406607 72756e6e 696e670a 22736c65 65702031 35220040 67046c69 6e6b233c
    2f737479 6c652e63 73733e3b 2072656c 3d707265 6c6f6164 3b206173 3d737479
    6c65046c 696e6b24 3c2f7363 72697074 2e6a733e 3b207265 6c3d7072 656c6f61
    643b2061 733d7363 72697074 0040c804 64617465 1d4d6f6e 2c203237 204a756c
    20323030 39203132 3a32383a 35332047 4d540673 65727665 72064170 61636865
    0d6c6173 742d6d6f 64696669 65641d57 65642c20 3232204a 756c2032 30303920
    31393a31 353a3536 20474d54 04657461 67142233 34616133 38372d64 2d313536
    38656230 30220d61 63636570 742d7261 6e676573 05627974 65730e63 6f6e7465
    6e742d6c 656e6774 68023531 04766172 790f4163 63657074 2d456e63 6f64696e
    670c636f 6e74656e 742d7479 70650a74 6578742f 706c6169 6e003348 656c6c6f
    20576f72 6c642120 4d792063 6f6e7465 6e742069 6e636c75 64657320 61207472
    61696c69 6e672043 524c462e 0d0a0000
""")

# Section 5.2, "Known-Length Encoding of Response" (the chunked example, with a trailer).
RFC_RESPONSE_KNOWN = _hex("""
    0140c800 1d546869 7320636f 6e74656e 7420636f 6e746169 6e732043 524c462e
    0d0a0d07 74726169 6c657204 74657874
""")

RFC_REQUEST = Request(
    method="GET",
    scheme="https",
    authority="",
    path="/hello.txt",
    headers=(
        ("user-agent", "curl/7.16.3 libcurl/7.16.3 OpenSSL/0.9.7l zlib/1.2.3"),
        ("host", "www.example.com"),
        ("accept-language", "en, mi"),
    ),
)

RFC_RESPONSE_WITH_INFORMATIONAL = Response(
    status=200,
    headers=(
        ("date", "Mon, 27 Jul 2009 12:28:53 GMT"),
        ("server", "Apache"),
        ("last-modified", "Wed, 22 Jul 2009 19:15:56 GMT"),
        ("etag", '"34aa387-d-1568eb00"'),
        ("accept-ranges", "bytes"),
        ("content-length", "51"),
        ("vary", "Accept-Encoding"),
        ("content-type", "text/plain"),
    ),
    content=b"Hello World! My content includes a trailing CRLF.\r\n",
    informational=(
        (102, (("running", '"sleep 15"'),)),
        (
            103,
            (
                ("link", "</style.css>; rel=preload; as=style"),
                ("link", "</script.js>; rel=preload; as=script"),
            ),
        ),
    ),
)

RFC_RESPONSE_CHUNKED = Response(
    status=200,
    content=b"This content contains CRLF.\r\n",
    trailers=(("trailer", "text"),),
)

FULL_REQUEST = Request(
    method="POST",
    scheme="https",
    authority="api.example.com:8443",
    path="/v1/chat/completions?x=1",
    headers=(
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
        ("accept", "application/json"),
        ("x-empty", ""),
        ("x-latin1", "caf\xe9 \x7f"),
    ),
    content=bytes(range(256)) * 3,
    trailers=(("x-checksum", "abc"), ("x-checksum", "def")),
)

FULL_RESPONSE = Response(
    status=201,
    headers=(("content-type", "text/plain"), ("set-cookie", "a=1"), ("set-cookie", "b=2")),
    content=b"x" * 100 + b"\x00\x01",
    trailers=(("grpc-status", "0"),),
    informational=((100, ()), (103, (("link", "</a.css>"),))),
)


# RFC 9292 section 5, byte for byte.


def test_rfc_known_length_request_encodes_and_decodes() -> None:
    assert encode_request(RFC_REQUEST) == RFC_REQUEST_KNOWN
    assert decode_request(RFC_REQUEST_KNOWN) == RFC_REQUEST


def test_rfc_indeterminate_length_request_encodes_and_decodes() -> None:
    assert encode_request(RFC_REQUEST, indeterminate=True, padding=10) == RFC_REQUEST_INDETERMINATE
    assert decode_request(RFC_REQUEST_INDETERMINATE) == RFC_REQUEST


def test_rfc_truncations_keep_the_meaning() -> None:
    # "the last two bytes ... can each be removed"; "anything up to 12 bytes can be removed".
    for cut in (1, 2):
        assert decode_request(RFC_REQUEST_KNOWN[:-cut]) == RFC_REQUEST
    for cut in range(1, 13):
        assert decode_request(RFC_REQUEST_INDETERMINATE[:-cut]) == RFC_REQUEST
    # One more byte removes the header section's terminator, which may not be omitted.
    with pytest.raises(BhttpError):
        decode_request(RFC_REQUEST_INDETERMINATE[:-13])
    with pytest.raises(BhttpError):
        decode_request(RFC_REQUEST_KNOWN[:-3])


def test_rfc_response_with_informational_responses() -> None:
    encoded = encode_response(RFC_RESPONSE_WITH_INFORMATIONAL, indeterminate=True)
    assert encoded == RFC_RESPONSE_INFORMATIONAL
    decoded = decode_response(RFC_RESPONSE_INFORMATIONAL)
    assert decoded == RFC_RESPONSE_WITH_INFORMATIONAL
    assert decoded.header("Content-Type") == "text/plain"
    assert decoded.header("link") is None  # informational fields are not final headers
    # The same response in known-length framing round-trips as well.
    known = encode_response(RFC_RESPONSE_WITH_INFORMATIONAL)
    assert known[0] == 1
    assert decode_response(known) == RFC_RESPONSE_WITH_INFORMATIONAL


def test_rfc_known_length_response_with_trailer() -> None:
    assert encode_response(RFC_RESPONSE_CHUNKED) == RFC_RESPONSE_KNOWN
    assert decode_response(RFC_RESPONSE_KNOWN) == RFC_RESPONSE_CHUNKED


# Round trips.


@pytest.mark.parametrize("indeterminate", [False, True])
@pytest.mark.parametrize(
    "request_",
    [
        FULL_REQUEST,
        Request("GET", "https", "example.com", "/"),
        Request("OPTIONS", "https", "example.com", "*", headers=(("a", "1"), ("a", "2"))),
        Request("CONNECT", "", "example.com:443", ""),
        Request("GET", "https", "h", "/", headers=((":protocol", "websocket"), ("b", "c"))),
        Request("PUT", "https", "h", "/", trailers=(("t", "v"),)),
    ],
)
def test_request_round_trip(request_: Request, indeterminate: bool) -> None:
    encoded = encode_request(request_, indeterminate=indeterminate)
    assert encoded[0] == (2 if indeterminate else 0)
    assert decode_request(encoded) == request_
    assert decode_request(encoded + bytes(7)) == request_


@pytest.mark.parametrize("indeterminate", [False, True])
@pytest.mark.parametrize(
    "response",
    [
        FULL_RESPONSE,
        Response(204),
        Response(599, headers=(("a", "1"), ("a", "2"))),
        Response(200, trailers=(("t", "v"),)),
        Response(200, content=b"z" * 70_000),
    ],
)
def test_response_round_trip(response: Response, indeterminate: bool) -> None:
    encoded = encode_response(response, indeterminate=indeterminate)
    assert encoded[0] == (3 if indeterminate else 1)
    assert decode_response(encoded) == response


def test_field_names_are_written_lowercase_and_looked_up_case_insensitively() -> None:
    request = Request("GET", "https", "h", "/", headers=(("Content-Type", "a"), ("X-A", "b")))
    decoded = decode_request(encode_request(request))
    assert decoded.headers == (("content-type", "a"), ("x-a", "b"))
    assert decoded.header("CONTENT-TYPE") == "a"
    assert request.header("x-a") == "b"
    assert decoded.header("missing") is None


def test_uppercase_names_on_the_wire_are_accepted_and_lowercased() -> None:
    wire = _hex("00 03474554 056874747073 0168 012f 07 04486f7374 0178")
    assert decode_request(wire).headers == (("host", "x"),)


def test_non_minimal_varints_are_accepted() -> None:
    # Framing 0 as two bytes, method length as four, path length as eight.
    wire = (
        _hex("4000 80000003")
        + b"GET"
        + _hex("05")
        + b"https"
        + _hex("00")
        + _hex("c000000000000001")
        + b"/"
        + _hex("4000")
    )
    assert decode_request(wire) == Request("GET", "https", "", "/")


def test_long_fields_use_longer_varints() -> None:
    for size in (63, 64, 16383, 16384):
        request = Request("GET", "https", "h", "/", headers=(("v", "a" * size),))
        assert decode_request(encode_request(request)).headers[0][1] == "a" * size


# Streaming.


def _collect(events: list[ResponseEvent]) -> tuple[Head, bytes, End]:
    """Check the event order (Head, Body..., End) and fold the bodies together."""
    assert isinstance(events[0], Head)
    assert isinstance(events[-1], End)
    bodies = events[1:-1]
    assert all(isinstance(event, Body) and event.data for event in bodies)
    return (
        events[0],
        b"".join(event.data for event in bodies if isinstance(event, Body)),
        events[-1],
    )


def _expected(response: Response) -> tuple[Head, bytes, End]:
    return Head(response.status, response.headers), response.content, End(response.trailers)


STREAM_CASES = [
    (RFC_RESPONSE_INFORMATIONAL, RFC_RESPONSE_WITH_INFORMATIONAL),
    (RFC_RESPONSE_KNOWN, RFC_RESPONSE_CHUNKED),
    (encode_response(FULL_RESPONSE), FULL_RESPONSE),
    (encode_response(FULL_RESPONSE, indeterminate=True, padding=3), FULL_RESPONSE),
]


@pytest.mark.parametrize(("wire", "response"), STREAM_CASES)
def test_streaming_decode_split_at_every_offset(wire: bytes, response: Response) -> None:
    for offset in range(len(wire) + 1):
        decoder = ResponseDecoder()
        events = decoder.feed(wire[:offset]) + decoder.feed(wire[offset:]) + decoder.finish()
        assert _collect(events) == _expected(response), offset


@pytest.mark.parametrize(("wire", "response"), STREAM_CASES)
def test_streaming_decode_byte_by_byte(wire: bytes, response: Response) -> None:
    decoder = ResponseDecoder()
    events: list[ResponseEvent] = []
    for index in range(len(wire)):
        events += decoder.feed(wire[index : index + 1])
    events += decoder.finish()
    assert _collect(events) == _expected(response)


def test_streaming_yields_body_bytes_as_soon_as_they_arrive() -> None:
    encoder = ResponseEncoder()
    head = encoder.head(200, (("content-type", "text/event-stream"),))
    chunk = encoder.body(b"data: hello\n\n")
    decoder = ResponseDecoder()
    assert decoder.feed(head) == [Head(200, (("content-type", "text/event-stream"),))]
    assert decoder.feed(chunk[:6]) == [Body(b"data:")]
    assert decoder.feed(chunk[6:]) == [Body(b" hello\n\n")]
    assert decoder.feed(encoder.end((("x-tokens", "3"),))) == [End((("x-tokens", "3"),))]
    assert decoder.finish() == []


def test_response_encoder_output_decodes_both_ways() -> None:
    encoder = ResponseEncoder()
    parts = [encoder.head(200, (("a", "b"),)), encoder.body(b"one"), encoder.body(b"")]
    parts += [encoder.body(b"two" * 100), encoder.end()]
    assert parts[2] == b""
    wire = b"".join(parts)
    assert wire[0] == 3
    assert decode_response(wire) == Response(200, (("a", "b"),), b"one" + b"two" * 100)
    decoder = ResponseDecoder()
    assert _collect(decoder.feed(wire) + decoder.finish()) == (
        Head(200, (("a", "b"),)),
        b"one" + b"two" * 100,
        End(),
    )


def test_response_encoder_refuses_misuse() -> None:
    encoder = ResponseEncoder()
    with pytest.raises(RuntimeError):
        encoder.body(b"x")
    with pytest.raises(BhttpError):
        encoder.head(103)
    encoder.head(200)
    with pytest.raises(RuntimeError):
        encoder.head(200)
    encoder.end()
    with pytest.raises(RuntimeError):
        encoder.end()
    with pytest.raises(BhttpError):
        ResponseEncoder().head(200, (("bad", "a\r\nb"),))


def test_streaming_accepts_truncated_empty_parts() -> None:
    known_head_only = encode_response(Response(200, (("a", "b"),)))[:-2]
    indeterminate_head_only = ResponseEncoder().head(200)
    for wire in (known_head_only, indeterminate_head_only):
        decoder = ResponseDecoder()
        assert decoder.feed(wire) == [Head(200, (("a", "b"),) if wire[0] == 1 else ())]
        assert decoder.finish() == [End()]
    # Known-length content given, trailers left out.
    decoder = ResponseDecoder()
    events = decoder.feed(encode_response(Response(200, content=b"hi"))[:-1])
    assert events == [Head(200), Body(b"hi")]
    assert decoder.finish() == [End()]


def test_streaming_refuses_a_stream_cut_short() -> None:
    encoder = ResponseEncoder()
    wire = encoder.head(200) + encoder.body(b"partial")
    decoder = ResponseDecoder()
    assert decoder.feed(wire) == [Head(200), Body(b"partial")]
    with pytest.raises(BhttpError):
        decoder.finish()
    with pytest.raises(BhttpError):
        decoder.feed(b"\x00\x00")  # a failed decoder stays failed
    # The end is terminator, trailer line, terminator: only "terminator alone" may be cut.
    ending = encoder.end((("t", "v"),))
    for length in range(len(ending)):
        decoder = ResponseDecoder()
        decoder.feed(wire + ending[:length])
        if length == 1:
            assert decoder.finish() == [End()]
        else:
            with pytest.raises(BhttpError):
                decoder.finish()


def test_streaming_refusals() -> None:
    wire = encode_response(FULL_RESPONSE, indeterminate=True)
    with pytest.raises(BhttpError):
        ResponseDecoder(max_bytes=len(wire) - 1).feed(wire)
    with pytest.raises(BhttpError):
        ResponseDecoder(max_fields=4).feed(wire)
    with pytest.raises(BhttpError):
        ResponseDecoder().feed(RFC_REQUEST_KNOWN)
    with pytest.raises(BhttpError):
        ResponseDecoder().feed(wire + b"\x01")
    # A field line that never ends is bounded by max_section_bytes, not buffered forever.
    decoder = ResponseDecoder(max_section_bytes=100)
    decoder.feed(b"\x03\x40\xc8\x01a\x80\x00\x10\x00" + b"v" * 50)
    with pytest.raises(BhttpError):
        decoder.feed(b"v" * 60)
    known = ResponseDecoder(max_section_bytes=100)
    with pytest.raises(BhttpError):
        known.feed(b"\x01\x40\xc8\x40\x65")  # a 101-byte known-length header section


# Refusals of the one-shot decoders.


def _full_wires() -> list[bytes]:
    return [
        encode_request(FULL_REQUEST),
        encode_request(FULL_REQUEST, indeterminate=True),
        encode_response(FULL_RESPONSE),
        encode_response(FULL_RESPONSE, indeterminate=True),
    ]


def _decode(wire: bytes, *, request: bool) -> Request | Response:
    return decode_request(wire) if request else decode_response(wire)


def _encode(message: Request | Response, *, indeterminate: bool) -> bytes:
    if isinstance(message, Request):
        return encode_request(message, indeterminate=indeterminate)
    return encode_response(message, indeterminate=indeterminate)


@pytest.mark.parametrize("indeterminate", [False, True])
@pytest.mark.parametrize("message", [FULL_REQUEST, FULL_RESPONSE])
def test_every_truncation_is_refused_but_at_the_two_allowed_points(
    message: Request | Response, indeterminate: bool
) -> None:
    # RFC 9292 3.8: a message may end just after its header section (content and trailers
    # then read as empty) or just before its trailer section (trailers read as empty).
    is_request = isinstance(message, Request)
    wire = _encode(message, indeterminate=indeterminate)
    head_only = dataclasses.replace(message, content=b"", trailers=())
    without_trailers = dataclasses.replace(message, trailers=())
    # Each empty part ends in one byte (a zero length or a terminator): drop them.
    allowed = {
        len(_encode(head_only, indeterminate=indeterminate)) - 2: head_only,
        len(_encode(without_trailers, indeterminate=indeterminate)) - 1: without_trailers,
    }
    assert len(allowed) == 2
    for length in range(len(wire)):
        if length in allowed:
            assert _decode(wire[:length], request=is_request) == allowed[length]
        else:
            with pytest.raises(BhttpError):
                _decode(wire[:length], request=is_request)


def test_lengths_beyond_the_data_are_refused() -> None:
    with pytest.raises(BhttpError):
        decode_request(_hex("00 20") + b"GET")  # method length 32, three bytes follow
    with pytest.raises(BhttpError):
        decode_response(_hex("01 40c8 00 10") + b"short")  # content length 16
    with pytest.raises(BhttpError):
        decode_response(_hex("01 40c8 05 01 61 05 62"))  # value overruns its section
    with pytest.raises(BhttpError):
        decode_response(_hex("03 40c8 00 c0ffffffffffffff") + b"x")  # huge chunk length
    with pytest.raises(BhttpError):
        decode_response(_hex("01 40c8 02 00 00"))  # empty field name


@pytest.mark.parametrize("framing", [b"\x04", b"\x3f", b"\x40\x04", b""])
def test_invalid_framing_indicators_are_refused(framing: bytes) -> None:
    with pytest.raises(BhttpError):
        decode_request(framing + RFC_REQUEST_KNOWN[1:])
    with pytest.raises(BhttpError):
        decode_response(framing + RFC_RESPONSE_KNOWN[1:])


def test_requests_and_responses_are_not_confused() -> None:
    with pytest.raises(BhttpError):
        decode_response(RFC_REQUEST_KNOWN)
    with pytest.raises(BhttpError):
        decode_request(RFC_RESPONSE_KNOWN)


@pytest.mark.parametrize("status", [0, 99, 600, 1000])
def test_invalid_status_codes_are_refused(status: int) -> None:
    with pytest.raises(BhttpError):
        encode_response(Response(status))
    wire = encode_response(Response(200))
    forged = b"\x01" + (status | 0x4000).to_bytes(2, "big") + wire[3:]
    with pytest.raises(BhttpError):
        decode_response(forged)
    with pytest.raises(BhttpError):
        ResponseDecoder().feed(forged)


def test_informational_status_is_not_a_final_status() -> None:
    with pytest.raises(BhttpError):
        encode_response(Response(103))
    with pytest.raises(BhttpError):
        encode_response(Response(200, informational=((200, ()),)))
    # 103 with its header section, then nothing: there is no final response.
    only_informational = _hex("01 4067 00")
    with pytest.raises(BhttpError):
        decode_response(only_informational)
    decoder = ResponseDecoder()
    assert decoder.feed(only_informational) == []
    with pytest.raises(BhttpError):
        decoder.finish()


@pytest.mark.parametrize(
    "value", ["a\rb", "a\nb", "a\x00b", "\r\n", " lead", "trail ", "\ttab", "tab\t"]
)
def test_invalid_field_values_are_refused(value: str) -> None:
    with pytest.raises(BhttpError):
        encode_request(Request("GET", "https", "h", "/", headers=(("x", value),)))
    raw = value.encode("latin-1")
    line = bytes((1,)) + b"x" + bytes((len(raw),)) + raw
    wire = _hex("00 03474554 056874747073 00 012f") + bytes((len(line),)) + line
    with pytest.raises(BhttpError):
        decode_request(wire)
    assert decode_request(wire.replace(raw, b"ok" + b"k" * (len(raw) - 2))).headers


@pytest.mark.parametrize("name", ["", "a b", "a:b", "caf\xe9", "x\r", "(x)", '"q"', ":method"])
def test_invalid_field_names_are_refused(name: str) -> None:
    with pytest.raises(BhttpError):
        encode_request(Request("GET", "https", "h", "/", headers=(("x", "1"), (name, "v"))))
    raw = name.encode("latin-1")
    line = bytes((len(raw),)) + raw + b"\x01v"
    wire = _hex("01 40c8") + bytes((len(line),)) + line
    with pytest.raises(BhttpError):
        decode_response(wire)


def test_pseudo_fields_must_come_first_and_stay_out_of_trailers() -> None:
    with pytest.raises(BhttpError):
        encode_request(Request("GET", "https", "h", "/", headers=(("a", "1"), (":protocol", "x"))))
    with pytest.raises(BhttpError):
        encode_request(Request("GET", "https", "h", "/", trailers=((":protocol", "x"),)))
    with pytest.raises(BhttpError):
        encode_response(Response(200, headers=((":status", "200"),)))
    with pytest.raises(BhttpError):
        decode_response(_hex("01 40c8 0d 01 61 01 31 09 3a70726f746f636f6c 00"))


@pytest.mark.parametrize(
    ("method", "scheme", "authority", "path"),
    [
        ("", "https", "h", "/"),
        ("G T", "https", "h", "/"),
        ("GET", "", "h", "/"),
        ("GET", "1http", "h", "/"),
        ("GET", "https", "h", ""),
        ("GET", "https", "h", "/a b"),
        ("GET", "https", "h\r\nx", "/"),
        ("GET", "https", "h", "/\xe9"),
    ],
)
def test_invalid_control_data_is_refused(
    method: str, scheme: str, authority: str, path: str
) -> None:
    with pytest.raises(BhttpError):
        encode_request(Request(method, scheme, authority, path))
    raw = [part.encode("latin-1") for part in (method, scheme, authority, path)]
    wire = b"\x00" + b"".join(bytes((len(part),)) + part for part in raw) + b"\x00"
    with pytest.raises(BhttpError):
        decode_request(wire)


def test_too_many_fields_are_refused() -> None:
    headers = tuple((f"x-{index}", "v") for index in range(10))
    wire = encode_request(
        Request("GET", "https", "h", "/", headers=headers, trailers=(("t", "v"),))
    )
    assert len(decode_request(wire, max_fields=11).headers) == 10
    with pytest.raises(BhttpError):
        decode_request(wire, max_fields=10)
    # Informational responses count against the same limit.
    many_informational = Response(200, informational=tuple((100, ()) for _ in range(5)))
    encoded = encode_response(many_informational, indeterminate=True)
    assert decode_response(encoded, max_fields=5) == many_informational
    with pytest.raises(BhttpError):
        decode_response(encoded, max_fields=4)
    with pytest.raises(BhttpError):
        ResponseDecoder(max_fields=4).feed(encoded)


def test_oversize_messages_are_refused() -> None:
    wire = encode_request(FULL_REQUEST)
    assert decode_request(wire, max_bytes=len(wire)) == FULL_REQUEST
    with pytest.raises(BhttpError):
        decode_request(wire, max_bytes=len(wire) - 1)
    with pytest.raises(BhttpError):
        decode_response(encode_response(FULL_RESPONSE), max_bytes=10)


def test_non_zero_padding_is_refused() -> None:
    with pytest.raises(BhttpError):
        decode_request(RFC_REQUEST_KNOWN + b"\x00\x01")
    with pytest.raises(BhttpError):
        decode_request(RFC_REQUEST_INDETERMINATE[:-1] + b"\x01")
    with pytest.raises(BhttpError):
        decode_response(RFC_RESPONSE_KNOWN + b"\xff")


def test_errors_never_quote_content() -> None:
    secret = "sk-secret-value"
    wire = encode_request(Request("GET", "https", "h", "/", headers=(("x", secret),)))
    with pytest.raises(BhttpError) as caught:
        decode_request(wire.replace(secret.encode(), b"sk-secret\r\nalue"))
    assert "secret" not in str(caught.value)


def test_hostile_input_only_ever_raises_bhttp_error() -> None:
    # Any other exception escapes and fails the test; the counts show both paths ran.
    rng = random.Random(9292)
    seeds = [*_full_wires(), RFC_REQUEST_KNOWN, RFC_RESPONSE_INFORMATIONAL, RFC_RESPONSE_KNOWN]
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(3000):
        wire = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            if not wire:
                break
            position = rng.randrange(len(wire))
            choice = rng.random()
            if choice < 0.6:
                wire[position] = rng.randrange(256)
            elif choice < 0.8:
                del wire[position:]
            else:
                wire[position:position] = rng.randbytes(rng.randint(1, 9))
        data = bytes(wire)
        for decode in (decode_request, decode_response):
            try:
                decode(data, max_fields=64)
                outcomes["decoded"] += 1
            except BhttpError:
                outcomes["refused"] += 1
        decoder = ResponseDecoder(max_fields=64)
        try:
            decoder.feed(data[:7])
            decoder.feed(data[7:])
            decoder.finish()
            outcomes["decoded"] += 1
        except BhttpError:
            outcomes["refused"] += 1
    assert outcomes["decoded"] > 100
    assert outcomes["refused"] > 100
