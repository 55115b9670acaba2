"""The console's sign-in through an OpenID Connect provider: authorization code + PKCE.

The console calls :meth:`OidcClient.start` and sends the browser to the request's ``url``,
keeping the request itself where only this browser's session can reach it (its state,
nonce and PKCE verifier are secrets). When the provider redirects back, the console hands
that request and the callback's query parameters to :meth:`OidcClient.finish`, which checks
the state, redeems the code at the token endpoint with the PKCE verifier, checks the ID
token (signature through the same JWKS cache as bearer tokens, iss, aud = the client id,
azp, nonce, exp, iat) and maps its claims to a Principal. Every failure raises
TokenRejected with a reason code; nothing here echoes a code, token or secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

import httpx

from bastion.identity.jwks import MAX_DOCUMENT_BYTES, JwksCache, check_url
from bastion.identity.jwt import (
    DEFAULT_ALGORITHMS,
    REASON_MALFORMED,
    REASON_WRONG_AUDIENCE,
    REASON_WRONG_ISSUER,
    ClaimsMapping,
    TenantLookup,
    TokenPolicy,
    decode_token,
    reject,
    signed_token,
)
from bastion.identity.principal import Principal

REASON_PROVIDER_ERROR = "provider_error"
REASON_WRONG_STATE = "wrong_state"
REASON_WRONG_NONCE = "wrong_nonce"
REASON_SIGN_IN_EXPIRED = "sign_in_expired"
REASON_TOKEN_ENDPOINT = "token_endpoint"  # noqa: S105 (a reason code, not a secret)
REASON_PROVIDER_UNAVAILABLE = "provider_unavailable"

_MAX_CODE = 2048
_MESSAGE = "The sign-in did not succeed; please try again."


@dataclass(frozen=True, slots=True)
class OidcClientConfig:
    """The console's registration at the provider."""

    issuer: str
    client_id: str
    redirect_url: str
    # None for a public client (PKCE only); else sent with HTTP Basic (client_secret_basic).
    client_secret: str | None = field(default=None, repr=False)
    scopes: tuple[str, ...] = ("openid",)
    # How long a started sign-in may take before its callback is refused.
    sign_in_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("an OIDC client needs a client id")
        check_url(self.redirect_url)
        if "openid" not in self.scopes:
            raise ValueError("the OIDC scopes must include openid")


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """One started sign-in: send the browser to `url`, keep the rest for :meth:`finish`."""

    url: str = field(repr=False)
    state: str = field(repr=False)
    nonce: str = field(repr=False)
    code_verifier: str = field(repr=False)
    started_at: float


def code_challenge(verifier: str) -> str:
    """RFC 7636's S256 challenge of a PKCE code verifier."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OidcClient:
    """The relying party: builds authorization requests and completes sign-ins."""

    def __init__(
        self,
        config: OidcClientConfig,
        keys: JwksCache,
        mapping: ClaimsMapping,
        tenants: TenantLookup,
        http: httpx.Client | None = None,
        *,
        algorithms: tuple[str, ...] | None = None,
        leeway_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 10.0,
    ) -> None:
        if keys.issuer != config.issuer:
            raise ValueError("the JWKS cache is for another issuer")
        self.config = config
        self._policy = TokenPolicy(
            config.issuer, config.client_id, algorithms or DEFAULT_ALGORITHMS, leeway_s
        )
        self._keys = keys
        self._mapping = mapping
        self._tenants = tenants
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=timeout_s, follow_redirects=False)
        self._clock = clock

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def start(self) -> AuthorizationRequest:
        """A new sign-in: its authorization URL (code flow, PKCE S256, state, nonce)."""
        endpoint = self._endpoint("authorization_endpoint")
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 characters (RFC 7636: 43 to 128)
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": self.config.redirect_url,
            "scope": " ".join(self.config.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge(verifier),
            "code_challenge_method": "S256",
        }
        parts = urlsplit(endpoint)
        query = urlencode([*parse_qsl(parts.query), *params.items()])
        url = urlunsplit(parts._replace(query=query))
        return AuthorizationRequest(url, state, nonce, verifier, started_at=self._clock())

    def finish(self, request: AuthorizationRequest, callback: Mapping[str, str]) -> Principal:
        """The principal signed in by the provider's redirect to the callback, whose query
        parameters are `callback`; TokenRejected if anything does not check out.

        Blocking (one request to the token endpoint, perhaps the JWKS and the tenant's
        database row): call it from a thread."""
        if "error" in callback:
            reject(REASON_PROVIDER_ERROR, _MESSAGE)
        if not hmac.compare_digest(
            callback.get("state", "").encode(), request.state.encode("ascii")
        ):
            reject(REASON_WRONG_STATE, _MESSAGE)
        now = self._clock()
        if not 0 <= now - request.started_at <= self.config.sign_in_timeout_s:
            reject(REASON_SIGN_IN_EXPIRED, _MESSAGE)
        # RFC 9207: a provider that names itself must be the one this request went to.
        if "iss" in callback and callback["iss"] != self.config.issuer:
            reject(REASON_WRONG_ISSUER, _MESSAGE)
        code = callback.get("code", "")
        if not 0 < len(code) <= _MAX_CODE:
            reject(REASON_MALFORMED, _MESSAGE)
        id_token = self._redeem(code, request.code_verifier)
        claims, _ = decode_token(id_token, self._policy, self._keys, now)
        with signed_token():
            nonce = claims.get("nonce")
            if not isinstance(nonce, str) or not hmac.compare_digest(
                nonce.encode(), request.nonce.encode("ascii")
            ):
                reject(REASON_WRONG_NONCE, _MESSAGE)
            # OpenID Connect Core §3.1.3.7: with several audiences, azp names this client.
            azp = claims.get("azp")
            several = isinstance(claims["aud"], list) and len(claims["aud"]) > 1
            if (several or azp is not None) and azp != self.config.client_id:
                reject(REASON_WRONG_AUDIENCE, _MESSAGE)
            return self._mapping.principal(claims, self._policy, self._tenants)

    def _endpoint(self, name: str) -> str:
        try:
            url = getattr(self._keys.metadata(), name)
        except ValueError:
            reject(REASON_PROVIDER_UNAVAILABLE, _MESSAGE)
        if not isinstance(url, str):
            reject(REASON_PROVIDER_UNAVAILABLE, _MESSAGE)
        return url

    def _redeem(self, code: str, verifier: str) -> str:
        """The ID token the token endpoint gives for `code` (authorization_code grant)."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.config.redirect_url,
            "code_verifier": verifier,
        }
        auth: httpx.BasicAuth | None = None
        if self.config.client_secret is None:
            form["client_id"] = self.config.client_id
        else:
            # RFC 6749 §2.3.1: both are form-encoded before they go into the Basic header.
            auth = httpx.BasicAuth(
                quote_plus(self.config.client_id), quote_plus(self.config.client_secret)
            )
        endpoint = self._endpoint("token_endpoint")
        try:
            with self._http.stream(
                "POST", endpoint, data=form, auth=auth, headers={"accept": "application/json"}
            ) as response:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        reject(REASON_TOKEN_ENDPOINT, _MESSAGE)
                status = response.status_code
        except httpx.HTTPError:
            reject(REASON_PROVIDER_UNAVAILABLE, _MESSAGE)
        if status != 200:
            reject(REASON_TOKEN_ENDPOINT, _MESSAGE)
        try:
            answer: Any = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            reject(REASON_TOKEN_ENDPOINT, _MESSAGE)
        id_token = answer.get("id_token") if isinstance(answer, dict) else None
        if not isinstance(id_token, str):
            reject(REASON_TOKEN_ENDPOINT, _MESSAGE)
        return id_token
