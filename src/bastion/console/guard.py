"""What protects the console's pages in the browser: headers, cookies, and forms.

- Every page carries a Content-Security-Policy that allows scripts and styles from
  Bastion's own origin only (no inline code, no other origin), no framing, and forms posting
  back to Bastion alone; ``Cache-Control: no-store`` (a shared or back-button cache never
  keeps a page of keys or secrets); and ``Referrer-Policy: same-origin`` (the listener's
  default ``no-referrer`` would make the browser send ``Origin: null`` with every form).
- The session cookie is HttpOnly, SameSite=Strict, Path=/; over TLS it is Secure and named
  with the ``__Host-`` prefix (no Domain, so no other host can set or read it). Over plain
  HTTP (loopback development) a cookie cannot be Secure: it then has a plain name.
- Every POST must come from a page of the console: its ``Origin`` (or, without one, its
  ``Referer``) must be this server's own origin, and its form must carry the session's
  synchronizer token (constant-time compare). Before sign-in, the token of the sign-in form
  is an HMAC of a random pre-session cookie (a signed double-submit cookie).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import Response

from bastion.api.body import read_body
from bastion.errors import InvalidRequest, PermissionDenied, UnsupportedMediaType

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
PAGE_HEADERS = {
    "content-security-policy": CSP,
    "cache-control": "no-store",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}

SESSION_COOKIE = "bastion_console"
# Before sign-in: what the sign-in form's token is made from.
PRE_SESSION_COOKIE = "bastion_console_pre"
# A sign-in through the provider, bound to the browser that started it. SameSite=Lax: the
# provider's redirect back is a cross-site navigation, which Strict cookies do not follow.
SSO_COOKIE = "bastion_console_sso"
PRE_SESSION_MAX_AGE_S = 600
# A console form is small; anything larger is refused before it is read.
MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 64

CSRF_FIELD = "csrf"
CSRF_REFUSED = "This form is out of date or did not come from the console: reload the page."


def is_tls(request: Request) -> bool:
    return request.url.scheme == "https"


def cookie_name(request: Request, base: str) -> str:
    """`base` with the __Host- prefix over TLS (a Secure, host-only, Path=/ cookie)."""
    return f"__Host-{base}" if is_tls(request) else base


def read_cookie(request: Request, base: str) -> str | None:
    return request.cookies.get(cookie_name(request, base))


def set_cookie(
    response: Response, request: Request, base: str, value: str, *, max_age: int, strict: bool
) -> None:
    response.set_cookie(
        cookie_name(request, base),
        value,
        max_age=max_age,
        path="/",
        secure=is_tls(request),
        httponly=True,
        samesite="strict" if strict else "lax",
    )


def clear_cookie(response: Response, request: Request, base: str) -> None:
    response.delete_cookie(
        cookie_name(request, base), path="/", secure=is_tls(request), httponly=True
    )


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}".lower()


def check_same_origin(request: Request) -> None:
    """PermissionDenied unless the request says it comes from this server's own pages."""
    expected = own_origin(request)
    origin = request.headers.get("origin")
    if origin is not None:
        if origin.lower() != expected:
            raise PermissionDenied(CSRF_REFUSED, code="csrf")
        return
    referer = request.headers.get("referer")
    if referer is None:
        raise PermissionDenied(CSRF_REFUSED, code="csrf")
    parts = urlsplit(referer)
    if f"{parts.scheme}://{parts.netloc}".lower() != expected:
        raise PermissionDenied(CSRF_REFUSED, code="csrf")


def check_token(expected: str, given: str | None) -> None:
    """PermissionDenied unless `given` is `expected` (compared in constant time)."""
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise PermissionDenied(CSRF_REFUSED, code="csrf")


@dataclass(frozen=True, slots=True)
class Form:
    """A submitted form's fields (a field may repeat: checkboxes)."""

    fields: tuple[tuple[str, str], ...]

    def get(self, name: str, default: str = "") -> str:
        for key, value in reversed(self.fields):
            if key == name:
                return value
        return default

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.fields if key == name]


async def read_form(request: Request) -> Form:
    """The request's url-encoded form (415 for another type, 413 beyond MAX_FORM_BYTES)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("The console takes url-encoded forms only.")
    body = await read_body(request, MAX_FORM_BYTES)
    try:
        fields = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("The form could not be read.") from None
    return Form(tuple(fields))


class PreSession:
    """The sign-in form's token: an HMAC, under a key this process made, of the random
    value of the browser's pre-session cookie."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    @staticmethod
    def new_value() -> str:
        return secrets.token_urlsafe(32)

    def token(self, value: str) -> str:
        return hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()

    def check(self, value: str | None, given: str | None) -> None:
        if not value:
            raise PermissionDenied(CSRF_REFUSED, code="csrf")
        check_token(self.token(value), given)
