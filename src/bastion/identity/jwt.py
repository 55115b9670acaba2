"""JWT bearer tokens from an OpenID Connect provider: checked, then mapped to a Principal.

A token is accepted only if all of this holds (each failure has its own reason code):

- its header names an algorithm of the configured allow-list (asymmetric ones only: never
  ``none``, never an HMAC, so a public key can never serve as a shared secret) and a
  ``kid`` that the issuer's JWKS publishes for a key of that algorithm's type;
- its signature verifies with that key (RSA keys of 2048 bits or more);
- ``iss`` is the configured issuer, ``aud`` holds the configured audience, ``sub`` is set,
  ``exp`` and ``iat`` are present, ``exp`` is not past, ``iat`` and ``nbf`` (when present)
  not in the future, each within the configured leeway;
- the claims mapping finds exactly one tenant, which exists and is enabled, and a role.

The issuer's keys come from :class:`~bastion.identity.jwks.JwksCache` (its discovery
document, then its JWKS, cached). A verified token's principal is kept in memory under
the token's SHA-256 (never the token) for a short while, so the usual request costs a
hash and a dict lookup, not a signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import urlsplit

import jwt
import sqlalchemy as sa

from bastion.errors import TokenRejected
from bastion.identity import jwks
from bastion.identity.grants import TENANT_NAME_PATTERN
from bastion.identity.jwks import ASYMMETRIC_ALGORITHMS, MAX_KID, JwksCache, check_url
from bastion.identity.principal import (
    ALL_MODELS,
    DEFAULT_ACTIONS,
    ROLES,
    SSO_KEY_PREFIX,
    Principal,
)
from bastion.identity.records import TenantInfo, tenant_info
from bastion.store.db import Database
from bastion.store.tables import tenants

REASON_MALFORMED = "malformed"
REASON_ALGORITHM = "disallowed_algorithm"
REASON_HEADER = "unsupported_header"
REASON_MISSING_KID = "missing_kid"
REASON_WEAK_KEY = "weak_key"
REASON_BAD_SIGNATURE = "bad_signature"
REASON_MISSING_CLAIM = "missing_claim"
REASON_EXPIRED = "expired"
REASON_NOT_YET_VALID = "not_yet_valid"
REASON_ISSUED_IN_FUTURE = "issued_in_future"
REASON_WRONG_ISSUER = "wrong_issuer"
REASON_WRONG_AUDIENCE = "wrong_audience"
REASON_NO_TENANT = "no_tenant"
REASON_NO_ROLE = "no_role"
REASON_UNKNOWN_TENANT = "unknown_tenant"
REASON_TENANT_DISABLED = "tenant_disabled"
# Found by the key cache, before any signature is checked.
REASON_UNKNOWN_KID = jwks.REASON_UNKNOWN_KID
REASON_KEY_MISMATCH = jwks.REASON_KEY_MISMATCH
REASON_JWKS_UNAVAILABLE = jwks.REASON_JWKS_UNAVAILABLE

# Failures of a token that the provider signed for this issuer and audience but that
# cannot be used: its time (expired, not yet valid) or its tenant's state. Only a holder
# of such a token meets them, so they are no guess and the throttle of failed sign-ins
# does not count them. Every other failure counts, a signed token's for another issuer
# or audience included: anyone can get one of those from a provider shared with other
# applications (identity/jwks.py's keys sign them all).
SIGNED_UNUSABLE_REASONS = frozenset(
    {
        REASON_EXPIRED,
        REASON_NOT_YET_VALID,
        REASON_ISSUED_IN_FUTURE,
        REASON_UNKNOWN_TENANT,
        REASON_TENANT_DISABLED,
    }
)

DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")

# Longer tokens are refused before any parsing (group claims can make tokens a few KiB).
MAX_TOKEN_BYTES = 16 * 1024
_MAX_SUBJECT = 255
_LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z, the last time a datetime holds
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# Signatures only; claims are checked here, against the injected clock. Never changed
# after import (one instance saves building PyJWT's algorithm table per token).
_JWS = jwt.PyJWS(options={"enforce_minimum_key_length": True})

# Messages for failures only a correctly signed token can reach; the rest get the generic
# one, so a forger learns nothing from the answer.
_MESSAGES = {
    REASON_EXPIRED: "The bearer token has expired.",
    REASON_NOT_YET_VALID: "The bearer token is not valid yet.",
    REASON_ISSUED_IN_FUTURE: "The bearer token is not valid yet.",
    REASON_WRONG_ISSUER: "The bearer token is from another issuer.",
    REASON_WRONG_AUDIENCE: "The bearer token is not meant for this server.",
    REASON_MISSING_CLAIM: "The bearer token lacks a required claim.",
    REASON_NO_TENANT: "The bearer token names no single tenant.",
    REASON_NO_ROLE: "The bearer token grants no role.",
    REASON_UNKNOWN_TENANT: "The bearer token names no tenant of this server.",
    REASON_TENANT_DISABLED: "The bearer token's tenant is disabled.",
}


@contextmanager
def signed_token() -> Iterator[None]:
    """Marks a TokenRejected raised inside as one about a correctly signed token."""
    try:
        yield
    except TokenRejected as exc:
        exc.signed = True
        raise


def reject(reason: str, message: str | None = None) -> NoReturn:
    """Raise TokenRejected for `reason`, with its message (the generic one for failures a
    forged token can reach)."""
    # `from None`: a chained library error could carry the token in a traceback's locals.
    raise TokenRejected(reason, message or _MESSAGES.get(reason)) from None


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What a token must satisfy besides its signature: issuer, audience, algorithms."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    # Clock skew tolerated on exp, nbf and iat, in seconds.
    leeway_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("a token policy needs an issuer and an audience")
        check_url(self.issuer)
        bad = [a for a in self.algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(
                f"JWT algorithms must be some of {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}"
                f" (never none or HMAC); got {', '.join(bad) or 'none'}"
            )
        if not 0 <= self.leeway_s <= 300:
            raise ValueError("the JWT leeway must be between 0 and 300 seconds")

    @property
    def issuer_host(self) -> str:
        """The issuer's host (and port), which names a token's subject in actor ids."""
        return urlsplit(self.issuer).netloc.rpartition("@")[2]


def decode_token(
    token: str, policy: TokenPolicy, keys: JwksCache, now: float
) -> tuple[dict[str, Any], str]:
    """The claims of a token that passes every check of `policy`, and its key id.

    TokenRejected otherwise. Claims beyond iss, aud, sub, exp, iat and nbf are the caller's.
    """
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_BYTES:
        reject(REASON_MALFORMED)
    header = _header(token)
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in policy.algorithms:
        reject(REASON_ALGORITHM)
    if "crit" in header or "b64" in header:
        reject(REASON_HEADER)  # no JWS extension is understood here
    kid = header.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID:
        reject(REASON_MISSING_KID)
    key = keys.signing_key(kid, algorithm)
    try:
        payload = _JWS.decode(token, key, algorithms=[algorithm])
    except jwt.InvalidSignatureError:
        reject(REASON_BAD_SIGNATURE)
    except jwt.InvalidKeyError:
        reject(REASON_WEAK_KEY)
    except (jwt.PyJWTError, ValueError, TypeError):
        reject(REASON_MALFORMED)
    with signed_token():
        try:
            claims = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            reject(REASON_MALFORMED)
        if not isinstance(claims, dict):
            reject(REASON_MALFORMED)
        check_claims(claims, policy, now)
    return claims, kid


def _header(token: str) -> dict[str, Any]:
    """The token's JOSE header, read only to choose the key: PyJWT parses the whole token
    again, strictly, before the signature is checked (reading it here rather than with
    PyJWT's get_unverified_header halves the cost of an uncached token)."""
    header = _read_header(token)
    if header is None:
        reject(REASON_MALFORMED)
    return header


def _read_header(token: str) -> dict[str, Any] | None:
    """The token's JOSE header as a JSON object; None if it is not one."""
    encoded, dot, _ = token.partition(".")
    if not dot or not _BASE64URL.fullmatch(encoded):
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


def may_verify(token: str, policy: TokenPolicy, keys: JwksCache) -> bool:
    """Whether `token` could pass :func:`decode_token`, as far as its header and the keys
    held tell without fetching or verifying anything: False if its header is not a JOSE
    header, names an algorithm `policy` does not allow, a JWS extension, or a key id that
    the issuer's key set cannot provide (:meth:`JwksCache.may_verify`)."""
    if not 0 < len(token) <= MAX_TOKEN_BYTES:
        return False
    header = _read_header(token)
    if header is None or "crit" in header or "b64" in header:
        return False
    algorithm, kid = header.get("alg"), header.get("kid")
    return (
        isinstance(algorithm, str)
        and algorithm in policy.algorithms
        and isinstance(kid, str)
        and 0 < len(kid) <= MAX_KID
        and keys.may_verify(kid, algorithm)
    )


def check_claims(claims: Mapping[str, Any], policy: TokenPolicy, now: float) -> None:
    """TokenRejected unless iss, aud, sub, exp, iat and nbf are as `policy` requires."""
    exp, iat, nbf = (_time_claim(claims, name) for name in ("exp", "iat", "nbf"))
    if exp is None or iat is None:
        reject(REASON_MISSING_CLAIM)
    if claims.get("iss") != policy.issuer:
        reject(REASON_WRONG_ISSUER)
    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or policy.audience not in audiences:
        reject(REASON_WRONG_AUDIENCE)
    subject = claims.get("sub")
    if not isinstance(subject, str) or not 0 < len(subject) <= _MAX_SUBJECT:
        reject(REASON_MISSING_CLAIM)
    if not subject.isprintable():
        reject(REASON_MALFORMED)
    leeway = policy.leeway_s
    if now >= exp + leeway:
        reject(REASON_EXPIRED)
    if iat > now + leeway:
        reject(REASON_ISSUED_IN_FUTURE)
    if nbf is not None and nbf > now + leeway:
        reject(REASON_NOT_YET_VALID)


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        reject(REASON_MALFORMED)
    if not 0 <= value <= _LAST_SECOND:  # (also refuses NaN)
        reject(REASON_MALFORMED)
    return float(value)


# Resolves a tenant name to its record (None: no such tenant).
TenantLookup = Callable[[str], TenantInfo | None]


def database_tenants(db: Database) -> TenantLookup:
    """A tenant lookup that reads the database (blocking: call it from a thread)."""

    def lookup(name: str) -> TenantInfo | None:
        with db.read() as conn:
            row = conn.execute(sa.select(tenants).where(tenants.c.name == name)).mappings()
            found = row.one_or_none()
        return tenant_info(found) if found is not None else None

    return lookup


@dataclass(frozen=True, slots=True)
class ClaimsMapping:
    """Which claims name a token's tenant and role.

    A claim name may be a dotted path into nested objects (``realm_access.roles``); a
    claim with that exact name wins. The tenant claim holds the tenant's name, or, with
    `tenant_pattern` (a regular expression with one group, matched against the whole of
    each value), a list such as groups from which the group extracts the name: exactly one
    tenant must result. The role claim's values (a string or a list) are looked up in
    `role_map` (value -> role), or are role names themselves when it is empty; of several
    roles, the most privileged one holds.
    """

    tenant_claim: str = "bastion_tenant"
    tenant_pattern: str | None = None
    role_claim: str = "bastion_role"
    role_map: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tenant_pattern is not None and re.compile(self.tenant_pattern).groups != 1:
            raise ValueError("the tenant pattern needs exactly one group (the tenant name)")
        unknown = set(self.role_map.values()).difference(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) in the role map: {', '.join(sorted(unknown))}")

    def tenant(self, claims: Mapping[str, Any]) -> str:
        values = _strings(_claim(claims, self.tenant_claim))
        if self.tenant_pattern is None:
            names = set(values)
        else:
            matches = (re.fullmatch(self.tenant_pattern, v) for v in values)
            names = {m.group(1) for m in matches if m is not None}
        if len(names) != 1:
            reject(REASON_NO_TENANT)
        (name,) = names
        if not TENANT_NAME_PATTERN.fullmatch(name):
            reject(REASON_UNKNOWN_TENANT)
        return name

    def role(self, claims: Mapping[str, Any]) -> str:
        values = _strings(_claim(claims, self.role_claim))
        if self.role_map:
            roles = {self.role_map[v] for v in values if v in self.role_map}
        else:
            roles = set(values).intersection(ROLES)
        for role in ROLES:  # most privileged first
            if role in roles:
                return role
        reject(REASON_NO_ROLE)

    def principal(
        self, claims: Mapping[str, Any], policy: TokenPolicy, tenants: TenantLookup
    ) -> Principal:
        """The principal of claims that :func:`check_claims` accepted."""
        name = self.tenant(claims)
        role = self.role(claims)
        tenant = tenants(name)
        if tenant is None:
            reject(REASON_UNKNOWN_TENANT)
        if tenant.disabled:
            reject(REASON_TENANT_DISABLED)
        return Principal(
            key_id=f"{SSO_KEY_PREFIX}{policy.issuer_host}:{claims['sub']}",
            tenant_id=tenant.id,
            tenant_name=tenant.name,
            role=role,
            models=ALL_MODELS,
            actions=frozenset(DEFAULT_ACTIONS[role]),
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        )


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    kid: str
    until: float


class JwtVerifier:
    """Turns JWT bearer tokens into Principals, with a short cache of verified tokens.

    :meth:`cached` answers from memory only (for the event loop); :meth:`verify` may fetch
    the JWKS and read the tenant, so it blocks: call it from a thread.
    """

    def __init__(
        self,
        policy: TokenPolicy,
        mapping: ClaimsMapping,
        keys: JwksCache,
        tenants: TenantLookup,
        *,
        clock: Callable[[], float] = time.time,
        cache_ttl_s: float = 60.0,
        max_cached_tokens: int = 10_000,
    ) -> None:
        if keys.issuer != policy.issuer:
            raise ValueError("the JWKS cache is for another issuer")
        self.policy = policy
        self._mapping = mapping
        self._keys = keys
        self._tenants = tenants
        self._clock = clock
        self._cache_ttl_s = cache_ttl_s
        self._max_cached = max_cached_tokens
        self._verified: dict[bytes, _Verified] = {}
        # Bumped by invalidate(); a verification that began under an older generation may
        # have read a tenant since changed, and is not kept.
        self._generation = 0

    def cached(self, token: str) -> Principal | None:
        """The principal of a token verified recently and still valid, else None."""
        if len(token) > MAX_TOKEN_BYTES:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        entry = self._verified.get(digest)
        if entry is None:
            return None
        # A withdrawn key's tokens go once the keys are due for a refresh: verify() fetches.
        if self._clock() >= entry.until or not self._keys.serves(entry.kid):
            self._verified.pop(digest, None)
            return None
        return entry.principal

    def may_verify(self, token: str) -> bool:
        """Whether `token` could be valid, from memory only and cheaply (no signature, no
        fetch): see :func:`may_verify`. The throttle of failed sign-ins refuses the tokens
        that could not unchecked from a locked-out address."""
        return may_verify(token, self.policy, self._keys)

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; TokenRejected (reason attached) otherwise."""
        principal = self.cached(token)
        if principal is not None:
            return principal
        now = self._clock()
        generation = self._generation
        claims, kid = decode_token(token, self.policy, self._keys, now)
        with signed_token():
            principal = self._mapping.principal(claims, self.policy, self._tenants)
        if generation != self._generation:
            return principal  # invalidated meanwhile: use it, but do not keep it
        until = min(float(claims["exp"]), now + self._cache_ttl_s)
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        verified = self._verified
        while len(verified) >= self._max_cached:
            try:
                del verified[next(iter(verified))]
            except (StopIteration, KeyError, RuntimeError):
                break
        verified[digest] = _Verified(principal, kid, until)
        return principal

    def invalidate(self) -> None:
        """Forget every verified token (call it when tenants change)."""
        self._generation += 1
        # A new dict rather than clear(): a request thread may be using the old one.
        self._verified = {}
