"""Binary HTTP messages (RFC 9292): encode and decode requests and responses.

Both framings are supported: known-length (indicators 0 and 1, every section has a length
prefix) and indeterminate-length (2 and 3, sections end with a zero and content comes in
chunks, so a response can be streamed). The decoders treat their input as hostile: every
length is checked against the bytes that remain, the number of field lines and the total
size are capped, and the only exception they raise is :class:`BhttpError`.

Strings map to bytes as follows: field names and control data are ASCII, and field values
are Latin-1 so that every byte a peer may send (``obs-text``) round-trips unchanged. Field
names are written in lowercase and come back in lowercase (they are case-insensitive).

Truncation (RFC 9292 section 3.8): a message may end right after its header section (no
content, no trailers) or right after its content (no trailers); the missing parts decode as
empty. A message that ends anywhere else is invalid. For an indeterminate-length message
this means that content with at least one chunk must be followed by its zero terminator,
and a trailer section that has begun must be followed by its terminator, so a stream that
is cut short never decodes as a complete message. Trailing zero bytes are padding; any
other byte after the message is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bastion.wire import varint

Fields = tuple[tuple[str, str], ...]
"""Field lines in order: (name, value) pairs, names may repeat."""

DEFAULT_MAX_FIELDS = 256
"""Field lines a decoder accepts per message: headers, trailers and informational ones."""

DEFAULT_MAX_SECTION_BYTES = 64 * 1024
"""Largest field section the streaming decoder buffers before it gives up."""


# RFC 9110 section 5.1: a field name is a token. Uppercase is legal on the wire; it is
# normalised to lowercase on decode and written lowercase on encode.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LOWER_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
# RFC 9113 section 8.2.1, which RFC 9292 section 3.6 adopts for field values.
_INVALID_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_RESERVED_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":status"))
# Control data follows the pseudo-header rules of RFC 9113 section 8.3.1. Scheme, authority
# and path are limited to visible ASCII so that no request can be split when replayed.
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+\-.]*")
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]*")


class BhttpError(ValueError):
    """A binary HTTP message is invalid, truncated or over a limit (never quotes content)."""


def _truncated() -> BhttpError:
    return BhttpError("binary HTTP message is truncated")


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request: control data, header fields, content and trailer fields."""

    method: str
    scheme: str
    authority: str
    path: str
    headers: Fields = ()
    content: bytes = b""
    trailers: Fields = ()

    def header(self, name: str) -> str | None:
        """The first value of the header field `name` (case-insensitive), or None."""
        return _first_value(self.headers, name)


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP response with its informational (1xx) responses in order."""

    status: int
    headers: Fields = ()
    content: bytes = b""
    trailers: Fields = ()
    informational: tuple[tuple[int, Fields], ...] = ()

    def header(self, name: str) -> str | None:
        """The first value of the header field `name` (case-insensitive), or None."""
        return _first_value(self.headers, name)


def _first_value(fields: Fields, name: str) -> str | None:
    wanted = name.lower()
    for field_name, value in fields:
        if field_name.lower() == wanted:
            return value
    return None


# QUIC variable-length integers (RFC 9000 section 16): wire.varint, with this module's error.

_read_varint = varint.read


def _encode_varint(value: int) -> bytes:
    try:
        return varint.encode(value)
    except ValueError:
        raise BhttpError("value too large for a variable-length integer") from None


# Field lines (RFC 9292 section 3.6).


class _FieldRules:
    """Validates the field lines of one section and counts them against the message limit."""

    __slots__ = ("_regular_seen", "_trailers", "fields_left", "lines")

    def __init__(self, *, trailers: bool, fields_left: int) -> None:
        self.fields_left = fields_left
        self.lines: list[tuple[str, str]] = []
        self._regular_seen = False
        self._trailers = trailers

    def check(self, name: bytes, value: bytes) -> bytes:
        """Raise BhttpError unless the line is valid here; return the lowercased name."""
        if self.fields_left <= 0:
            raise BhttpError("binary HTTP message has too many field lines")
        self.fields_left -= 1
        if name[:1] == b":":
            # Pseudo-fields from extensions are allowed, but only first, only in headers,
            # and never the ones that control data replaces.
            if self._trailers or self._regular_seen or name in _RESERVED_PSEUDO:
                raise BhttpError("binary HTTP message has a misplaced pseudo-field")
            if _LOWER_TOKEN.fullmatch(name, 1) is None:
                raise BhttpError("binary HTTP message has an invalid field name")
        else:
            if _TOKEN.fullmatch(name) is None:
                raise BhttpError("binary HTTP message has an invalid field name")
            name = name.lower()
            self._regular_seen = True
        if _INVALID_VALUE.search(value) is not None:
            raise BhttpError("binary HTTP message has an invalid field value")
        return name

    def add(self, name: bytes, value: bytes) -> None:
        """Check a decoded line and keep it."""
        name = self.check(name, value)
        self.lines.append((name.decode("ascii"), value.decode("latin-1")))


def _encode_field_lines(fields: Fields, *, trailers: bool) -> bytes:
    rules = _FieldRules(trailers=trailers, fields_left=len(fields))
    parts: list[bytes] = []
    for name, value in fields:
        try:
            raw_name = name.encode("ascii")
            raw_value = value.encode("latin-1")
        except UnicodeEncodeError:
            raise BhttpError("field names must be ASCII and values Latin-1") from None
        if not raw_name:
            raise BhttpError("field names must not be empty")
        raw_name = rules.check(raw_name, raw_value)
        parts += (_encode_varint(len(raw_name)), raw_name, _encode_varint(len(raw_value)))
        parts.append(raw_value)
    return b"".join(parts)


def _read_field_line(
    data: bytes | bytearray, pos: int, end: int
) -> tuple[bytes, bytes, int] | None:
    """Name, value and end of the field line at `pos`; None if it is not all there.

    A zero name length (the terminator of an indeterminate-length section) comes back as
    an empty name. One-byte lengths, by far the most common, skip the general varint path.
    """
    if pos >= end:
        return None
    name_length = data[pos]
    if name_length < 0x40:
        pos += 1
    else:
        read = _read_varint(data, pos, end)
        if read is None:
            return None
        name_length, pos = read
    if name_length == 0:
        return b"", b"", pos
    name_end = pos + name_length
    if name_end >= end:
        return None
    value_length = data[name_end]
    if value_length < 0x40:
        value_start = name_end + 1
    else:
        read = _read_varint(data, name_end, end)
        if read is None:
            return None
        value_length, value_start = read
    value_end = value_start + value_length
    if value_end > end:
        return None
    return bytes(data[pos:name_end]), bytes(data[value_start:value_end]), value_end


def _parse_known_section(data: bytes | bytearray, pos: int, end: int, rules: _FieldRules) -> None:
    """Parse field lines filling exactly data[pos:end]."""
    while pos < end:
        line = _read_field_line(data, pos, end)
        if line is None:
            raise BhttpError("binary HTTP field line overruns its section")
        name, value, pos = line
        if not name:
            raise BhttpError("binary HTTP message has an empty field name")
        rules.add(name, value)


def _parse_indeterminate_section(data: bytes, pos: int, end: int, rules: _FieldRules) -> int:
    """Parse field lines up to and including the terminator; return the position after it."""
    while True:
        line = _read_field_line(data, pos, end)
        if line is None:
            raise _truncated()
        name, value, pos = line
        if not name:
            return pos
        rules.add(name, value)


# Control data (RFC 9292 sections 3.4 and 3.5).


def _check_request_control(method: bytes, scheme: bytes, authority: bytes, path: bytes) -> None:
    if _TOKEN.fullmatch(method) is None:
        raise BhttpError("binary HTTP request has an invalid method")
    if scheme:
        if _SCHEME.fullmatch(scheme) is None:
            raise BhttpError("binary HTTP request has an invalid scheme")
    elif method != b"CONNECT":
        raise BhttpError("binary HTTP request has no scheme")
    if _VISIBLE_ASCII.fullmatch(authority) is None or _VISIBLE_ASCII.fullmatch(path) is None:
        raise BhttpError("binary HTTP request has an invalid target")
    if not path and scheme.lower() in (b"http", b"https"):
        raise BhttpError("binary HTTP request has an empty path")


def _check_final_status(status: int) -> None:
    if not 200 <= status <= 599:
        raise BhttpError("binary HTTP response has an invalid final status")


def _check_informational_status(status: int) -> None:
    if not 100 <= status <= 199:
        raise BhttpError("binary HTTP response has an invalid informational status")


# Encoding.


def _section(fields: Fields, *, trailers: bool, indeterminate: bool) -> bytes:
    lines = _encode_field_lines(fields, trailers=trailers)
    if indeterminate:
        return lines + b"\x00"
    return _encode_varint(len(lines)) + lines


def _content(content: bytes, *, indeterminate: bool) -> bytes:
    if indeterminate:
        # One chunk for all of it; empty content is just the terminator.
        return _encode_varint(len(content)) + content + b"\x00" if content else b"\x00"
    return _encode_varint(len(content)) + content


def encode_request(request: Request, *, indeterminate: bool = False, padding: int = 0) -> bytes:
    """Encode `request` (framing 0, or 2 if `indeterminate`), followed by `padding` zeros."""
    try:
        control = [
            part.encode("ascii")
            for part in (request.method, request.scheme, request.authority, request.path)
        ]
    except UnicodeEncodeError:
        raise BhttpError("request control data must be ASCII") from None
    _check_request_control(*control)
    parts = [b"\x02" if indeterminate else b"\x00"]
    for part in control:
        parts += (_encode_varint(len(part)), part)
    parts.append(_section(request.headers, trailers=False, indeterminate=indeterminate))
    parts.append(_content(request.content, indeterminate=indeterminate))
    parts.append(_section(request.trailers, trailers=True, indeterminate=indeterminate))
    parts.append(bytes(padding))
    return b"".join(parts)


def encode_response(response: Response, *, indeterminate: bool = False, padding: int = 0) -> bytes:
    """Encode `response` (framing 1, or 3 if `indeterminate`), followed by `padding` zeros."""
    parts = [b"\x03" if indeterminate else b"\x01"]
    for status, fields in response.informational:
        _check_informational_status(status)
        parts.append(_encode_varint(status))
        parts.append(_section(fields, trailers=False, indeterminate=indeterminate))
    _check_final_status(response.status)
    parts.append(_encode_varint(response.status))
    parts.append(_section(response.headers, trailers=False, indeterminate=indeterminate))
    parts.append(_content(response.content, indeterminate=indeterminate))
    parts.append(_section(response.trailers, trailers=True, indeterminate=indeterminate))
    parts.append(bytes(padding))
    return b"".join(parts)


class ResponseEncoder:
    """Writes one indeterminate-length response (framing 3) piece by piece, for streaming.

    Call :meth:`head` once, :meth:`body` any number of times, then :meth:`end` once; using
    them out of that order raises RuntimeError (a bug in the caller, not in the peer).
    """

    __slots__ = ("_stage",)

    def __init__(self) -> None:
        self._stage = 0  # 0: nothing written, 1: head written, 2: ended

    def head(self, status: int, headers: Fields = ()) -> bytes:
        """Framing indicator, final status and header section."""
        if self._stage != 0:
            raise RuntimeError("ResponseEncoder.head() called twice or after end()")
        _check_final_status(status)
        encoded = (
            b"\x03" + _encode_varint(status) + _section(headers, trailers=False, indeterminate=True)
        )
        self._stage = 1
        return encoded

    def body(self, chunk: bytes) -> bytes:
        """One content chunk; b"" for empty input, since a zero-length chunk ends content."""
        if self._stage != 1:
            raise RuntimeError("ResponseEncoder.body() called before head() or after end()")
        if not chunk:
            return b""
        return _encode_varint(len(chunk)) + chunk

    def end(self, trailers: Fields = ()) -> bytes:
        """Content terminator and trailer section; the response is complete after this."""
        if self._stage != 1:
            raise RuntimeError("ResponseEncoder.end() called before head() or twice")
        encoded = b"\x00" + _section(trailers, trailers=True, indeterminate=True)
        self._stage = 2
        return encoded


# One-shot decoding.


def _checked_input(data: bytes | bytearray | memoryview, max_bytes: int | None) -> bytes:
    if max_bytes is not None and len(data) > max_bytes:
        raise BhttpError("binary HTTP message exceeds the size limit")
    return data if isinstance(data, bytes) else bytes(data)


def _required_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    read = _read_varint(data, pos, end)
    if read is None:
        raise _truncated()
    return read


def _length_prefixed(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos < end and data[pos] < 0x40:
        length = data[pos]
        pos += 1
    else:
        length, pos = _required_varint(data, pos, end)
    stop = pos + length
    if stop > end:
        raise _truncated()
    return data[pos:stop], stop


def _decode_section(
    data: bytes, pos: int, end: int, *, known: bool, trailers: bool, fields_left: int
) -> tuple[Fields, int, int]:
    """Fields of one section, the position after it, and the field lines still allowed."""
    rules = _FieldRules(trailers=trailers, fields_left=fields_left)
    if known:
        length, pos = _required_varint(data, pos, end)
        stop = pos + length
        if stop > end:
            raise _truncated()
        _parse_known_section(data, pos, stop, rules)
        pos = stop
    else:
        pos = _parse_indeterminate_section(data, pos, end, rules)
    return tuple(rules.lines), pos, rules.fields_left


def _decode_tail(
    data: bytes, pos: int, end: int, *, known: bool, fields_left: int
) -> tuple[bytes, Fields]:
    """Content, trailers and padding, applying the truncation rules of RFC 9292 3.8."""
    if pos == end:
        return b"", ()
    if known:
        content, pos = _length_prefixed(data, pos, end)
    else:
        chunks: list[bytes] = []
        while True:
            length, pos = _required_varint(data, pos, end)
            if length == 0:
                break
            stop = pos + length
            if stop > end:
                raise _truncated()
            chunks.append(data[pos:stop])
            pos = stop
        content = b"".join(chunks)
    if pos == end:
        return content, ()
    trailers, pos, _ = _decode_section(
        data, pos, end, known=known, trailers=True, fields_left=fields_left
    )
    if data.count(0, pos) != end - pos:
        raise BhttpError("binary HTTP message has non-zero padding")
    return content, trailers


def decode_request(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int | None = None,
    max_fields: int = DEFAULT_MAX_FIELDS,
) -> Request:
    """Decode a known-length (0) or indeterminate-length (2) request; BhttpError if invalid."""
    data = _checked_input(data, max_bytes)
    end = len(data)
    framing, pos = _required_varint(data, 0, end)
    if framing not in (0, 2):
        raise BhttpError("not a binary HTTP request")
    known = framing == 0
    method, pos = _length_prefixed(data, pos, end)
    scheme, pos = _length_prefixed(data, pos, end)
    authority, pos = _length_prefixed(data, pos, end)
    path, pos = _length_prefixed(data, pos, end)
    _check_request_control(method, scheme, authority, path)
    headers, pos, fields_left = _decode_section(
        data, pos, end, known=known, trailers=False, fields_left=max_fields
    )
    content, trailers = _decode_tail(data, pos, end, known=known, fields_left=fields_left)
    return Request(
        method.decode("ascii"),
        scheme.decode("ascii"),
        authority.decode("ascii"),
        path.decode("ascii"),
        headers,
        content,
        trailers,
    )


def decode_response(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int | None = None,
    max_fields: int = DEFAULT_MAX_FIELDS,
) -> Response:
    """Decode a known-length (1) or indeterminate-length (3) response; BhttpError if invalid.

    Each informational response counts as one field line against `max_fields`.
    """
    data = _checked_input(data, max_bytes)
    end = len(data)
    framing, pos = _required_varint(data, 0, end)
    if framing not in (1, 3):
        raise BhttpError("not a binary HTTP response")
    known = framing == 1
    fields_left = max_fields
    informational: list[tuple[int, Fields]] = []
    while True:
        status, pos = _required_varint(data, pos, end)
        if not 100 <= status <= 199:
            break
        if fields_left <= 0:
            raise BhttpError("binary HTTP message has too many field lines")
        fields, pos, fields_left = _decode_section(
            data, pos, end, known=known, trailers=False, fields_left=fields_left - 1
        )
        informational.append((status, fields))
    _check_final_status(status)
    headers, pos, fields_left = _decode_section(
        data, pos, end, known=known, trailers=False, fields_left=fields_left
    )
    content, trailers = _decode_tail(data, pos, end, known=known, fields_left=fields_left)
    return Response(status, headers, content, trailers, tuple(informational))


# Streaming decoding.


@dataclass(frozen=True, slots=True)
class Head:
    """The final status and header section of a response."""

    status: int
    headers: Fields = ()


@dataclass(frozen=True, slots=True)
class Body:
    """Some content bytes, in order; chunk boundaries carry no meaning."""

    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    """The response is complete; its trailer section."""

    trailers: Fields = ()


ResponseEvent = Head | Body | End

# Decoder states, and which section a _SECTION state is reading.
_FRAMING, _STATUS, _SECTION, _CONTENT, _CHUNK, _DONE = range(6)
_INFORMATIONAL, _HEADERS, _TRAILERS = range(3)


class ResponseDecoder:
    """Decodes a response as its bytes arrive, split anywhere (client side of streaming).

    :meth:`feed` returns the events the new bytes complete: one :class:`Head`, then
    :class:`Body` events as soon as content bytes arrive (also for known-length responses),
    then one :class:`End`. Informational (1xx) responses are checked and skipped. Call
    :meth:`finish` when the input ends: it raises BhttpError if the response is incomplete,
    and returns the End of a response whose empty content or trailers were truncated.
    After any BhttpError the decoder refuses further input.
    """

    __slots__ = (
        "_buffer",
        "_chunks_seen",
        "_failed",
        "_fed",
        "_fields_left",
        "_known",
        "_max_bytes",
        "_max_section_bytes",
        "_purpose",
        "_remaining",
        "_rules",
        "_section_bytes",
        "_section_length",
        "_state",
        "_status",
    )

    def __init__(
        self,
        *,
        max_bytes: int | None = None,
        max_fields: int = DEFAULT_MAX_FIELDS,
        max_section_bytes: int = DEFAULT_MAX_SECTION_BYTES,
    ) -> None:
        self._max_bytes = max_bytes
        self._max_section_bytes = max_section_bytes
        self._fields_left = max_fields
        self._buffer = bytearray()
        self._fed = 0
        self._failed = False
        self._state = _FRAMING
        self._known = False
        self._status = 0
        self._purpose = _HEADERS
        self._rules = _FieldRules(trailers=False, fields_left=max_fields)
        self._section_length = -1  # known-length sections: -1 until the length is read
        self._section_bytes = 0
        self._remaining = 0  # content bytes left in the current chunk
        self._chunks_seen = False

    def feed(self, data: bytes) -> list[ResponseEvent]:
        """Take the next bytes of the message; return the events they complete."""
        if self._failed:
            raise BhttpError("binary HTTP response already failed to decode")
        events: list[ResponseEvent] = []
        try:
            self._fed += len(data)
            if self._max_bytes is not None and self._fed > self._max_bytes:
                raise BhttpError("binary HTTP message exceeds the size limit")
            if self._buffer:
                self._buffer += data
                consumed = self._advance(self._buffer, events)
                del self._buffer[:consumed]
            else:
                # Nothing pending: parse the caller's bytes in place, keep only the rest.
                consumed = self._advance(data, events)
                self._buffer += memoryview(data)[consumed:]
        except BhttpError:
            self._failed = True
            raise
        return events

    def finish(self) -> list[ResponseEvent]:
        """Declare the end of input: [End] if that completes a truncated response, else []."""
        if self._failed:
            raise BhttpError("binary HTTP response already failed to decode")
        if self._state == _DONE:
            return []
        if not self._buffer:
            # RFC 9292 3.8: empty content and trailers may be left out, nothing else.
            content_omitted = self._state == _CONTENT and (self._known or not self._chunks_seen)
            trailers_omitted = (
                self._state == _SECTION
                and self._purpose == _TRAILERS
                and self._section_length < 0
                and not self._rules.lines
            )
            if content_omitted or trailers_omitted:
                self._state = _DONE
                return [End()]
        self._failed = True
        raise _truncated()

    def _advance(self, data: bytes | bytearray, events: list[ResponseEvent]) -> int:
        """Parse as far as `data` allows; return how many bytes were consumed."""
        pos = 0
        end = len(data)
        while True:
            state = self._state
            if state == _CHUNK:
                if pos == end:
                    return pos
                take = min(end - pos, self._remaining)
                events.append(Body(bytes(data[pos : pos + take])))
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    if self._known:
                        self._begin_section(_TRAILERS)
                    else:
                        self._state = _CONTENT
                continue
            if state == _DONE:
                if data.count(0, pos) != end - pos:
                    raise BhttpError("binary HTTP message has non-zero padding")
                return end
            if state == _SECTION:
                after = self._step_section(data, pos, end, events)
            else:
                read = _read_varint(data, pos, end)
                after = None
                if read is not None:
                    value, after = read
                    self._on_integer(value)
            if after is None:
                return pos
            pos = after

    def _on_integer(self, value: int) -> None:
        state = self._state
        if state == _FRAMING:
            if value not in (1, 3):
                raise BhttpError("not a binary HTTP response")
            self._known = value == 1
            self._state = _STATUS
        elif state == _STATUS:
            if 100 <= value <= 199:
                if self._fields_left <= 0:
                    raise BhttpError("binary HTTP message has too many field lines")
                self._fields_left -= 1
                self._begin_section(_INFORMATIONAL)
            else:
                _check_final_status(value)
                self._status = value
                self._begin_section(_HEADERS)
        elif value == 0:  # _CONTENT: the terminator, or a known length of zero
            self._begin_section(_TRAILERS)
        else:
            self._chunks_seen = True
            self._remaining = value
            self._state = _CHUNK

    def _begin_section(self, purpose: int) -> None:
        self._state = _SECTION
        self._purpose = purpose
        self._rules = _FieldRules(trailers=purpose == _TRAILERS, fields_left=self._fields_left)
        self._section_length = -1
        self._section_bytes = 0

    def _step_section(
        self, data: bytes | bytearray, pos: int, end: int, events: list[ResponseEvent]
    ) -> int | None:
        """Consume one piece of a field section; None if more bytes are needed."""
        if self._known:
            if self._section_length < 0:
                read = _read_varint(data, pos, end)
                if read is None:
                    return None
                self._section_length, pos = read
                if self._section_length > self._max_section_bytes:
                    raise BhttpError("binary HTTP field section exceeds the size limit")
                return pos
            stop = pos + self._section_length
            if stop > end:
                return None
            _parse_known_section(data, pos, stop, self._rules)
            self._end_section(events)
            return stop
        line = _read_field_line(data, pos, end)
        if line is None:
            # Every byte from pos belongs to this incomplete line: bound what we buffer.
            if self._section_bytes + (end - pos) > self._max_section_bytes:
                raise BhttpError("binary HTTP field section exceeds the size limit")
            return None
        name, value, stop = line
        if not name:
            self._end_section(events)
            return stop
        self._section_bytes += stop - pos
        if self._section_bytes > self._max_section_bytes:
            raise BhttpError("binary HTTP field section exceeds the size limit")
        self._rules.add(name, value)
        return stop

    def _end_section(self, events: list[ResponseEvent]) -> None:
        self._fields_left = self._rules.fields_left
        fields = tuple(self._rules.lines)
        if self._purpose == _INFORMATIONAL:
            self._state = _STATUS
        elif self._purpose == _HEADERS:
            events.append(Head(self._status, fields))
            self._state = _CONTENT
        else:
            events.append(End(fields))
            self._state = _DONE
