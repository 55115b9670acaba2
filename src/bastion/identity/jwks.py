"""The signing keys of an OpenID Connect provider: discovery, JWKS fetching, caching.

The keys come from the issuer's discovery document (``/.well-known/openid-configuration``
→ ``jwks_uri``). Every fetch has a timeout, follows no redirect and reads a bounded
document. Keys are cached for a while; a token with an unknown ``kid`` triggers at most one
refresh per interval, so made-up key ids cannot make Bastion hammer the provider, and when
the provider cannot be reached the keys held serve for a bounded time. Only public
signature keys of the supported types are kept (never an HMAC key). Tokens are checked in
:mod:`bastion.identity.jwt`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx
import jwt

from bastion.errors import TokenRejected

logger = logging.getLogger("bastion.identity.jwks")

# The reasons (TokenRejected.reason) of the failures found here; the rest are in
# bastion.identity.jwt. All come before a signature is checked: the generic message.
REASON_UNKNOWN_KID = "unknown_kid"
REASON_KEY_MISMATCH = "key_mismatch"
REASON_JWKS_UNAVAILABLE = "jwks_unavailable"

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
# Every algorithm that may be allowed: asymmetric signatures only.
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | frozenset(_EC_CURVES) | {"EdDSA"}

MAX_DOCUMENT_BYTES = 256 * 1024
# The longest key id accepted, in a JWKS or a token's header.
MAX_KID = 256
_MAX_KEYS = 100


def _refuse(reason: str) -> NoReturn:
    raise TokenRejected(reason) from None


def check_url(url: str) -> None:
    """ValueError unless `url` is https, or plain http to this machine (tests, sidecars)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"):
        return
    raise ValueError(f"not an https URL: {url!r}")


def fetch_json(http: httpx.Client, url: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """GET a JSON document of at most `max_bytes` (decoded); ValueError on any failure."""
    check_url(url)
    try:
        with http.stream("GET", url, headers={"accept": "application/json"}) as response:
            if response.status_code != 200:
                raise ValueError(f"{url} answered {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise ValueError(f"{url} sent more than {max_bytes} bytes")
    except httpx.HTTPError as exc:
        raise ValueError(f"{url}: {type(exc).__name__}") from exc
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{url} sent no JSON") from exc


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """The parts of an OpenID provider's discovery document that Bastion uses."""

    issuer: str
    jwks_uri: str
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None


def discover(http: httpx.Client, issuer: str) -> ProviderMetadata:
    """Read and check the issuer's discovery document; ValueError if it is unusable."""
    document = fetch_json(http, issuer.rstrip("/") + "/.well-known/openid-configuration")
    if not isinstance(document, dict):
        raise ValueError("the discovery document is not a JSON object")
    # OpenID Connect Discovery 1.0 §4.3: the issuer must be exactly the one asked for.
    if document.get("issuer") != issuer:
        raise ValueError("the discovery document names another issuer")
    urls: dict[str, str | None] = {}
    for name in ("jwks_uri", "authorization_endpoint", "token_endpoint"):
        value = document.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"the discovery document's {name} is not a string")
            check_url(value)
        urls[name] = value
    jwks_uri = urls.pop("jwks_uri")
    if jwks_uri is None:
        raise ValueError("the discovery document has no jwks_uri")
    return ProviderMetadata(issuer=issuer, jwks_uri=jwks_uri, **urls)


def _fits(jwk: Mapping[str, Any], algorithm: str) -> bool:
    """Whether the key may verify `algorithm`: its own alg if it names one, and its type."""
    if jwk.get("alg", algorithm) != algorithm:
        return False
    kty = jwk.get("kty")
    if algorithm in RSA_ALGORITHMS:
        return kty == "RSA"
    if algorithm in _EC_CURVES:
        return kty == "EC" and jwk.get("crv") == _EC_CURVES[algorithm]
    return algorithm == "EdDSA" and kty == "OKP" and jwk.get("crv") in ("Ed25519", "Ed448")


def _usable(entry: Any) -> bool:
    """A public signing key of a supported type, with a kid, that PyJWT can load."""
    if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or "d" in entry:
        return False  # (a JWKS that publishes a private key is broken: skip that key)
    kid = entry.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID:
        return False
    if not any(_fits(entry, alg) for alg in ASYMMETRIC_ALGORITHMS):
        return False
    try:
        jwt.PyJWK(entry, algorithm=next(a for a in ASYMMETRIC_ALGORITHMS if _fits(entry, a)))
    except (jwt.PyJWTError, ValueError, TypeError):
        return False
    return True


@dataclass(slots=True)
class _KeySet:
    by_kid: dict[str, list[dict[str, Any]]]
    fetched_at: float
    loaded: dict[tuple[str, str], jwt.PyJWK] = field(default_factory=dict)


class JwksCache:
    """The issuer's signing keys, fetched through its discovery document and cached.

    Refreshed when older than `ttl_s`, and on an unknown ``kid``; fetches (and failed
    ones) are at least `min_refresh_interval_s` apart. When a refresh fails, the keys
    already held serve until they are `max_stale_s` old. Safe to use from many threads:
    one of them fetches, the others wait for it.
    """

    def __init__(
        self,
        issuer: str,
        http: httpx.Client | None = None,
        *,
        clock: Callable[[], float] = time.time,
        ttl_s: float = 300.0,
        min_refresh_interval_s: float = 30.0,
        max_stale_s: float = 3600.0,
        timeout_s: float = 5.0,
    ) -> None:
        check_url(issuer)
        self.issuer = issuer
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=timeout_s, follow_redirects=False)
        self._clock = clock
        self._ttl_s = ttl_s
        self._min_interval_s = min_refresh_interval_s
        self._max_stale_s = max_stale_s
        self._metadata: ProviderMetadata | None = None
        self._keys: _KeySet | None = None
        self._last_attempt: float | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def metadata(self) -> ProviderMetadata:
        """The issuer's discovery document (fetched once; ValueError if unusable)."""
        metadata = self._metadata
        if metadata is None:
            metadata = self._metadata = discover(self._http, self.issuer)
        return metadata

    def holds(self, kid: str) -> bool:
        """Whether the keys held now (nothing is fetched) include `kid`."""
        keys = self._keys
        return keys is not None and kid in keys.by_kid

    def serves(self, kid: str) -> bool:
        """Whether `kid` is among the keys held, and they may be used without asking the
        provider first (nothing is fetched): younger than the TTL, or a refresh was tried
        too recently to try again (and they are not too stale to use)."""
        keys = self._keys
        if keys is None or kid not in keys.by_kid:
            return False
        age = self._clock() - keys.fetched_at
        if age < self._ttl_s:
            return True
        last = self._last_attempt
        return (
            age < self._max_stale_s
            and last is not None
            and self._clock() - last < self._min_interval_s
        )

    def may_verify(self, kid: str, algorithm: str) -> bool:
        """Whether :meth:`signing_key` could give a key for `kid` and `algorithm`, with
        nothing fetched: it holds one (fresh or not), or it may fetch now (it never has, or
        its last try is at least the minimum interval old), which could bring one. Made-up
        key ids are thus refused, apart from at most one fetch per interval; a key the
        provider has just added is not, however the other requests go."""
        keys = self._keys
        if keys is not None and any(_fits(jwk, algorithm) for jwk in keys.by_kid.get(kid, ())):
            return True
        last = self._last_attempt
        return last is None or self._clock() - last >= self._min_interval_s

    def signing_key(self, kid: str, algorithm: str) -> jwt.PyJWK:
        """The key `kid` bound to `algorithm`; TokenRejected if there is none."""
        now = self._clock()
        keys = self._keys
        if keys is None or now - keys.fetched_at >= self._ttl_s or kid not in keys.by_kid:
            keys = self._refresh(now, kid)
        candidates = keys.by_kid.get(kid)
        if not candidates:
            _refuse(REASON_UNKNOWN_KID)
        loaded = keys.loaded.get((kid, algorithm))
        if loaded is None:
            jwk = next((c for c in candidates if _fits(c, algorithm)), None)
            if jwk is None:
                _refuse(REASON_KEY_MISMATCH)
            try:
                loaded = jwt.PyJWK(jwk, algorithm=algorithm)
            except (jwt.PyJWTError, ValueError, TypeError):
                _refuse(REASON_KEY_MISMATCH)
            keys.loaded[(kid, algorithm)] = loaded
        return loaded

    def _refresh(self, now: float, kid: str) -> _KeySet:
        with self._lock:
            keys = self._keys
            fresh = keys is not None and now - keys.fetched_at < self._ttl_s
            if keys is not None and fresh and kid in keys.by_kid:
                return keys  # another thread fetched meanwhile
            last = self._last_attempt
            if last is None or now - last >= self._min_interval_s:
                self._last_attempt = now
                try:
                    keys = self._keys = self._fetch(now)
                    return keys
                except ValueError as exc:
                    self._metadata = None  # the jwks_uri may have moved: rediscover next
                    logger.warning("cannot refresh the JWKS of %s: %s", self.issuer, exc)
            if keys is None or now - keys.fetched_at >= self._max_stale_s:
                _refuse(REASON_JWKS_UNAVAILABLE)
            return keys  # stale or without `kid`: the caller refuses what it lacks

    def _fetch(self, now: float) -> _KeySet:
        document = fetch_json(self._http, self.metadata().jwks_uri)
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("the JWKS has no list of keys")
        by_kid: dict[str, list[dict[str, Any]]] = {}
        for entry in entries[:_MAX_KEYS]:
            if _usable(entry):
                by_kid.setdefault(entry["kid"], []).append(entry)
        return _KeySet(by_kid=by_kid, fetched_at=now)
