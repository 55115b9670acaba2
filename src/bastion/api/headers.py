"""Headers every answer carries, and cross-origin access for the configured origins.

The security headers are given to uvicorn as its default headers (``bastion.listeners``),
which it writes at the head of every answer of the listener: the fast path's, Starlette's,
error answers and uvicorn's own (a malformed request's 400). No layer is added for them:
uvicorn joins its default headers to each answer anyway, and checks each header it writes
(about 0.6 µs a header, so the list is kept short).

- ``X-Content-Type-Options: nosniff``: a browser takes the declared media type as it is.
- ``X-Frame-Options: DENY``: no answer is shown inside another site's frame (an HTML page,
  the console's, may add ``Content-Security-Policy`` of its own).
- ``Referrer-Policy: no-referrer``.

No ``Cache-Control`` by default: a shared cache never stores an answer to a request with an
``Authorization`` header (RFC 9111 §3.5), and a route that may be cached (the OHTTP key
configuration, which clients fetch before they have a key) says so itself; a default
``no-store`` beside it would win and undo that.
- ``Strict-Transport-Security`` on a TLS listener only (a browser ignores it over HTTP).

Cross-origin requests (CORS) get no headers at all unless origins are configured
(``BASTION_CORS_ORIGINS``); :class:`CrossOrigin` then answers the inference API's
preflights and names a listed origin on its answers, for those origins alone.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.api.errors import error_response
from bastion.errors import PermissionDenied

# Two years, as the HSTS preload list asks.
HSTS_MAX_AGE_S = 63_072_000

_ALWAYS = (
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
)


def security_headers(*, tls: bool) -> list[tuple[str, str]]:
    """The headers every answer of a listener carries (with or without TLS)."""
    headers = list(_ALWAYS)
    if tls:
        headers.append(("strict-transport-security", f"max-age={HSTS_MAX_AGE_S}"))
    return headers


# The routes a web page of a listed origin may call: the inference APIs.
CORS_PREFIXES = ("/v1/", "/v2/")
CORS_METHODS = b"GET, POST"
# How long a browser may keep a preflight's answer.
CORS_MAX_AGE_S = 600
# Answer headers a page may read beyond the CORS-safelisted ones.
EXPOSED = b", ".join(
    [
        b"retry-after",
        b"inference-header-content-length",
        *(
            f"x-ratelimit-{what}-{kind}".encode()
            for kind in ("requests", "tokens")
            for what in ("limit", "remaining", "reset")
        ),
    ]
)
# A list of header names, as Access-Control-Request-Headers carries them.
_NAMES = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


class CrossOrigin:
    """CORS for the inference API (``/v1/``, ``/v2/``), for the listed origins alone.

    A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) from a
    listed origin for GET or POST is answered 204 with what it asked for (the request
    headers it names are allowed: the caller's key, not the origin, is the credential;
    cookies are never allowed); any other preflight is refused (403). An answer to a
    listed origin names it in ``Access-Control-Allow-Origin``; every answer of these routes
    carries ``Vary: Origin``. Other routes (admin, health, metrics) pass untouched."""

    def __init__(self, app: ASGIApp, origins: tuple[str, ...]) -> None:
        self.app = app
        self.origins = frozenset(origin.encode("latin-1") for origin in origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(CORS_PREFIXES):
            await self.app(scope, receive, send)
            return
        origin = asked_method = asked_headers = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                asked_method = value
            elif name == b"access-control-request-headers":
                asked_headers = value
        if scope["method"] == "OPTIONS" and origin is not None and asked_method is not None:
            await self._preflight(scope, receive, send, origin, asked_method, asked_headers)
            return
        added = [(b"vary", b"Origin")]
        if origin in self.origins:
            added += [
                (b"access-control-allow-origin", origin),
                (b"access-control-expose-headers", EXPOSED),
            ]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        origin: bytes,
        asked_method: bytes,
        asked_headers: bytes | None,
    ) -> None:
        vary = (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        allowed = (
            origin in self.origins
            and asked_method.strip() in (b"GET", b"POST")
            and (asked_headers is None or _NAMES.fullmatch(asked_headers.strip()) is not None)
        )
        if not allowed:
            refusal = PermissionDenied(
                "Cross-origin requests from this origin are not allowed.", code="cors_refused"
            )
            response = error_response(Request(scope), refusal)
            response.raw_headers.append(vary)
            await response(scope, receive, send)
            return
        headers = [
            vary,
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", CORS_METHODS),
            (b"access-control-max-age", str(CORS_MAX_AGE_S).encode()),
        ]
        if asked_headers is not None:
            headers.append((b"access-control-allow-headers", asked_headers.strip()))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
