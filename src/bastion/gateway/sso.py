"""Single sign-on on the gateway's side: the identity provider's keys and claims mapping,
built once from the settings, and which ``Authorization`` headers carry a JWT.

When ``BASTION_JWT_ISSUER`` and ``BASTION_JWT_AUDIENCE`` are set, a ``Bearer`` token with a
JWT's shape (three base64url segments) is checked by a
:class:`~bastion.identity.jwt.JwtVerifier` (in gateway/auth.py) instead of being read as
an API key; its principal then goes through the same authorization, quotas and metering
as a key's (docs/sso.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bastion.config import Settings, SsoSettings
from bastion.errors import ConfigurationError
from bastion.identity.jwks import JwksCache
from bastion.identity.jwt import (
    MAX_TOKEN_BYTES,
    ClaimsMapping,
    JwtVerifier,
    TokenPolicy,
    database_tenants,
)
from bastion.store.db import Database

# The longest Authorization header read as a JWT: "Bearer ", the token, some spaces.
MAX_JWT_AUTHORIZATION_LENGTH = MAX_TOKEN_BYTES + 16
# What a JWS in compact form looks like (an unsigned one has an empty third segment, and
# is refused by the verifier for its algorithm).
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Fetches of the provider's keys are at least this far apart (or the JWKS TTL, if shorter):
# made-up key ids cannot make the gateway ask the provider more often.
MIN_REFRESH_INTERVAL_S = 30.0
MAX_JWKS_TTL_S = 86_400.0


@dataclass(frozen=True, slots=True)
class SingleSignOn:
    """The provider's keys and claims mapping, and the verifier of the API's bearer tokens
    (None when ``BASTION_JWT_AUDIENCE`` is not set: the console's sign-in only)."""

    settings: SsoSettings
    keys: JwksCache
    mapping: ClaimsMapping
    verifier: JwtVerifier | None

    def close(self) -> None:
        self.keys.close()


def single_sign_on(settings: Settings, db: Database) -> SingleSignOn | None:
    """Single sign-on as configured, or None when it is off; ConfigurationError for
    settings that do not fit (checked at start, before anything is served)."""
    sso = settings.single_sign_on()
    if sso is None:
        return None
    if not 0 < sso.jwks_ttl_s <= MAX_JWKS_TTL_S:
        raise ConfigurationError(
            f"BASTION_JWT_JWKS_TTL_S must be above 0 and at most {MAX_JWKS_TTL_S:g} seconds."
        )
    try:
        mapping = ClaimsMapping(sso.tenant_claim, sso.tenant_pattern, sso.role_claim, sso.role_map)
        policy = None
        if sso.audience is not None:
            policy = TokenPolicy(sso.issuer, sso.audience, sso.algorithms, sso.leeway_s)
        keys = JwksCache(
            sso.issuer,
            ttl_s=sso.jwks_ttl_s,
            min_refresh_interval_s=min(MIN_REFRESH_INTERVAL_S, sso.jwks_ttl_s),
        )
    except (ValueError, re.error) as exc:
        # re.error: a tenant pattern that is no regular expression.
        raise ConfigurationError(f"Single sign-on (BASTION_JWT_*): {exc}.") from exc
    verifier = None
    if policy is not None:
        verifier = JwtVerifier(policy, mapping, keys, database_tenants(db))
    return SingleSignOn(settings=sso, keys=keys, mapping=mapping, verifier=verifier)


def jwt_of(authorization: str) -> str | None:
    """The token of a ``Bearer`` header that looks like a JWT (two dots; the segments'
    alphabet is checked by :func:`looks_like_jwt`), else None: then it is read as an API
    key, which has no dots."""
    if len(authorization) > MAX_JWT_AUTHORIZATION_LENGTH or authorization.count(".") != 2:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


def looks_like_jwt(token: str) -> bool:
    """Whether `token` has the shape of a compact JWS: three base64url segments."""
    return _JWT_SHAPE.fullmatch(token) is not None
