"""A small OpenID Connect provider for the SSO tests, built on PyJWT (what Bastion uses).

It is a real HTTP server on 127.0.0.1 (Starlette, served by uvicorn on a thread) with the
parts of a provider that Bastion talks to:

- ``/.well-known/openid-configuration``: the discovery document;
- ``/jwks``: its public keys, which the tests rotate (:meth:`OidcProvider.rotate` publishes
  a new signing key, :meth:`OidcProvider.retire` withdraws one);
- ``/authorize``: approves the configured user at once and redirects with a code and the
  state (PKCE S256 is required);
- ``/token``: the authorization_code grant (one-time codes, the redirect URI and the PKCE
  verifier checked; client_secret_basic or a public client) and client_credentials (API
  tokens for confidential clients).

Every request is counted by path, so tests can see how often Bastion asks. The ``mint_*``
helpers make the tokens that must be refused: expired, for another audience or issuer,
``alg: none``, HS256 keyed with the RSA public key's bytes, an unknown kid, a future nbf,
no exp. Why the tests use this rather than a provider from Debian or PyPI: docs/sso.md.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

API_AUDIENCE = "bastion-api"
TOKEN_LIFETIME_S = 300


START = 1_900_000_000.0


class ManualClock:
    """A settable clock (seconds since the epoch), shared by the provider and Bastion."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class SigningKey:
    """A private key of the provider, its kid and the algorithm it signs with."""

    kid: str
    algorithm: str
    private_key: Any

    def public_jwk(self) -> dict[str, Any]:
        public = self.private_key.public_key()
        if self.algorithm.startswith(("RS", "PS")):
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        elif self.algorithm.startswith("ES"):
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def public_pem(self) -> bytes:
        return bytes(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def new_key(algorithm: str = "RS256", *, rsa_bits: int = 2048) -> SigningKey:
    if algorithm.startswith(("RS", "PS")):
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(algorithm)
    return SigningKey(f"k-{secrets.token_hex(6)}", algorithm, private)


@dataclass(frozen=True)
class Client:
    """A registered client: public when `secret` is None (PKCE only)."""

    client_id: str
    secret: str | None = None
    redirect_uris: tuple[str, ...] = ()
    # The claims of its client_credentials tokens, beyond iss, sub, aud, iat and exp.
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str | None
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(value: Mapping[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


class OidcProvider:
    """The provider; use it as a context manager (it serves while the block runs)."""

    def __init__(
        self,
        *,
        clock: ManualClock | None = None,
        clients: Iterable[Client] = (),
        user: Mapping[str, Any] | None = None,
        algorithm: str = "RS256",
    ) -> None:
        self.clock = clock or ManualClock()
        self.clients = {c.client_id: c for c in clients}
        self._default_user = dict(
            user or {"sub": "alice", "bastion_tenant": "acme", "bastion_role": "tenant-admin"}
        )
        self._first_key = new_key(algorithm)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.issuer = ""
        self.reset()

    def reset(self) -> None:
        """Back to the state it started in (its first key; the clock at START), so that
        tests can share one running provider."""
        self.clock.now = START
        # The user /authorize signs in; its claims go into ID and access tokens.
        self.user: dict[str, Any] = dict(self._default_user)
        self.signing = self._first_key
        self.published: list[SigningKey] = [self.signing]
        self.requests: Counter[str] = Counter()
        # Knobs for the failure tests: extra bytes in the JWKS, a delay before answering it,
        # and a nonce to put in ID tokens in place of the one asked for.
        self.jwks_padding = 0
        self.jwks_delay_s = 0.0
        self.nonce_override: str | None = None
        # Raw entries published in the JWKS beside the keys (what a verifier must ignore).
        self.extra_jwks: list[dict[str, Any]] = []
        self._grants: dict[str, _Grant] = {}

    # ------------------------------------------------------------------ serving

    def __enter__(self) -> OidcProvider:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.issuer = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off", loop="asyncio")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test OIDC provider did not start")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self._discovery),
                Route("/jwks", self._jwks),
                Route("/authorize", self._authorize),
                Route("/token", self._token, methods=["POST"]),
            ]
        )

    # ------------------------------------------------------------------ keys

    def rotate(self, algorithm: str = "RS256") -> SigningKey:
        """Publish a new key and sign with it from now on (the old one stays published)."""
        self.signing = new_key(algorithm)
        self.published.append(self.signing)
        return self.signing

    def retire(self, kid: str) -> None:
        """Withdraw a key from the JWKS."""
        self.published = [k for k in self.published if k.kid != kid]

    # ------------------------------------------------------------------ tokens

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """An API token's claims: the user's, for Bastion's audience, valid for 5 minutes."""
        now = int(self.clock())
        claims = {
            **self.user,
            "iss": self.issuer,
            "aud": API_AUDIENCE,
            "iat": now,
            "exp": now + TOKEN_LIFETIME_S,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        key: SigningKey | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A token signed by `key` (the current signing key by default)."""
        key = key or self.signing
        return jwt.encode(
            dict(self.claims() if claims is None else claims),
            key.private_key,
            algorithm=key.algorithm,
            # A header set to None is left out.
            headers={k: v for k, v in {"kid": key.kid, **(headers or {})}.items() if v is not None},
        )

    def mint_raw_header(self, **header: Any) -> str:
        """Signed by the signing key under a header PyJWT would not write (a kid of 7)."""
        key = self.signing
        fields = {"alg": key.algorithm, "typ": "JWT", "kid": key.kid, **header}
        signing_input = f"{_segment(fields)}.{_segment(self.claims())}".encode()
        algorithm = jwt.get_algorithm_by_name(key.algorithm)
        return f"{signing_input.decode()}.{_b64(algorithm.sign(signing_input, key.private_key))}"

    def mint_expired(self) -> str:
        now = int(self.clock())
        return self.mint(self.claims(iat=now - 3600, exp=now - 600))

    def mint_wrong_audience(self) -> str:
        return self.mint(self.claims(aud="someone-else"))

    def mint_wrong_issuer(self) -> str:
        return self.mint(self.claims(iss="https://evil.example"))

    def mint_future_nbf(self) -> str:
        return self.mint(self.claims(nbf=int(self.clock()) + 600))

    def mint_missing_exp(self) -> str:
        claims = self.claims()
        del claims["exp"]
        return self.mint(claims)

    def mint_unknown_kid(self, kid: str | None = None) -> str:
        return self.mint(headers={"kid": kid or f"k-{secrets.token_hex(6)}"})

    def mint_foreign_key(self) -> str:
        """Signed by a key the provider never published, under a published key's kid."""
        return self.mint(key=SigningKey(self.signing.kid, "RS256", new_key().private_key))

    def mint_alg_none(self, alg: str = "none") -> str:
        """Unsigned (RFC 7519 §6), naming a published kid."""
        header = {"alg": alg, "typ": "JWT", "kid": self.signing.kid}
        return f"{_segment(header)}.{_segment(self.claims())}."

    def mint_hs256_with_public_key(self) -> str:
        """HMAC-SHA-256 keyed with the signing key's public PEM: the classic confusion
        attack (PyJWT refuses to make this one, so it is made by hand)."""
        header = {"alg": "HS256", "typ": "JWT", "kid": self.signing.kid}
        signing_input = f"{_segment(header)}.{_segment(self.claims())}"
        mac = hmac.new(self.signing.public_pem(), signing_input.encode(), hashlib.sha256)
        return f"{signing_input}.{_b64(mac.digest())}"

    # ------------------------------------------------------------------ endpoints

    async def _discovery(self, request: Request) -> Response:
        self.requests["discovery"] += 1
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
                "code_challenge_methods_supported": ["S256"],
                "grant_types_supported": ["authorization_code", "client_credentials"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
                "authorization_response_iss_parameter_supported": True,
            }
        )

    async def _jwks(self, request: Request) -> Response:
        self.requests["jwks"] += 1
        if self.jwks_delay_s:
            await asyncio.sleep(self.jwks_delay_s)
        keys = [k.public_jwk() for k in self.published] + self.extra_jwks
        document: dict[str, Any] = {"keys": keys}
        if self.jwks_padding:
            document["padding"] = "x" * self.jwks_padding
        return JSONResponse(document)

    async def _authorize(self, request: Request) -> Response:
        self.requests["authorize"] += 1
        params = request.query_params
        client = self.clients.get(params.get("client_id", ""))
        redirect_uri = params.get("redirect_uri", "")
        if client is None or redirect_uri not in client.redirect_uris:
            # Never redirect to a URI that is not registered (RFC 6749 §4.1.2.1).
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        state = params.get("state")
        answer: dict[str, str] = {"iss": self.issuer}
        if state is not None:
            answer["state"] = state
        if (
            params.get("response_type") != "code"
            or params.get("code_challenge_method") != "S256"
            or len(params.get("code_challenge", "")) != 43
            or "openid" not in params.get("scope", "").split()
        ):
            answer["error"] = "invalid_request"
        else:
            code = secrets.token_urlsafe(24)
            self._grants[code] = _Grant(
                client.client_id,
                redirect_uri,
                params["code_challenge"],
                params.get("nonce"),
                self.clock() + 60,
            )
            answer["code"] = code
        return RedirectResponse(f"{redirect_uri}?{urlencode(answer)}", status_code=302)

    async def _token(self, request: Request) -> Response:
        self.requests["token"] += 1
        form = dict(parse_qsl((await request.body()).decode()))
        client = self._client(request, form)
        if client is None:
            return _error("invalid_client", 401)
        grant_type = form.get("grant_type")
        if grant_type == "client_credentials" and client.secret is not None:
            now = int(self.clock())
            claims = {
                **client.claims,
                "iss": self.issuer,
                "sub": client.client_id,
                "aud": API_AUDIENCE,
                "iat": now,
                "exp": now + TOKEN_LIFETIME_S,
            }
            return _tokens(self.mint(claims))
        if grant_type != "authorization_code":
            return _error("unsupported_grant_type")
        grant = self._grants.pop(form.get("code", ""), None)  # one use only
        if (
            grant is None
            or grant.client_id != client.client_id
            or grant.redirect_uri != form.get("redirect_uri")
            or self.clock() > grant.expires_at
        ):
            return _error("invalid_grant")
        verifier = form.get("code_verifier", "")
        challenge = _b64(hashlib.sha256(verifier.encode()).digest())
        if not 43 <= len(verifier) <= 128 or not hmac.compare_digest(challenge, grant.challenge):
            return _error("invalid_grant")
        id_claims = self.claims(aud=client.client_id, azp=client.client_id, nonce=grant.nonce)
        if self.nonce_override is not None:
            id_claims["nonce"] = self.nonce_override
        return _tokens(self.mint(self.claims()), id_token=self.mint(id_claims))

    def _client(self, request: Request, form: Mapping[str, str]) -> Client | None:
        authorization = request.headers.get("authorization", "")
        if authorization.startswith("Basic "):
            try:
                decoded = base64.b64decode(authorization[6:], validate=True).decode()
            except ValueError:
                return None
            client_id, _, secret = (unquote_plus(p) for p in decoded.partition(":"))
            client = self.clients.get(client_id)
            if client is None or client.secret is None:
                return None
            return client if hmac.compare_digest(secret, client.secret) else None
        client = self.clients.get(form.get("client_id", ""))
        return client if client is not None and client.secret is None else None


def _tokens(access_token: str, *, id_token: str | None = None) -> Response:
    body: dict[str, Any] = {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": TOKEN_LIFETIME_S,
    }
    if id_token is not None:
        body["id_token"] = id_token
    return JSONResponse(body, headers={"cache-control": "no-store"})


def _error(error: str, status: int = 400) -> Response:
    return JSONResponse({"error": error}, status_code=status)
