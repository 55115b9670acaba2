"""The console's sign-in (authorization code + PKCE) and API tokens (client credentials)
against the test provider over HTTP (tests/oidc_provider.py), as a browser and a client
would go through them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from bastion.identity.jwks import JwksCache
from bastion.identity.jwt import ClaimsMapping, JwtVerifier, TokenPolicy, TokenRejected
from bastion.identity.oidc import (
    AuthorizationRequest,
    OidcClient,
    OidcClientConfig,
    code_challenge,
)
from bastion.identity.principal import DEFAULT_ACTIONS
from bastion.identity.records import TenantInfo
from oidc_provider import API_AUDIENCE, Client, OidcProvider

CREATED = datetime(2026, 1, 1, tzinfo=UTC)
TENANTS = {"acme": TenantInfo(7, "acme", False, CREATED, None)}
CALLBACK = "http://127.0.0.1:9/console/callback"  # never contacted: the test reads the redirect
CONSOLE = Client("bastion-console", "console secret/+&=", (CALLBACK,))
PUBLIC = Client("bastion-cli", None, (CALLBACK,))
SERVICE = Client(
    "batch-job", "job secret", claims={"bastion_tenant": "acme", "bastion_role": "consumer"}
)


@pytest.fixture(scope="module")
def running_provider() -> Iterator[OidcProvider]:
    with OidcProvider(clients=[CONSOLE, PUBLIC, SERVICE]) as running:
        yield running


@pytest.fixture
def provider(running_provider: OidcProvider) -> OidcProvider:
    running_provider.reset()
    return running_provider


@pytest.fixture
def keys(provider: OidcProvider) -> Iterator[JwksCache]:
    cache = JwksCache(provider.issuer, clock=provider.clock)
    yield cache
    cache.close()


def console(provider: OidcProvider, keys: JwksCache, client: Client = CONSOLE) -> OidcClient:
    config = OidcClientConfig(
        issuer=provider.issuer,
        client_id=client.client_id,
        client_secret=client.secret,
        redirect_url=CALLBACK,
    )
    return OidcClient(config, keys, ClaimsMapping(), TENANTS.get, clock=provider.clock)


def browse(request: AuthorizationRequest) -> dict[str, str]:
    """What a browser does: follow the URL to the provider, which signs the user in and
    redirects to the callback; the callback's query parameters."""
    answer = httpx.get(request.url, follow_redirects=False)
    assert answer.status_code == 302
    location = answer.headers["location"]
    assert location.startswith(CALLBACK + "?")
    return dict(parse_qsl(urlsplit(location).query))


def refused(client: OidcClient, request: AuthorizationRequest, callback: dict[str, str]) -> str:
    with pytest.raises(TokenRejected) as caught:
        client.finish(request, callback)
    shown = f"{caught.value} {caught.value.args!r}"
    assert not any(len(v) > 8 and v in shown for v in callback.values())
    assert caught.value.reason is not None
    return caught.value.reason


def test_the_authorization_url_asks_for_a_code_with_pkce(
    provider: OidcProvider, keys: JwksCache
) -> None:
    request = console(provider, keys).start()
    parts = urlsplit(request.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{provider.issuer}/authorize"
    query = dict(parse_qsl(parts.query))
    assert query == {
        "response_type": "code",
        "client_id": "bastion-console",
        "redirect_uri": CALLBACK,
        "scope": "openid",
        "state": request.state,
        "nonce": request.nonce,
        "code_challenge": code_challenge(request.code_verifier),
        "code_challenge_method": "S256",
    }
    assert 43 <= len(request.code_verifier) <= 128
    assert request.code_verifier not in request.url
    # Its secrets stay out of logs.
    assert request.state not in repr(request) and request.code_verifier not in repr(request)
    other = console(provider, keys).start()
    assert {other.state, other.nonce, other.code_verifier}.isdisjoint(
        {request.state, request.nonce, request.code_verifier}
    )


def test_rfc_7636_s256_example() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


@pytest.mark.parametrize("client", [CONSOLE, PUBLIC], ids=["client_secret_basic", "public"])
def test_a_full_sign_in_gives_the_users_principal(
    provider: OidcProvider, keys: JwksCache, client: Client
) -> None:
    rp = console(provider, keys, client)
    request = rp.start()
    principal = rp.finish(request, browse(request))
    assert principal.key_id == f"jwt:{urlsplit(provider.issuer).netloc}:alice"
    assert (principal.tenant_name, principal.role) == ("acme", "tenant-admin")
    assert principal.actions == frozenset(DEFAULT_ACTIONS["tenant-admin"])
    assert provider.requests == {"discovery": 1, "authorize": 1, "token": 1, "jwks": 1}


def test_a_wrong_state_is_refused_before_the_code_is_redeemed(
    provider: OidcProvider, keys: JwksCache
) -> None:
    rp = console(provider, keys)
    request, other = rp.start(), rp.start()
    callback = browse(request)
    assert refused(rp, other, callback) == "wrong_state"
    assert refused(rp, request, {**callback, "state": ""}) == "wrong_state"
    assert refused(rp, request, {"code": callback["code"]}) == "wrong_state"
    assert provider.requests["token"] == 0
    assert rp.finish(request, callback).tenant_name == "acme"


def test_a_wrong_verifier_is_refused_at_the_token_endpoint(
    provider: OidcProvider, keys: JwksCache
) -> None:
    rp = console(provider, keys)
    request = rp.start()
    callback = browse(request)
    forged = dataclasses.replace(request, code_verifier=rp.start().code_verifier)
    assert refused(rp, forged, callback) == "token_endpoint"
    assert provider.requests["token"] == 1
    # The code was spent by that attempt: it cannot be redeemed again.
    assert refused(rp, request, callback) == "token_endpoint"


def test_a_code_is_redeemed_once(provider: OidcProvider, keys: JwksCache) -> None:
    rp = console(provider, keys)
    request = rp.start()
    callback = browse(request)
    rp.finish(request, callback)
    assert refused(rp, request, callback) == "token_endpoint"


def test_a_nonce_mismatch_is_refused(provider: OidcProvider, keys: JwksCache) -> None:
    rp = console(provider, keys)
    provider.nonce_override = rp.start().nonce  # an ID token minted for another sign-in
    request = rp.start()
    assert refused(rp, request, browse(request)) == "wrong_nonce"


def test_a_wrong_client_secret_is_refused(provider: OidcProvider, keys: JwksCache) -> None:
    rp = console(provider, keys, dataclasses.replace(CONSOLE, secret="guess"))
    request = rp.start()
    assert refused(rp, request, browse(request)) == "token_endpoint"


def test_callbacks_that_must_not_sign_anyone_in(provider: OidcProvider, keys: JwksCache) -> None:
    rp = console(provider, keys)
    request = rp.start()
    callback = browse(request)
    assert refused(rp, request, {**callback, "error": "access_denied"}) == "provider_error"
    assert refused(rp, request, {**callback, "iss": "https://evil.example"}) == "wrong_issuer"
    assert refused(rp, request, {**callback, "code": ""}) == "malformed"
    provider.clock.advance(601)
    assert refused(rp, request, callback) == "sign_in_expired"
    assert provider.requests["token"] == 0


def test_an_id_token_is_checked_like_a_bearer_token(
    provider: OidcProvider, keys: JwksCache
) -> None:
    rp = console(provider, keys)
    provider.user["bastion_role"] = "nobody"
    request = rp.start()
    assert refused(rp, request, browse(request)) == "no_role"


def test_an_id_token_is_not_an_api_token(provider: OidcProvider, keys: JwksCache) -> None:
    """A console's ID token (aud = its client id) does not open the API."""
    verifier = JwtVerifier(
        TokenPolicy(provider.issuer, API_AUDIENCE),
        ClaimsMapping(),
        keys,
        TENANTS.get,
        clock=provider.clock,
    )
    id_token = provider.mint(provider.claims(aud=CONSOLE.client_id, nonce="n"))
    with pytest.raises(TokenRejected) as caught:
        verifier.verify(id_token)
    assert caught.value.reason == "wrong_audience"


def test_client_credentials_tokens_open_the_api(provider: OidcProvider, keys: JwksCache) -> None:
    answer = httpx.post(
        f"{provider.issuer}/token",
        data={"grant_type": "client_credentials"},
        auth=(SERVICE.client_id, SERVICE.secret or ""),
    )
    assert answer.status_code == 200
    token = answer.json()["access_token"]
    verifier = JwtVerifier(
        TokenPolicy(provider.issuer, API_AUDIENCE),
        ClaimsMapping(),
        keys,
        TENANTS.get,
        clock=provider.clock,
    )
    principal = verifier.verify(token)
    assert principal.key_id == f"jwt:{urlsplit(provider.issuer).netloc}:batch-job"
    assert (principal.tenant_name, principal.role) == ("acme", "consumer")
    principal.require_action("embeddings")
    assert verifier.cached(token) is principal
