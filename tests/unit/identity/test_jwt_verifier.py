"""JWT bearer tokens: every kind of bad token refused for its reason, the claims mapping,
the verified-token cache, and the JWKS cache against a provider that rotates its keys
(tests/oidc_provider.py, a real HTTP server on loopback)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest

from bastion.identity import jwks
from bastion.identity import jwt as bjwt
from bastion.identity.jwks import JwksCache
from bastion.identity.jwt import (
    ClaimsMapping,
    JwtVerifier,
    TokenPolicy,
    TokenRejected,
    database_tenants,
)
from bastion.identity.principal import ALL_MODELS, DEFAULT_ACTIONS, OPERATOR
from bastion.identity.records import TenantInfo
from bastion.identity.service import IdentityService
from bastion.store.db import Database
from oidc_provider import API_AUDIENCE, ManualClock, OidcProvider, SigningKey, new_key

CREATED = datetime(2026, 1, 1, tzinfo=UTC)
TENANTS = {
    "acme": TenantInfo(id=7, name="acme", disabled=False, created_at=CREATED, disabled_at=None),
    "beta": TenantInfo(id=8, name="beta", disabled=False, created_at=CREATED, disabled_at=None),
    "frozen": TenantInfo(id=9, name="frozen", disabled=True, created_at=CREATED, disabled_at=None),
}
TTL_S = 300.0
MIN_REFRESH_S = 30.0


@pytest.fixture(scope="module")
def running_provider() -> Iterator[OidcProvider]:
    with OidcProvider() as running:
        yield running


@pytest.fixture
def provider(running_provider: OidcProvider) -> OidcProvider:
    running_provider.reset()
    return running_provider


@pytest.fixture
def clock(provider: OidcProvider) -> ManualClock:
    return provider.clock


Make = Callable[..., JwtVerifier]


@pytest.fixture
def make(provider: OidcProvider, clock: ManualClock) -> Iterator[Make]:
    caches: list[JwksCache] = []

    def build(
        mapping: ClaimsMapping | None = None,
        *,
        algorithms: tuple[str, ...] = bjwt.DEFAULT_ALGORITHMS,
        leeway_s: float = 30.0,
        timeout_s: float = 5.0,
        max_stale_s: float = 3600.0,
    ) -> JwtVerifier:
        keys = JwksCache(
            provider.issuer,
            clock=clock,
            ttl_s=TTL_S,
            min_refresh_interval_s=MIN_REFRESH_S,
            max_stale_s=max_stale_s,
            timeout_s=timeout_s,
        )
        caches.append(keys)
        policy = TokenPolicy(provider.issuer, API_AUDIENCE, algorithms, leeway_s)
        return JwtVerifier(policy, mapping or ClaimsMapping(), keys, TENANTS.get, clock=clock)

    yield build
    for keys in caches:
        keys.close()


@pytest.fixture
def verifier(make: Make) -> JwtVerifier:
    return make()


def refused(verifier: JwtVerifier, token: str) -> str:
    """The reason `token` is refused, after checking the error gives nothing away."""
    with pytest.raises(TokenRejected) as caught:
        verifier.verify(token)
    error = caught.value
    assert error.status == 401
    assert error.code == "invalid_token"
    assert error.headers["www-authenticate"].startswith("Bearer ")
    shown = " ".join([str(error), repr(error.args), *error.headers.values()])
    assert token not in shown
    assert all(part not in shown for part in token.split(".") if len(part) > 8)
    assert error.__cause__ is None and error.__suppress_context__
    assert error.reason is not None
    return error.reason


def test_a_valid_token_becomes_the_principal_its_claims_map_to(
    verifier: JwtVerifier, provider: OidcProvider, clock: ManualClock
) -> None:
    principal = verifier.verify(provider.mint())
    assert principal.key_id == f"jwt:{provider.issuer.removeprefix('http://')}:alice"
    assert principal.actor == principal.key_id
    assert (principal.tenant_id, principal.tenant_name) == (7, "acme")
    assert principal.role == "tenant-admin"
    assert principal.actions == frozenset(DEFAULT_ACTIONS["tenant-admin"])
    assert principal.models == ALL_MODELS
    assert principal.expires_at == datetime.fromtimestamp(int(clock()) + 300, UTC)
    # It goes through the same authorization as a key's principal.
    principal.require_action("chat")
    principal.require_tenant_admin_of(7)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_each_default_algorithm_is_accepted(
    make: Make, provider: OidcProvider, algorithm: str
) -> None:
    key = provider.rotate(algorithm)
    assert make().verify(provider.mint(key=key)).tenant_name == "acme"


BAD_TOKENS: list[tuple[str, Callable[[OidcProvider], str], str]] = [
    ("expired", OidcProvider.mint_expired, bjwt.REASON_EXPIRED),
    ("wrong audience", OidcProvider.mint_wrong_audience, bjwt.REASON_WRONG_AUDIENCE),
    ("wrong issuer", OidcProvider.mint_wrong_issuer, bjwt.REASON_WRONG_ISSUER),
    ("alg none", OidcProvider.mint_alg_none, bjwt.REASON_ALGORITHM),
    ("alg None", lambda p: p.mint_alg_none("None"), bjwt.REASON_ALGORITHM),
    ("alg NONE", lambda p: p.mint_alg_none("NONE"), bjwt.REASON_ALGORITHM),
    (
        "HS256 keyed with the public key",
        OidcProvider.mint_hs256_with_public_key,
        "disallowed_algorithm",
    ),
    ("unknown kid", OidcProvider.mint_unknown_kid, bjwt.REASON_UNKNOWN_KID),
    ("future nbf", OidcProvider.mint_future_nbf, bjwt.REASON_NOT_YET_VALID),
    ("missing exp", OidcProvider.mint_missing_exp, bjwt.REASON_MISSING_CLAIM),
    ("signed by another key", OidcProvider.mint_foreign_key, bjwt.REASON_BAD_SIGNATURE),
    (
        "issued in the future",
        lambda p: p.mint(p.claims(iat=int(p.clock()) + 600, exp=int(p.clock()) + 900)),
        bjwt.REASON_ISSUED_IN_FUTURE,
    ),
    ("missing iat", lambda p: p.mint(p.claims(iat=None)), bjwt.REASON_MISSING_CLAIM),
    ("missing sub", lambda p: p.mint(p.claims(sub=None)), bjwt.REASON_MISSING_CLAIM),
    ("exp not a number", lambda p: p.mint(p.claims(exp="soon")), bjwt.REASON_MALFORMED),
    ("exp a boolean", lambda p: p.mint(p.claims(exp=True)), bjwt.REASON_MALFORMED),
    ("exp past 9999", lambda p: p.mint(p.claims(exp=10**13)), bjwt.REASON_MALFORMED),
    ("audience list without us", lambda p: p.mint(p.claims(aud=["a", "b"])), "wrong_audience"),
    ("no kid", lambda p: p.mint(headers={"kid": None}), bjwt.REASON_MISSING_KID),
    ("kid not a string", lambda p: p.mint_raw_header(kid=7), bjwt.REASON_MISSING_KID),
    ("crit header", lambda p: p.mint_raw_header(crit=["b64"], b64=True), "unsupported_header"),
    ("RS384, not allowed", lambda p: p.mint(key=_as(p.signing, "RS384")), bjwt.REASON_ALGORITHM),
    ("ES256 naming an RSA key", lambda p: _es256_under(p), bjwt.REASON_KEY_MISMATCH),
    ("RSA key of 1024 bits", lambda p: _weak(p), bjwt.REASON_WEAK_KEY),
    ("unknown crit", lambda p: p.mint_raw_header(crit=["x-bastion"]), "unsupported_header"),
    ("not a JWT", lambda p: "not-a-token", bjwt.REASON_MALFORMED),
    ("header not base64url", lambda p: "e30!." + p.mint().partition(".")[2], "malformed"),
    ("header not JSON", lambda p: "bm90IGpzb24." + p.mint().partition(".")[2], "malformed"),
    ("header a JSON list", lambda p: "W10." + p.mint().partition(".")[2], "malformed"),
    ("padded header", lambda p: "e30=." + p.mint().partition(".")[2], "malformed"),
    ("two segments", lambda p: p.mint().rpartition(".")[0], bjwt.REASON_MALFORMED),
    ("tampered payload", lambda p: _tampered(p), bjwt.REASON_BAD_SIGNATURE),
    ("oversized", lambda p: p.mint(p.claims(pad="x" * 20_000)), bjwt.REASON_MALFORMED),
]


def _as(key: SigningKey, algorithm: str) -> SigningKey:
    return SigningKey(key.kid, algorithm, key.private_key)


def _es256_under(provider: OidcProvider) -> str:
    """An ES256 token naming the RSA key's kid: the algorithm must fit the key's type."""
    return provider.mint(
        key=SigningKey(provider.signing.kid, "ES256", new_key("ES256").private_key)
    )


def _weak(provider: OidcProvider) -> str:
    key = new_key(rsa_bits=1024)
    provider.published.append(key)
    provider.clock.advance(MIN_REFRESH_S)  # so that the new kid may be fetched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return provider.mint(key=key)


def _tampered(provider: OidcProvider) -> str:
    header, _, signature = provider.mint().split(".")
    other = provider.mint(provider.claims(bastion_role="admin")).split(".")[1]
    return f"{header}.{other}.{signature}"


@pytest.mark.parametrize(
    ("mint", "reason"), [b[1:] for b in BAD_TOKENS], ids=[b[0] for b in BAD_TOKENS]
)
def test_every_bad_token_is_refused_for_its_reason(
    verifier: JwtVerifier, provider: OidcProvider, mint: Callable[[OidcProvider], str], reason: str
) -> None:
    verifier.verify(provider.mint())  # the JWKS is loaded: what follows is the token's fault
    assert refused(verifier, mint(provider)) == reason


def test_only_failures_a_signed_token_can_reach_say_more_than_the_generic_message(
    verifier: JwtVerifier, provider: OidcProvider
) -> None:
    with pytest.raises(TokenRejected, match="expired"):
        verifier.verify(provider.mint_expired())
    for token in (provider.mint_alg_none(), provider.mint_foreign_key(), "x.y.z"):
        with pytest.raises(TokenRejected, match=r"^Invalid or missing bearer token\."):
            verifier.verify(token)


def test_a_failure_says_whether_the_token_was_correctly_signed(
    verifier: JwtVerifier, provider: OidcProvider
) -> None:
    def signed(token: str) -> bool:
        with pytest.raises(TokenRejected) as caught:
            verifier.verify(token)
        return caught.value.signed

    # Guesses and forgeries: a throttle of failed attempts counts these.
    assert not signed(provider.mint_foreign_key())
    assert not signed(provider.mint_alg_none())
    assert not signed(provider.mint_unknown_kid())
    assert not signed("x.y.z")
    # The provider's own tokens, refused for what they say.
    assert signed(provider.mint_expired())
    assert signed(provider.mint_wrong_audience())
    assert signed(provider.mint(provider.claims(exp="soon")))
    assert signed(provider.mint(provider.claims(bastion_tenant="nobody")))


@pytest.mark.parametrize("algorithms", [("none",), ("HS256",), ("RS256", "HS512"), ()])
def test_no_policy_may_allow_none_or_hmac(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="never none or HMAC"):
        TokenPolicy("https://idp.example", "api", algorithms)


def test_policies_refuse_plain_http_issuers_except_on_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        TokenPolicy("http://idp.example", "api")
    TokenPolicy("http://127.0.0.1:8080", "api")


def test_the_leeway_covers_clock_skew_and_no_more(
    make: Make, provider: OidcProvider, clock: ManualClock
) -> None:
    verifier = make(leeway_s=30.0)
    now = int(clock())
    assert verifier.verify(provider.mint(provider.claims(exp=now - 29)))
    assert verifier.verify(provider.mint(provider.claims(iat=now + 29, nbf=now + 29)))
    assert refused(verifier, provider.mint(provider.claims(exp=now - 30))) == "expired"
    assert refused(verifier, provider.mint(provider.claims(nbf=now + 31))) == "not_yet_valid"


# ---------------------------------------------------------------------- claims mapping

GROUPS = ClaimsMapping(
    tenant_claim="groups",
    tenant_pattern=r"bastion-tenant-([a-z0-9_-]+)",
    role_claim="groups",
    role_map={"ml-users": "consumer", "ml-admins": "tenant-admin", "ops": "admin"},
)


@pytest.mark.parametrize(
    ("mapping", "extra", "expected"),
    [
        (ClaimsMapping(), {"bastion_role": "consumer"}, ("acme", "consumer")),
        (ClaimsMapping(), {"bastion_role": ["consumer", "admin"]}, ("acme", "admin")),
        (GROUPS, {"groups": ["staff", "bastion-tenant-beta", "ml-users"]}, ("beta", "consumer")),
        (
            GROUPS,
            {"groups": ["bastion-tenant-beta", "ml-users", "ml-admins", "bastion-tenant-beta"]},
            ("beta", "tenant-admin"),
        ),
        (
            ClaimsMapping(tenant_claim="org.name", role_claim="realm_access.roles"),
            {"org": {"name": "beta"}, "realm_access": {"roles": ["x", "consumer"]}},
            ("beta", "consumer"),
        ),
        (
            ClaimsMapping(tenant_claim="https://bastion.example/tenant"),
            {"https://bastion.example/tenant": "beta", "bastion_role": "consumer"},
            ("beta", "consumer"),
        ),
    ],
)
def test_the_claims_mapping_picks_the_tenant_and_the_most_privileged_role(
    make: Make,
    provider: OidcProvider,
    mapping: ClaimsMapping,
    extra: dict[str, Any],
    expected: tuple[str, str],
) -> None:
    principal = make(mapping).verify(provider.mint(provider.claims(**extra)))
    assert (principal.tenant_name, principal.role) == expected
    assert principal.actions == frozenset(DEFAULT_ACTIONS[expected[1]])


@pytest.mark.parametrize(
    ("mapping", "extra", "reason"),
    [
        (ClaimsMapping(), {"bastion_tenant": None}, "no_tenant"),
        (ClaimsMapping(), {"bastion_tenant": ["acme", "beta"]}, "no_tenant"),
        (ClaimsMapping(), {"bastion_tenant": 7}, "no_tenant"),
        (ClaimsMapping(), {"bastion_tenant": "nobody"}, "unknown_tenant"),
        (ClaimsMapping(), {"bastion_tenant": "Not A Name"}, "unknown_tenant"),
        (ClaimsMapping(), {"bastion_tenant": "frozen"}, "tenant_disabled"),
        (ClaimsMapping(), {"bastion_role": None}, "no_role"),
        (ClaimsMapping(), {"bastion_role": "superuser"}, "no_role"),
        (
            GROUPS,
            {"groups": ["bastion-tenant-acme", "ml-users", "bastion-tenant-beta"]},
            "no_tenant",
        ),
        (GROUPS, {"groups": ["bastion-tenant-acme", "consumer"]}, "no_role"),
        (GROUPS, {"groups": "xbastion-tenant-acme"}, "no_tenant"),
    ],
)
def test_a_token_that_maps_to_no_tenant_or_role_is_refused(
    make: Make, provider: OidcProvider, mapping: ClaimsMapping, extra: dict[str, Any], reason: str
) -> None:
    claims = provider.claims(**extra)
    for name, value in extra.items():
        if value is None:
            claims.pop(name, None)
    assert refused(make(mapping), provider.mint(claims)) == reason


def test_a_mapping_is_checked_when_it_is_made() -> None:
    with pytest.raises(ValueError, match="one group"):
        ClaimsMapping(tenant_pattern="bastion-.*")
    with pytest.raises(ValueError, match="unknown role"):
        ClaimsMapping(role_map={"ops": "root"})


def test_tenants_are_read_from_the_database(
    db: Database, service: IdentityService, provider: OidcProvider, clock: ManualClock
) -> None:
    tenant = service.create_tenant(OPERATOR, "acme")
    keys = JwksCache(provider.issuer, clock=clock)
    verifier = JwtVerifier(
        TokenPolicy(provider.issuer, API_AUDIENCE),
        ClaimsMapping(),
        keys,
        database_tenants(db),
        clock=clock,
    )
    assert verifier.verify(provider.mint()).tenant_id == tenant.id
    service.disable_tenant(OPERATOR, "acme")
    verifier.invalidate()
    assert refused(verifier, provider.mint()) == "tenant_disabled"
    assert database_tenants(db)("nobody") is None
    keys.close()


# ---------------------------------------------------------------------- verified-token cache


def test_a_verified_token_is_served_from_memory_until_it_expires(
    verifier: JwtVerifier, provider: OidcProvider, clock: ManualClock
) -> None:
    token = provider.mint(provider.claims(exp=int(clock()) + 45))
    assert verifier.cached(token) is None
    principal = verifier.verify(token)
    assert verifier.cached(token) is principal
    assert verifier.verify(token) is principal
    clock.advance(44)
    assert verifier.cached(token) is principal
    clock.advance(1)
    assert verifier.cached(token) is None
    # Within the leeway it is verified afresh (and still accepted); past it, refused.
    assert verifier.verify(token) == principal
    clock.advance(30)
    assert refused(verifier, token) == "expired"


def test_the_cache_holds_a_token_briefly_even_if_it_lives_long(
    verifier: JwtVerifier, provider: OidcProvider, clock: ManualClock
) -> None:
    token = provider.mint(provider.claims(exp=int(clock()) + 3600))
    verifier.verify(token)
    clock.advance(61)
    assert verifier.cached(token) is None
    assert verifier.verify(token).tenant_name == "acme"


def test_a_refused_token_is_not_cached(verifier: JwtVerifier, provider: OidcProvider) -> None:
    token = provider.mint_wrong_audience()
    refused(verifier, token)
    assert verifier.cached(token) is None


def test_the_cache_is_bounded(make: Make, provider: OidcProvider) -> None:
    verifier = make()
    verifier._max_cached = 3
    tokens = [provider.mint(provider.claims(sub=f"user{i}")) for i in range(5)]
    for token in tokens:
        verifier.verify(token)
    assert len(verifier._verified) == 3
    assert verifier.cached(tokens[0]) is None and verifier.cached(tokens[-1]) is not None


# ---------------------------------------------------------------------- keys at the provider


def test_key_rotation_at_the_provider(
    verifier: JwtVerifier, provider: OidcProvider, clock: ManualClock
) -> None:
    old_key = provider.signing
    old_token = provider.mint(provider.claims(exp=int(clock()) + 3600))
    assert verifier.verify(old_token)
    assert provider.requests == {"discovery": 1, "jwks": 1}

    # A new key: its tokens are accepted after one refresh, old tokens still are.
    clock.advance(MIN_REFRESH_S)
    new_key_ = provider.rotate()
    new_token = provider.mint(provider.claims(exp=int(clock()) + 3600))
    assert verifier.verify(new_token)
    assert provider.requests["jwks"] == 2
    for _ in range(3):
        assert verifier.verify(provider.mint())
    assert verifier.verify(provider.mint(key=old_key))
    assert provider.requests["jwks"] == 2

    # The old key withdrawn: its tokens stop working once the cached JWKS expires, and a
    # token verified earlier is no longer served from memory.
    provider.retire(old_key.kid)
    clock.advance(TTL_S)
    assert verifier.verify(new_token)
    assert provider.requests["jwks"] == 3
    assert verifier.cached(old_token) is None
    assert refused(verifier, old_token) == "unknown_kid"
    assert refused(verifier, provider.mint(key=old_key)) == "unknown_kid"
    assert provider.requests["jwks"] == 3  # (within the refresh interval: no new fetch)
    assert provider.requests["discovery"] == 1
    assert [k.kid for k in provider.published] == [new_key_.kid]


def test_a_withdrawn_keys_cached_tokens_go_once_the_keys_are_due_for_a_refresh(
    make: Make, provider: OidcProvider, clock: ManualClock
) -> None:
    verifier = make()
    verifier._cache_ttl_s = 3600.0  # (the keys' TTL is the bound tested here)
    old_key = provider.signing
    token = provider.mint(provider.claims(exp=int(clock()) + 3600))
    principal = verifier.verify(token)
    provider.rotate()
    provider.retire(old_key.kid)
    clock.advance(TTL_S - 1)
    assert verifier.cached(token) is principal
    # Due for a refresh: no longer answered from memory, though nothing else asked since.
    clock.advance(1)
    assert verifier.cached(token) is None
    assert refused(verifier, token) == "unknown_kid"


def test_while_the_provider_is_down_verified_tokens_are_served_between_attempts(
    make: Make, provider: OidcProvider, clock: ManualClock
) -> None:
    verifier = make(max_stale_s=1800.0)
    token = provider.mint(provider.claims(exp=int(clock()) + 3600))
    verifier.verify(token)
    verifier._cache_ttl_s = 3600.0
    verifier.verify(other := provider.mint(provider.claims(sub="bob", exp=int(clock()) + 3600)))
    provider.jwks_padding = jwks.MAX_DOCUMENT_BYTES  # every fetch fails from here on
    clock.advance(TTL_S)
    assert verifier.cached(token) is None
    assert verifier.verify(token)  # the refresh failed; the keys held still serve
    assert provider.requests["jwks"] == 2
    # Until the next attempt is due, tokens verified before need no thread.
    assert verifier.cached(other) is not None
    clock.advance(MIN_REFRESH_S)
    assert verifier.cached(other) is None


def test_unknown_kids_cannot_make_bastion_hammer_the_provider(
    verifier: JwtVerifier, provider: OidcProvider, clock: ManualClock
) -> None:
    verifier.verify(provider.mint())
    assert provider.requests["jwks"] == 1
    for _ in range(200):
        assert refused(verifier, provider.mint_unknown_kid()) == "unknown_kid"
    assert provider.requests["jwks"] == 1  # fetched just now: no refresh at all
    clock.advance(MIN_REFRESH_S)
    for _ in range(200):
        assert refused(verifier, provider.mint_unknown_kid()) == "unknown_kid"
    assert provider.requests["jwks"] == 2  # one refresh per interval, however many kids
    assert provider.requests["discovery"] == 1


def test_threads_that_meet_a_new_key_at_once_fetch_the_jwks_once(
    verifier: JwtVerifier, provider: OidcProvider, clock: ManualClock
) -> None:
    verifier.verify(provider.mint())
    clock.advance(MIN_REFRESH_S)
    provider.rotate()
    tokens = [provider.mint(provider.claims(sub=f"user{i}")) for i in range(16)]
    start = threading.Barrier(len(tokens))
    results: list[str] = []

    def verify(token: str) -> None:
        start.wait()
        results.append(verifier.verify(token).tenant_name)

    threads = [threading.Thread(target=verify, args=(t,)) for t in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["acme"] * len(tokens)
    assert provider.requests["jwks"] == 2


def test_a_jwks_over_the_size_cap_is_not_read(
    verifier: JwtVerifier, provider: OidcProvider
) -> None:
    provider.jwks_padding = jwks.MAX_DOCUMENT_BYTES
    assert refused(verifier, provider.mint()) == "jwks_unavailable"


def test_a_provider_that_does_not_answer_in_time_is_given_up_on(
    make: Make, provider: OidcProvider
) -> None:
    provider.jwks_delay_s = 1.0
    assert refused(make(timeout_s=0.2), provider.mint()) == "jwks_unavailable"


def test_an_unreachable_provider_is_not_asked_again_at_once(
    make: Make, provider: OidcProvider, clock: ManualClock
) -> None:
    verifier = make()
    provider.jwks_padding = jwks.MAX_DOCUMENT_BYTES
    for _ in range(5):
        assert refused(verifier, provider.mint()) == "jwks_unavailable"
    assert provider.requests["jwks"] == 1
    provider.jwks_padding = 0
    clock.advance(MIN_REFRESH_S)
    assert verifier.verify(provider.mint())
    assert provider.requests["discovery"] == 2  # rediscovered after the failure


def test_keys_held_serve_while_the_provider_is_down_until_they_are_too_old(
    make: Make, provider: OidcProvider, clock: ManualClock
) -> None:
    verifier = make(max_stale_s=1800.0)
    verifier.verify(provider.mint())
    provider.jwks_padding = jwks.MAX_DOCUMENT_BYTES  # every fetch fails from here on
    clock.advance(TTL_S)
    assert verifier.verify(provider.mint())
    assert provider.requests["jwks"] == 2
    clock.advance(1800 - TTL_S)
    assert refused(verifier, provider.mint()) == "jwks_unavailable"


def test_only_public_signature_keys_are_taken_from_the_jwks(
    verifier: JwtVerifier, provider: OidcProvider
) -> None:
    other = new_key()
    private = jwt.algorithms.RSAAlgorithm.to_jwk(other.private_key, as_dict=True)
    provider.extra_jwks = [
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"},
        {**new_key("ES256").public_jwk(), "kid": "enc", "use": "enc"},
        {**private, "kid": "private"},
        {**new_key("ES256").public_jwk(), "kid": "broken", "x": "AAAA"},
        {"kty": "RSA", "kid": "junk"},
        "not a key",
        {**new_key("EdDSA").public_jwk(), "kid": "ok"},
    ]
    verifier.verify(provider.mint())
    keys = verifier._keys
    assert [k for k in ("hmac", "enc", "private", "broken", "junk") if keys.holds(k)] == []
    assert keys.holds("ok") and keys.holds(provider.signing.kid)


def test_a_discovery_document_for_another_issuer_is_refused(
    provider: OidcProvider, clock: ManualClock
) -> None:
    keys = JwksCache(provider.issuer.replace("127.0.0.1", "localhost"), clock=clock)
    with pytest.raises(ValueError, match="another issuer"):
        keys.metadata()
    keys.close()


def test_a_verifier_needs_keys_of_its_own_issuer(provider: OidcProvider) -> None:
    keys = JwksCache("https://idp.example")
    with pytest.raises(ValueError, match="another issuer"):
        JwtVerifier(TokenPolicy(provider.issuer, API_AUDIENCE), ClaimsMapping(), keys, TENANTS.get)
    keys.close()
