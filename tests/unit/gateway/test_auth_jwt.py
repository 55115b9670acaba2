"""The authenticator with single sign-on: JWT bearer tokens beside API keys, from memory
on the event loop and verified in a thread, their failures reported and throttled like a
key's (by address only, never a token the provider signed for this server that is only
expired or of an unusable tenant), and their cache dropped with the database revision.
The provider is tests/oidc_provider.py on loopback."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bastion.audit.events import AUTH_FAILED, MemoryEventSink
from bastion.config import Settings
from bastion.errors import AuthenticationError, AuthThrottled, ConfigurationError, TokenRejected
from bastion.gateway.auth import Authenticator, NeedsRead
from bastion.gateway.auth_throttle import AuthThrottle, ThrottlePolicy
from bastion.gateway.sso import single_sign_on
from bastion.identity.jwks import JwksCache
from bastion.identity.jwt import ClaimsMapping, JwtVerifier, TokenPolicy, database_tenants
from bastion.identity.keys import KeyHasher
from bastion.identity.principal import DEFAULT_ACTIONS, OPERATOR, Principal
from bastion.identity.service import IdentityService
from bastion.store.db import Database
from oidc_provider import API_AUDIENCE, OidcProvider

pytestmark = pytest.mark.unit

POLICY = ThrottlePolicy(failures=3, window_s=60.0, backoff_initial_s=30.0, backoff_max_s=60.0)


@pytest.fixture(scope="module")
def running_provider() -> Iterator[OidcProvider]:
    with OidcProvider() as running:
        yield running


@pytest.fixture
def provider(running_provider: OidcProvider) -> OidcProvider:
    running_provider.reset()
    return running_provider


class Harness:
    """A key store with the tenant acme, and an authenticator that also takes the test
    provider's tokens, everything on the provider's clock."""

    def __init__(
        self,
        path: Path,
        provider: OidcProvider,
        *,
        sso: bool = True,
        refresh_interval_s: float = 0.0,
    ) -> None:
        self.provider = provider
        self.clock = provider.clock
        self.db = Database(f"sqlite:///{path}")
        self.db.migrate()
        self.hasher = KeyHasher(b"s" * 32)
        self.events = MemoryEventSink()
        self.service = IdentityService(self.db, self.hasher, MemoryEventSink(), clock=self.clock)
        self.service.create_tenant(OPERATOR, "acme")
        self.keys = JwksCache(
            provider.issuer, clock=self.clock, min_refresh_interval_s=refresh_interval_s
        )
        self.verifier = JwtVerifier(
            TokenPolicy(provider.issuer, API_AUDIENCE),
            ClaimsMapping(),
            self.keys,
            database_tenants(self.db),
            clock=self.clock,
        )
        self.auth = Authenticator(
            self.db,
            self.hasher,
            self.events,
            clock=self.clock,
            tokens=self.verifier if sso else None,
        )
        self.auth.refresh()
        self.queries = 0
        sa.event.listen(self.db.engine, "before_cursor_execute", self._count)

    def _count(self, *args: Any) -> None:
        self.queries += 1

    def close(self) -> None:
        self.keys.close()
        self.db.close()

    def api_key(self) -> str:
        _, token = self.service.create_key(OPERATOR, tenant="acme", role="consumer")
        self.auth.refresh()
        return token

    def sign_in(self, token: str) -> Principal:
        """As the gateway does: from memory on the loop, else in a thread."""

        async def authenticate() -> Principal:
            try:
                return self.auth.authenticate(f"Bearer {token}", may_read=False)
            except NeedsRead:
                return await asyncio.to_thread(self.auth.authenticate, f"Bearer {token}")

        return asyncio.run(authenticate())

    def failure(self, token: str) -> tuple[AuthenticationError, dict[str, Any]]:
        before = len(self.events.events)
        with pytest.raises(AuthenticationError) as info:
            self.sign_in(token)
        assert len(self.events.events) == before + 1
        event = self.events.events[-1]
        assert event.kind == AUTH_FAILED and event.actor is None
        assert token not in repr(event) and token not in str(info.value)
        return info.value, dict(event.detail)


@pytest.fixture
def h(tmp_path: Path, provider: OidcProvider) -> Iterator[Harness]:
    harness = Harness(tmp_path / "bastion.db", provider)
    yield harness
    harness.close()


def test_a_jwt_is_verified_in_a_thread_then_answered_from_memory(h: Harness) -> None:
    token = h.provider.mint()
    with pytest.raises(NeedsRead):
        h.auth.authenticate(f"Bearer {token}", may_read=False)
    threads: list[threading.Thread] = []
    verify = h.verifier.verify

    def recording(token: str) -> Principal:
        threads.append(threading.current_thread())
        return verify(token)

    h.verifier.verify = recording  # type: ignore[method-assign]
    principal = h.sign_in(token)
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    host = h.provider.issuer.removeprefix("http://")
    assert principal.key_id == f"jwt:{host}:alice"
    assert (principal.tenant_name, principal.role) == ("acme", "tenant-admin")
    assert principal.actions == frozenset(DEFAULT_ACTIONS["tenant-admin"])
    # The next request is answered on the loop, from memory: no thread, no query.
    queries = h.queries
    assert h.auth.authenticate(f"Bearer {token}", may_read=False) == principal
    assert len(threads) == 1 and h.queries == queries


def test_api_keys_work_as_before_beside_jwts(h: Harness) -> None:
    key = h.api_key()
    assert h.sign_in(key).role == "consumer"
    assert h.sign_in(h.provider.mint()).key_id.startswith("jwt:")
    # The API key's own length limit holds for what is not a JWT.
    error, detail = h.failure("x" * 300)
    assert detail == {"reason": "malformed"} and not isinstance(error, TokenRejected)


def test_a_jwt_longer_than_an_api_key_header_is_accepted_up_to_the_verifiers_cap(
    h: Harness,
) -> None:
    groups = [f"group-{i:04d}" for i in range(400)]
    long = h.provider.mint(h.provider.claims(groups=groups))
    assert 4_000 < len(long) < 16 * 1024
    assert h.sign_in(long).tenant_name == "acme"
    oversized = h.provider.mint(h.provider.claims(groups=groups * 5))
    assert len(oversized) > 16 * 1024
    _, detail = h.failure(oversized)
    assert detail["reason"] == "malformed"


@pytest.mark.parametrize(
    ("mint", "reason", "signed"),
    [
        (OidcProvider.mint_expired, "expired", True),
        (OidcProvider.mint_wrong_audience, "wrong_audience", True),
        (OidcProvider.mint_wrong_issuer, "wrong_issuer", True),
        (OidcProvider.mint_alg_none, "disallowed_algorithm", False),
        (OidcProvider.mint_hs256_with_public_key, "disallowed_algorithm", False),
        (OidcProvider.mint_unknown_kid, "unknown_kid", False),
        (OidcProvider.mint_foreign_key, "bad_signature", False),
        (lambda p: p.mint(p.claims(bastion_tenant="nowhere")), "unknown_tenant", True),
    ],
)
def test_refused_jwts_are_reported_by_reason_and_never_name_a_key(
    h: Harness, mint: Any, reason: str, signed: bool
) -> None:
    error, detail = h.failure(mint(h.provider))
    assert isinstance(error, TokenRejected)
    assert (error.reason, error.signed, error.key_id) == (reason, signed, None)
    assert detail == {"reason": reason, "credential": "jwt"}
    assert error.headers["www-authenticate"].endswith('error="invalid_token"')


def test_what_only_looks_dotted_is_refused_on_the_loop(h: Harness) -> None:
    # Two dots but no JWT alphabet: malformed, without a thread.
    with pytest.raises(AuthenticationError) as info:
        h.auth.authenticate("Bearer a.b.c!", may_read=False)
    assert not isinstance(info.value, TokenRejected) and info.value.reason == "malformed"


def test_without_single_sign_on_a_jwt_is_just_a_malformed_key(
    tmp_path: Path, provider: OidcProvider
) -> None:
    harness = Harness(tmp_path / "off.db", provider, sso=False)
    try:
        error, detail = harness.failure(provider.mint())
        assert detail == {"reason": "malformed"} and not isinstance(error, TokenRejected)
        assert not harness.auth.may_authenticate(f"Bearer {provider.mint()}")
    finally:
        harness.close()


def test_a_new_revision_drops_the_verified_tokens(h: Harness) -> None:
    token = h.provider.mint()
    h.sign_in(token)
    h.service.disable_tenant(OPERATOR, "acme")
    # Until the refresh, the token is known (the refresh interval is the bound) ...
    assert h.auth.authenticate(f"Bearer {token}", may_read=False).tenant_name == "acme"
    assert h.auth.refresh()
    # ... after it, it is verified again, and its tenant is disabled now.
    with pytest.raises(NeedsRead):
        h.auth.authenticate(f"Bearer {token}", may_read=False)
    error, detail = h.failure(token)
    assert isinstance(error, TokenRejected) and error.signed
    assert detail["reason"] == "tenant_disabled"


def test_a_verification_that_raced_an_invalidation_is_not_kept(h: Harness) -> None:
    token = h.provider.mint()
    lookup = h.verifier._tenants

    def racing(name: str) -> Any:
        found = lookup(name)
        h.auth.invalidate()  # the revision moved while the token was being verified
        return found

    h.verifier._tenants = racing
    assert h.sign_in(token).tenant_name == "acme"
    assert h.verifier.cached(token) is None


def test_may_authenticate_reads_a_jwts_header_against_the_cached_keys(
    tmp_path: Path, provider: OidcProvider
) -> None:
    h = Harness(tmp_path / "kid.db", provider, refresh_interval_s=30.0)
    try:

        def may(token: str) -> bool:
            return h.auth.may_authenticate(f"Bearer {token}")

        # Nothing fetched yet: any allowed algorithm and key id may be the provider's.
        assert may(provider.mint()) and may(provider.mint_unknown_kid())
        h.sign_in(provider.mint())  # the keys are fetched
        fetches = provider.requests["jwks"]
        assert may(provider.mint())
        assert may(provider.mint_expired())  # (its claims are not read here)
        assert not may(provider.mint_unknown_kid())
        for made_up in ("a.b.c", "e30.e30.", "bm90IGpzb24.e30.e30"):
            assert not may(made_up)
        assert not may(provider.mint_alg_none())
        assert not may(provider.mint_hs256_with_public_key())
        assert not may(provider.mint_raw_header(kid=7))
        assert not may(provider.mint_raw_header(crit=["exp"]))
        assert not may("a" * 20_000 + ".b.c")
        assert not h.auth.may_authenticate("Bearer a.b.c!")
        # Once a fetch may be tried again, a key id the provider may have just added may.
        provider.clock.advance(30.0)
        rotated = provider.rotate()
        assert may(provider.mint())
        assert h.sign_in(provider.mint()).tenant_name == "acme"
        assert provider.requests["jwks"] == fetches + 1
        assert may(provider.mint(key=rotated)) and not may(provider.mint_unknown_kid())
    finally:
        h.close()


# ---------------------------------------------------------------------- the throttle


class Throttled:
    def __init__(self, harness: Harness) -> None:
        self.h = harness
        self.throttle = AuthThrottle(POLICY, harness.auth, harness.clock)

    def sign_in(self, token: str, address: str = "192.0.2.7") -> Principal:
        async def check(header: str | None) -> Principal:
            try:
                return self.h.auth.authenticate(header, may_read=False)
            except NeedsRead:
                return await asyncio.to_thread(self.h.auth.authenticate, header)

        return asyncio.run(self.throttle.authenticate(check, f"Bearer {token}", (address, 1)))

    def failures(self, address: str = "192.0.2.7") -> int:
        history = self.throttle.addresses._table.get(address)
        return history.failures if history is not None else 0


def test_forged_jwts_lock_out_their_address_but_not_a_valid_sso_user(h: Harness) -> None:
    t = Throttled(h)
    for _ in range(POLICY.failures):
        with pytest.raises(TokenRejected):
            t.sign_in(h.provider.mint_foreign_key())
    assert t.failures() == POLICY.failures and not t.throttle.keys
    with pytest.raises(AuthThrottled):
        t.sign_in(h.provider.mint_alg_none())
    # A valid token from the locked-out address (a shared NAT) is verified and let in.
    assert t.sign_in(h.provider.mint()).tenant_name == "acme"


def test_a_signed_but_unusable_jwt_keeps_its_401_and_counts_for_nothing(h: Harness) -> None:
    t = Throttled(h)
    for _ in range(POLICY.failures):
        with pytest.raises(TokenRejected):
            t.sign_in(h.provider.mint_unknown_kid())
    counted = t.failures()
    h.service.create_tenant(OPERATOR, "gone")
    h.service.disable_tenant(OPERATOR, "gone")
    for token in (
        h.provider.mint_expired(),
        h.provider.mint_future_nbf(),
        h.provider.mint(h.provider.claims(bastion_tenant="nowhere")),
        h.provider.mint(h.provider.claims(bastion_tenant="gone")),
    ):
        with pytest.raises(TokenRejected) as info:
            t.sign_in(token)
        assert info.value.signed and not isinstance(info.value, AuthThrottled)
    assert t.failures() == counted


def test_a_jwt_signed_for_another_issuer_or_audience_counts_as_a_failure(h: Harness) -> None:
    # The provider's keys sign other applications' tokens too: anyone can have one.
    t = Throttled(h)
    for mint in (h.provider.mint_wrong_audience, h.provider.mint_wrong_issuer):
        with pytest.raises(TokenRejected) as info:
            t.sign_in(mint())
        assert info.value.signed and not isinstance(info.value, AuthThrottled)
    assert t.failures() == 2
    with pytest.raises(TokenRejected):
        t.sign_in(h.provider.mint_wrong_audience())
    # The address is locked out now: the next one is refused 429.
    with pytest.raises(AuthThrottled):
        t.sign_in(h.provider.mint_wrong_issuer())
    assert t.sign_in(h.provider.mint()).tenant_name == "acme"


def test_a_locked_out_address_gets_no_thread_for_a_jwt_that_cannot_verify(
    tmp_path: Path, provider: OidcProvider
) -> None:
    h = Harness(tmp_path / "loop.db", provider, refresh_interval_s=30.0)
    try:
        t = Throttled(h)
        h.sign_in(provider.mint())  # the keys are fetched
        verified: list[str] = []
        verify = h.verifier.verify

        def recording(token: str) -> Principal:
            verified.append(token)
            return verify(token)

        h.verifier.verify = recording  # type: ignore[method-assign]
        for _ in range(POLICY.failures):
            with pytest.raises(TokenRejected):
                t.sign_in(provider.mint_foreign_key())
        checked = len(verified)
        for token in ("a.b.c", provider.mint_unknown_kid(), provider.mint_alg_none()):
            with pytest.raises(AuthThrottled):
                t.sign_in(token)
        # Refused on the loop: no thread, no verification (but counted as failures).
        assert len(verified) == checked
        assert t.failures() == POLICY.failures + 3
        # A valid token from that address is still verified and let in.
        assert t.sign_in(provider.mint()).tenant_name == "acme"
    finally:
        h.close()


# ---------------------------------------------------------------------- the settings


def _settings(tmp_path: Path, **jwt: Any) -> Settings:
    return Settings.load({}, home=tmp_path / "home", **jwt)


def test_single_sign_on_is_built_from_the_settings(tmp_path: Path, provider: OidcProvider) -> None:
    db = Database(f"sqlite:///{tmp_path / 'sso.db'}")
    try:
        assert single_sign_on(_settings(tmp_path), db) is None
        sso = single_sign_on(
            _settings(tmp_path, jwt_issuer=provider.issuer, jwt_audience="api", jwt_jwks_ttl_s=5.0),
            db,
        )
        assert sso is not None and sso.verifier is not None
        assert sso.verifier.policy.audience == "api"
        sso.close()
        # The console's sign-in only: no bearer tokens on the API.
        console = single_sign_on(
            _settings(
                tmp_path,
                jwt_issuer=provider.issuer,
                oidc_client_id="console",
                oidc_redirect_url="https://bastion.example/console/callback",
            ),
            db,
        )
        assert console is not None and console.verifier is None
        console.close()
        with pytest.raises(ConfigurationError, match="tenant pattern"):
            single_sign_on(
                _settings(
                    tmp_path,
                    jwt_issuer=provider.issuer,
                    jwt_audience="api",
                    jwt_tenant_pattern="no-group",
                ),
                db,
            )
        with pytest.raises(ConfigurationError, match="BASTION_JWT_"):
            single_sign_on(
                _settings(tmp_path, jwt_issuer="http://idp.example", jwt_audience="api"), db
            )
        with pytest.raises(ConfigurationError, match="BASTION_JWT_JWKS_TTL_S"):
            single_sign_on(
                _settings(
                    tmp_path, jwt_issuer=provider.issuer, jwt_audience="api", jwt_jwks_ttl_s=0
                ),
                db,
            )
        with pytest.raises(ConfigurationError, match="BASTION_JWT_ISSUER"):
            single_sign_on(_settings(tmp_path, jwt_audience="api"), db)
    finally:
        db.close()
