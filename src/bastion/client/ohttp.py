"""An httpx transport that sends every API request end-to-end encrypted (Oblivious HTTP).

Plug it under any httpx-based client, the official ``openai`` SDK included::

    client = openai.OpenAI(
        base_url="https://bastion.example/v1",
        api_key=KEY,
        http_client=httpx.Client(transport=OHTTPTransport(fingerprints=["sha256:…"])),
    )

Each request is encoded as Binary HTTP (RFC 9292), encapsulated with HPKE to the server's
OHTTP key (RFC 9458) and posted to ``/v1/ohttp`` with only two readable headers: the API
key and the model name. Answers are decapsulated here; streamed answers (``"stream":
true``) use chunked OHTTP and are decrypted chunk by chunk as they arrive.

The key configuration is fetched from ``/.well-known/ohttp-gateway`` and must match a
pin (:mod:`bastion.client.pins`): fingerprints given by the operator (``bastion ohttp
keys``), or, with `pin_file`, the fingerprint seen on first use (like SSH's known_hosts).
A server that presents another key is refused, so nobody in between can substitute a key
of their own.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

import httpx

from bastion.client.errors import OHTTPError, OHTTPKeyError
from bastion.client.pins import KeyPins
from bastion.crypto import hpke, ohttp
from bastion.wire import bhttp
from bastion.wire.headers import MODEL_HEADER

_AEADS = {
    "aes-128-gcm": hpke.AEAD_AES_128_GCM,
    "chacha20-poly1305": hpke.AEAD_CHACHA20_POLY1305,
}
# Not forwarded inside the encrypted request: connection-specific, or sent outside.
_OMITTED_HEADERS = frozenset(
    {
        "authorization",
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "accept-encoding",
        "date",
    }
)
# The KEMs a client takes by default, preferred first: the post-quantum hybrid whenever a
# server publishes it (draft-ietf-hpke-pq), then ML-KEM-768 alone, then classical X25519.
_KEM_PREFERENCE = (hpke.KEM_MLKEM768_X25519, hpke.KEM_MLKEM768, hpke.KEM_X25519_SHA256)
# First try, then once after a key rotation or a clock correction, then once more.
_ATTEMPTS = 3
_OIP_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)/")


class OHTTPTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Encrypts each request to the server's pinned OHTTP key; works sync and async.

    `fingerprints`: accepted key fingerprints (``sha256:<hex>``, from ``bastion ohttp
    keys``). `pin_file`: a JSON file of pins per server; a server not in it is trusted on
    first use and recorded. One of the two is required. `gateway_url` and `keys_url`
    default to ``/v1/ohttp`` and ``/.well-known/ohttp-gateway`` on the request's origin
    (set them to go through an OHTTP relay). `aead` picks the cipher: ``aes-128-gcm``
    (default) or ``chacha20-poly1305``. `kem` picks the key agreement: ``auto`` (default)
    takes the post-quantum hybrid (``mlkem768-x25519``) whenever the server publishes it
    and falls back to ``x25519``; naming one (``mlkem768-x25519``, ``mlkem768``,
    ``x25519``) uses only that one, so ``kem="mlkem768-x25519"`` refuses a server that
    does not offer the hybrid. :meth:`suite` says which one protects a server's requests.
    """

    def __init__(
        self,
        *,
        fingerprints: Sequence[str] | str | None = None,
        pin_file: str | os.PathLike[str] | None = None,
        gateway_url: str | None = None,
        keys_url: str | None = None,
        aead: str = "aes-128-gcm",
        kem: str = "auto",
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if fingerprints is None and pin_file is None:
            raise ValueError("give fingerprints= (pinned keys) or pin_file= (trust on first use)")
        if aead not in _AEADS:
            raise ValueError(f"aead must be one of {', '.join(_AEADS)}")
        if kem != "auto" and kem not in hpke.KEM_NAMES:
            raise ValueError(f"kem must be auto or one of {', '.join(hpke.KEM_NAMES)}")
        if isinstance(fingerprints, str):
            fingerprints = [fingerprints]
        self._pins = KeyPins(fingerprints or (), Path(pin_file) if pin_file is not None else None)
        self._gateway_url = gateway_url
        self._keys_url = keys_url
        self._aead = _AEADS[aead]
        # The KEMs this client may use, preferred first.
        self._kems = _KEM_PREFERENCE if kem == "auto" else (hpke.KEM_NAMES[kem],)
        self._transport = transport
        self._async_transport = async_transport
        self._configs: dict[str, ohttp.KeyConfig] = {}
        # Server clock minus ours, learnt from a refused Date (RFC 9458 §6.5.2).
        self._clock_offset = 0.0

    # ------------------------------------------------------------------ sync

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        inner = self._inner_transport()
        if _passes_through(request):
            self._check_direct(request)
            return inner.handle_request(request)
        request.read()
        # Each reason to send again is honoured once: the outer key problem is not
        # authenticated, and RFC 9458 §6.5.2 allows one retry with a corrected date.
        retried: set[str] = set()
        for attempt in range(_ATTEMPTS):
            origin = _origin(request.url)
            config = self._configs.get(origin)
            if config is None:
                keys = inner.handle_request(self._keys_request(request))
                config = self._accept_keys(origin, keys.read(), keys.status_code)
            exchange = _Exchange(self, request, config)
            response = inner.handle_request(exchange.outer)
            last = attempt == _ATTEMPTS - 1
            if _is_chunked(exchange, response):
                answer = exchange.chunk_decoder()
                raw = response.iter_bytes()
                for data in raw:
                    answer.feed(data)
                    if answer.head is not None:
                        break
                if (
                    answer.head is not None
                    and answer.head.status == 400
                    and not ("date" in retried or last)
                ):
                    for data in raw:
                        answer.feed(data)
                    answer.finish()
                    if self._learn_date(answer.head.headers, b"".join(answer.body)):
                        retried.add("date")
                        response.close()
                        continue
                return _streamed_sync(exchange, response, answer, raw)
            body = response.read()
            retry = None if last else self._retry_reason(exchange, response, body)
            if retry is None or retry in retried:
                return exchange.answer(response, body)
            retried.add(retry)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _inner_transport(self) -> httpx.BaseTransport:
        if self._transport is None:
            self._transport = httpx.HTTPTransport()
        return self._transport

    # ------------------------------------------------------------------ async

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        inner = self._inner_async_transport()
        if _passes_through(request):
            self._check_direct(request)
            return await inner.handle_async_request(request)
        await request.aread()
        # Each reason to send again is honoured once: the outer key problem is not
        # authenticated, and RFC 9458 §6.5.2 allows one retry with a corrected date.
        retried: set[str] = set()
        for attempt in range(_ATTEMPTS):
            origin = _origin(request.url)
            config = self._configs.get(origin)
            if config is None:
                keys = await inner.handle_async_request(self._keys_request(request))
                config = self._accept_keys(origin, await keys.aread(), keys.status_code)
            exchange = _Exchange(self, request, config)
            response = await inner.handle_async_request(exchange.outer)
            last = attempt == _ATTEMPTS - 1
            if _is_chunked(exchange, response):
                answer = exchange.chunk_decoder()
                raw = response.aiter_bytes()
                async for data in raw:
                    answer.feed(data)
                    if answer.head is not None:
                        break
                if (
                    answer.head is not None
                    and answer.head.status == 400
                    and not ("date" in retried or last)
                ):
                    async for data in raw:
                        answer.feed(data)
                    answer.finish()
                    if self._learn_date(answer.head.headers, b"".join(answer.body)):
                        retried.add("date")
                        await response.aclose()
                        continue
                return _streamed_async(exchange, response, answer, raw)
            body = await response.aread()
            retry = None if last else self._retry_reason(exchange, response, body)
            if retry is None or retry in retried:
                return exchange.answer(response, body)
            retried.add(retry)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._async_transport is not None:
            await self._async_transport.aclose()

    def _inner_async_transport(self) -> httpx.AsyncBaseTransport:
        if self._async_transport is None:
            self._async_transport = httpx.AsyncHTTPTransport()
        return self._async_transport

    # ------------------------------------------------------------------ keys and pins

    def _keys_request(self, request: httpx.Request) -> httpx.Request:
        url = self._keys_url or f"{_origin(request.url)}/.well-known/ohttp-gateway"
        return httpx.Request("GET", url, headers={"accept": ohttp.KEYS_MEDIA_TYPE})

    def _accept_keys(self, origin: str, body: bytes, status: int) -> ohttp.KeyConfig:
        """Pick a usable key configuration and check it against the pins."""
        if status != 200:
            raise OHTTPKeyError(f"The server's OHTTP key configuration is unavailable ({status}).")
        try:
            configs = ohttp.decode_key_configs(body)
        except ohttp.OhttpError:
            raise OHTTPKeyError("The server's OHTTP key configuration is malformed.") from None
        usable = sorted(
            (
                c
                for c in configs
                if c.kem_id in self._kems
                and any(hpke.Suite(c.kem_id, kdf, aead).is_supported() for kdf, aead in c.suites)
                # Never pin a key nothing can be encrypted to.
                and hpke.public_key_usable(c.kem_id, c.public_key)
            ),
            # Stable: the server's own order among keys of one KEM.
            key=lambda c: self._kems.index(c.kem_id),
        )
        if not usable:
            wanted = ", ".join(hpke.kem_name(k) for k in self._kems)
            raise OHTTPKeyError(f"The server offers no OHTTP key this client accepts ({wanted}).")
        pinned = self._pins.trusted(origin)
        if pinned is None:
            # Trust on first use: remember what this server presented.
            config = usable[0]
            self._pins.remember(origin, config.fingerprint())
        else:
            matching = [c for c in usable if c.fingerprint() in pinned]
            if not matching:
                raise OHTTPKeyError(
                    "The server's OHTTP key does not match the pinned fingerprint. If its "
                    "operator rotated the key, or moved to post-quantum keys only, check the "
                    "new fingerprint with `bastion ohttp keys` and update the pin; otherwise "
                    "someone may be intercepting."
                )
            config = matching[0]
        self._configs[origin] = config
        return config

    def fetch_keys(self, url: str) -> str:
        """Fetch and check the key configuration of `url`'s server now rather than at the
        first request (OHTTPKeyError if it is unusable or fails its pin); returns the suite
        that will protect the requests, as :meth:`suite` describes it."""
        request = httpx.Request("GET", url)
        keys = self._inner_transport().handle_request(self._keys_request(request))
        try:
            self._accept_keys(_origin(request.url), keys.read(), keys.status_code)
        finally:
            keys.close()
        described = self.suite(url)
        assert described is not None
        return described

    def suite(self, url: str) -> str | None:
        """The suite protecting requests to `url`'s server, e.g. ``mlkem768-x25519 (post-
        quantum hybrid), hkdf-sha256, aes-128-gcm``; None until its keys were fetched."""
        config = self._configs.get(_origin(httpx.URL(url)))
        if config is None:
            return None
        suite = config.select_suite([self._aead])
        kind = (
            "post-quantum hybrid"
            if suite.kem_id == hpke.KEM_MLKEM768_X25519
            else ("post-quantum" if hpke.is_post_quantum(suite.kem_id) else "classical")
        )
        aead = next(name for name, value in _AEADS.items() if value == suite.aead_id)
        return f"{hpke.kem_name(suite.kem_id)} ({kind}), hkdf-sha256, {aead}"

    # ------------------------------------------------------------------ retries

    def _retry_reason(
        self, exchange: _Exchange, response: httpx.Response, body: bytes
    ) -> str | None:
        """Why to send the request again: the key changed ("key"), our clock is off ("date")."""
        content_type = response.headers.get("content-type", "")
        if response.status_code == 400 and content_type.startswith("application/problem+json"):
            if _problem_type(body) == ohttp.KEY_PROBLEM_TYPE:
                # The key was rotated: fetch the configuration again (and check its pin).
                self._configs.pop(_origin(exchange.request.url), None)
                return "key"
            return None
        if (
            not exchange.streaming
            and response.status_code == 200
            and content_type.startswith(ohttp.RESPONSE_MEDIA_TYPE)
        ):
            inner = exchange.open_buffered(body)
            if inner.status == 400 and self._learn_date(inner.headers, inner.content):
                return "date"
        return None

    def _learn_date(self, headers: Sequence[tuple[str, str]], body: bytes) -> bool:
        """After a refused Date (RFC 9458 §6.5.2), adopt the server's clock; True to retry.

        Callers retry a request with an adjusted date at most once, as the RFC requires.
        """
        if _problem_type(body) != ohttp.DATE_PROBLEM_TYPE:
            return False
        value = next((v for k, v in headers if k.lower() == "date"), None)
        if value is None:
            return False
        try:
            server = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return False
        if server.tzinfo is None:
            server = server.replace(tzinfo=UTC)
        self._clock_offset = server.timestamp() - time.time()
        return True

    def _check_direct(self, request: httpx.Request) -> None:
        """A request sent unencrypted must not bypass a configured relay."""
        if self._gateway_url is not None:
            raise OHTTPError(
                f"{request.method} requests without a body are not sent through the OHTTP "
                "relay; make them with a client of their own."
            )

    def date_header(self) -> str:
        return email.utils.formatdate(time.time() + self._clock_offset, usegmt=True)

    def _gateway(self, request: httpx.Request) -> str:
        return self._gateway_url or f"{_origin(request.url)}/v1/ohttp"


class _Exchange:
    """One request's encapsulation and the opening of its answer."""

    def __init__(self, owner: OHTTPTransport, request: httpx.Request, config: ohttp.KeyConfig):
        self.request = request
        body = request.content
        model, streaming = _model_and_stream(request, body)
        headers = [
            (name.lower(), value)
            for name, value in request.headers.multi_items()
            if name.lower() not in _OMITTED_HEADERS
        ]
        headers.append(("date", owner.date_header()))
        url = request.url
        path = url.raw_path.decode("ascii")
        message = bhttp.encode_request(
            bhttp.Request(
                method=request.method,
                scheme=url.scheme,
                authority=url.netloc.decode("ascii"),
                path=path,
                headers=tuple(headers),
                content=body,
            ),
            indeterminate=streaming,
        )
        suite = config.select_suite([owner._aead])
        self.streaming = streaming
        self._opened: bhttp.Response | None = None
        try:
            if streaming:
                data, self._chunked = ohttp.encapsulate_chunked_request(
                    config, [message], suite=suite
                )
                content_type = ohttp.CHUNKED_REQUEST_MEDIA_TYPE
                accept = ohttp.CHUNKED_RESPONSE_MEDIA_TYPE
            else:
                data, self._context = ohttp.encapsulate_request(config, message, suite=suite)
                content_type = ohttp.REQUEST_MEDIA_TYPE
                accept = ohttp.RESPONSE_MEDIA_TYPE
        except ohttp.MalformedKeyConfig:
            # A pinned key that cannot be encrypted to (a low-order X25519 point).
            raise OHTTPKeyError("The server's OHTTP key is unusable.") from None
        outer_headers = {"content-type": content_type, "accept": accept, MODEL_HEADER: model}
        authorization = request.headers.get("authorization")
        if authorization is not None:
            outer_headers["authorization"] = authorization
        self.outer = httpx.Request(
            "POST",
            owner._gateway(request),
            headers=outer_headers,
            content=data,
            extensions=request.extensions,
        )

    def open_buffered(self, data: bytes) -> bhttp.Response:
        if self._opened is None:
            try:
                self._opened = bhttp.decode_response(self._context.open(data))
            except (ohttp.OhttpError, bhttp.BhttpError):
                raise OHTTPError("The encrypted answer could not be opened.") from None
        return self._opened

    def answer(self, response: httpx.Response, body: bytes) -> httpx.Response:
        """The httpx.Response the caller sees: the inner answer, or an outer error as is.

        Only a 4xx or 5xx is passed on unencrypted (a refusal before decryption). Anything
        else that is not the encrypted answer this request asked for (a plain 200, a
        redirect) is refused: an intermediary must not be able to answer for the model,
        or send the request elsewhere.
        """
        content_type = response.headers.get("content-type", "")
        if response.status_code < 400:
            if self.streaming or not (
                response.status_code == 200 and content_type.startswith(ohttp.RESPONSE_MEDIA_TYPE)
            ):
                raise OHTTPError(
                    f"The server answered HTTP {response.status_code} without the encrypted "
                    "answer; refusing it."
                )
            inner = self.open_buffered(body)
            return httpx.Response(
                inner.status,
                headers=_response_headers(inner.headers),
                content=inner.content,
                request=self.request,
            )
        # Refused before decryption (bad key, quota, model unavailable): unencrypted.
        return httpx.Response(
            response.status_code,
            headers=_response_headers(response.headers.multi_items()),
            content=body,
            request=self.request,
        )

    def chunk_decoder(self) -> _ChunkedAnswer:
        return _ChunkedAnswer(self._chunked.opener())


class _ChunkedAnswer:
    """Decrypts a chunked answer and decodes its Binary HTTP response incrementally."""

    def __init__(self, opener: Any) -> None:
        self._opener = opener
        self._decoder = bhttp.ResponseDecoder()
        self.head: bhttp.Head | None = None
        self.body: list[bytes] = []
        self.done = False

    def feed(self, data: bytes) -> None:
        try:
            for plaintext in self._opener.feed(data):
                self._take(self._decoder.feed(plaintext))
        except (ohttp.OhttpError, bhttp.BhttpError):
            raise OHTTPError("The encrypted answer could not be opened.") from None

    def finish(self) -> None:
        if self.done:
            return
        try:
            # The final chunk runs to the end of the stream: it opens only now.
            self._take(self._decoder.feed(self._opener.finish()))
            self._take(self._decoder.finish())
        except (ohttp.OhttpError, bhttp.BhttpError):
            raise OHTTPError("The encrypted answer was cut short or altered.") from None
        self.done = True

    def take_body(self) -> list[bytes]:
        body, self.body = self.body, []
        return body

    def _take(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, bhttp.Head):
                self.head = event
            elif isinstance(event, bhttp.Body) and event.data:
                self.body.append(event.data)


def _head_of(answer: _ChunkedAnswer) -> bhttp.Head:
    if answer.head is None:
        raise OHTTPError("The encrypted answer ended before its header.")
    return answer.head


def _streamed_sync(
    exchange: _Exchange, response: httpx.Response, answer: _ChunkedAnswer, raw: Iterator[bytes]
) -> httpx.Response:
    head = _head_of(answer)

    class Stream(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield from answer.take_body()
            if answer.done:
                return
            for data in raw:
                answer.feed(data)
                yield from answer.take_body()
            answer.finish()
            yield from answer.take_body()

        def close(self) -> None:
            response.close()

    return httpx.Response(
        head.status,
        headers=_response_headers(head.headers),
        stream=Stream(),
        request=exchange.request,
    )


def _streamed_async(
    exchange: _Exchange,
    response: httpx.Response,
    answer: _ChunkedAnswer,
    raw: AsyncIterator[bytes],
) -> httpx.Response:
    head = _head_of(answer)

    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for piece in answer.take_body():
                yield piece
            if answer.done:
                return
            async for data in raw:
                answer.feed(data)
                for piece in answer.take_body():
                    yield piece
            answer.finish()
            for piece in answer.take_body():
                yield piece

        async def aclose(self) -> None:
            await response.aclose()

    return httpx.Response(
        head.status,
        headers=_response_headers(head.headers),
        stream=Stream(),
        request=exchange.request,
    )


def _passes_through(request: httpx.Request) -> bool:
    """Requests without a payload or a model (listing models) go as they are."""
    headers = request.headers
    return (
        request.method in ("GET", "HEAD")
        and headers.get("content-length", "0") == "0"
        and "transfer-encoding" not in headers
    )


def _origin(url: httpx.URL) -> str:
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}"


def _model_and_stream(request: httpx.Request, body: bytes) -> tuple[str, bool]:
    match = _OIP_MODEL_PATH.match(request.url.path)
    if match:
        return match.group(1), False
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
        raise OHTTPError("An encrypted request must name its model (JSON 'model' field).")
    return payload["model"], payload.get("stream") is True


def _is_chunked(exchange: _Exchange, response: httpx.Response) -> bool:
    """Whether this is the chunked encrypted answer a streaming request asked for."""
    return (
        exchange.streaming
        and response.status_code == 200
        and response.headers.get("content-type", "").startswith(ohttp.CHUNKED_RESPONSE_MEDIA_TYPE)
    )


def _problem_type(body: bytes) -> str | None:
    try:
        problem = json.loads(body)
    except ValueError:
        return None
    kind = problem.get("type") if isinstance(problem, dict) else None
    return kind if isinstance(kind, str) else None


def _response_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
