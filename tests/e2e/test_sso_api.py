"""JWT bearer tokens from an OpenID Connect provider against a real server: the `openai`
SDK with a token as its key, roles on the admin API, refused tokens (401 in the API's
error shape, never logged), key rotation at the provider while the server runs, a
disabled tenant, per-user quotas, and the audit trail naming the SSO user.

The provider is tests/oidc_provider.py, serving on loopback in this process, on the wall
clock (the server's).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from bastion.wire import bhttp
from bastion_testing import (
    BastionServer,
    add_echo_model,
    ohttp_config,
    post_sealed,
    run_cli,
    seal_request,
)
from oidc_provider import API_AUDIENCE, ManualClock, OidcProvider

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}
# The provider's keys are fetched again after this long (and a token naming an unknown key
# id triggers a fetch at most this often): rotation shows within seconds.
JWKS_TTL_S = 1.0


class WallClock(ManualClock):
    """The provider's clock, following the wall clock as the server's does."""

    def __call__(self) -> float:
        return time.time()


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    with OidcProvider(clock=WallClock()) as running:
        yield running


@pytest.fixture(scope="module")
def server(
    provider: OidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("sso") / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    srv = BastionServer(
        home,
        env={
            "BASTION_JWT_ISSUER": provider.issuer,
            "BASTION_JWT_AUDIENCE": API_AUDIENCE,
            "BASTION_JWT_JWKS_TTL_S": str(JWKS_TTL_S),
        },
    )
    try:
        srv.wait_ready(["echo"])
        with srv.client() as admin:
            for name in ("acme", "globex"):
                assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
        yield srv
    finally:
        srv.stop()


Mint = Callable[..., str]


@pytest.fixture(scope="module")
def minted() -> list[str]:
    """Every token the tests made: none may ever show in the server's logs."""
    return []


@pytest.fixture
def token(provider: OidcProvider, minted: list[str]) -> Mint:
    def mint(
        sub: str = "alice", tenant: str = "acme", role: str = "consumer", **claims: Any
    ) -> str:
        made = provider.mint(
            provider.claims(sub=sub, bastion_tenant=tenant, bastion_role=role, **claims)
        )
        minted.append(made)
        return made

    return mint


def _actor(provider: OidcProvider, sub: str) -> str:
    return f"jwt:{provider.issuer.removeprefix('http://')}:{sub}"


def _client(server: BastionServer, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"authorization": f"Bearer {token}"}, timeout=60
    )


def _status_within(
    server: BastionServer, token: str, want: int, seconds: float = 10.0
) -> httpx.Response:
    """Poll a chat completion until its status is `want` (or `seconds` pass)."""
    deadline = time.monotonic() + seconds
    with _client(server, token) as client:
        while True:
            answer = client.post("/v1/chat/completions", json=CHAT)
            if answer.status_code == want or time.monotonic() > deadline:
                return answer
            time.sleep(0.1)


def _refused(answer: httpx.Response) -> dict[str, Any]:
    """The error of a 401 for a refused bearer token, in the API's error shape."""
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"] == 'Bearer realm="bastion", error="invalid_token"'
    error: dict[str, Any] = answer.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_token")
    return error


def _no_token_in_logs(server: BastionServer, tokens: list[str]) -> None:
    logs = server.logs()
    for made in tokens:
        # Neither the token nor its signature (what a log cut short could keep).
        signature = made.rpartition(".")[2]
        assert made not in logs
        assert not signature or signature not in logs


def test_the_openai_sdk_chats_and_lists_models_with_a_jwt(
    server: BastionServer, token: Mint, minted: list[str]
) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=token(), max_retries=0)
    reply = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello there"}]
    )
    assert reply.choices[0].message.content == "hello there"
    assert "echo" in {m.id for m in client.models.list()}
    # The same token again: answered from the verified-token cache.
    assert client.chat.completions.create(**CHAT).choices  # type: ignore[call-overload]
    _no_token_in_logs(server, minted)


def test_an_encrypted_request_takes_a_jwt_as_its_outer_credential(
    server: BastionServer, token: Mint
) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b c"}]}
    data, context = seal_request(ohttp_config(server), body)
    response = post_sealed(server, token(sub="sealer"), data)
    assert response.status_code == 200
    answer = bhttp.decode_response(context.open(response.content))
    assert answer.status == 200
    assert json.loads(answer.content)["choices"][0]["message"]["content"] == "a b c"


def test_roles_reach_as_far_as_a_keys_would(
    server: BastionServer, provider: OidcProvider, token: Mint
) -> None:
    with _client(server, token(role="consumer")) as consumer:
        assert consumer.get("/admin/v1/tenants").status_code == 403
        assert consumer.get("/metrics").status_code == 403
    with _client(server, token(sub="lead", tenant="globex", role="tenant-admin")) as lead:
        tenants = lead.get("/admin/v1/tenants")
        assert tenants.status_code == 200
        assert [t["name"] for t in tenants.json()["data"]] == ["globex"]
        assert lead.post("/admin/v1/tenants", json={"name": "mine"}).status_code == 403
        assert lead.get("/admin/v1/keys", params={"tenant": "acme"}).status_code == 404
        assert lead.get("/metrics").status_code == 403
    with _client(server, token(sub="ops", role="admin")) as ops:
        assert ops.get("/metrics").status_code == 200


def test_an_admin_token_creates_a_tenant_and_the_audit_log_names_its_user(
    server: BastionServer, provider: OidcProvider, token: Mint, minted: list[str]
) -> None:
    with _client(server, token(sub="root-user", role="admin")) as ops:
        created = ops.post("/admin/v1/tenants", json={"name": "made-by-sso"})
        assert created.status_code == 201, created.text
    actor = _actor(provider, "root-user")
    # The server writes its audit records from a thread: wait for this one.
    deadline = time.monotonic() + 20
    while True:
        exported = run_cli(server.home, "audit", "export").stdout
        entries = [json.loads(line) for line in exported.splitlines()]
        made = [e for e in entries if e["action"] == "tenant.created" and e["actor"] == actor]
        if made or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert made and made[0]["tenant"] == "made-by-sso"
    for each in minted:
        assert each not in exported
    _no_token_in_logs(server, minted)


@pytest.mark.parametrize(
    ("name", "mint"),
    [
        ("expired", OidcProvider.mint_expired),
        ("wrong audience", OidcProvider.mint_wrong_audience),
        ("wrong issuer", OidcProvider.mint_wrong_issuer),
        ("alg none", OidcProvider.mint_alg_none),
        ("HS256 keyed with the public key", OidcProvider.mint_hs256_with_public_key),
        ("unknown kid", OidcProvider.mint_unknown_kid),
        ("signed by another key", OidcProvider.mint_foreign_key),
    ],
)
def test_bad_tokens_get_401_in_the_apis_error_format(
    server: BastionServer,
    provider: OidcProvider,
    minted: list[str],
    name: str,
    mint: Callable[[OidcProvider], str],
) -> None:
    bad = mint(provider)
    minted.append(bad)
    with _client(server, bad) as client:
        error = _refused(client.post("/v1/chat/completions", json=CHAT))
        assert bad not in json.dumps(error)
        _refused(client.get("/v1/models"))
        _refused(client.get("/admin/v1/tenants"))
    _no_token_in_logs(server, minted)


def test_only_a_token_the_provider_signed_says_why_it_fails(
    server: BastionServer, provider: OidcProvider
) -> None:
    with _client(server, provider.mint_expired()) as client:
        assert "expired" in _refused(client.get("/v1/models"))["message"]
    with _client(server, provider.mint_foreign_key()) as client:
        assert _refused(client.get("/v1/models"))["message"] == "Invalid or missing bearer token."


def test_key_rotation_at_the_provider_while_the_server_runs(
    server: BastionServer, provider: OidcProvider, token: Mint
) -> None:
    old = provider.signing
    before = token(sub="rotator")
    assert _status_within(server, before, 200).status_code == 200
    new = provider.rotate()
    after = token(sub="rotator")
    assert after != before
    # A token of the new key: accepted once the server has fetched the keys again.
    assert _status_within(server, after, 200).status_code == 200
    provider.retire(old.kid)
    # A new token of the withdrawn key: refused once the cached keys have expired.
    stale = provider.mint(provider.claims(sub="rotator", bastion_role="consumer"), key=old)
    refused = _status_within(server, stale, 401, seconds=5 * JWKS_TTL_S + 5)
    _refused(refused)
    # And the token of the withdrawn key that was verified before is dropped too.
    _refused(_status_within(server, before, 401, seconds=5 * JWKS_TTL_S + 5))
    assert _status_within(server, after, 200).status_code == 200
    assert provider.signing is new


def test_a_disabled_tenants_token_is_refused(server: BastionServer, token: Mint) -> None:
    with server.client() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": "leavers"}).status_code == 201
    leaver = token(sub="leaver", tenant="leavers")
    assert _status_within(server, leaver, 200).status_code == 200
    with server.client() as admin:
        assert admin.post("/admin/v1/tenants/leavers/disable").status_code == 200
    # The token was verified and cached: the new revision drops it within the refresh.
    error = _refused(_status_within(server, leaver, 401))
    assert "disabled" in error["message"]
    # A token for a tenant Bastion does not have is refused the same way.
    _refused(_status_within(server, token(tenant="nowhere"), 401, seconds=0))


def test_each_sso_user_has_a_quota_of_its_own(
    server: BastionServer, provider: OidcProvider, token: Mint
) -> None:
    user = _actor(provider, "metered")
    with server.client() as admin:
        set_quota = admin.put(f"/admin/v1/quotas/keys/{user}", json={"requests_per_minute": 1})
        assert set_quota.status_code == 200, set_quota.text
    with _client(server, token(sub="metered")) as metered:
        assert metered.post("/v1/chat/completions", json=CHAT).status_code == 200
        limited = metered.post("/v1/chat/completions", json=CHAT)
        assert limited.status_code == 429
        assert limited.headers["x-ratelimit-limit-requests"] == "1"
    # Another user of the same tenant is not held back by it.
    with _client(server, token(sub="unmetered")) as other:
        assert other.post("/v1/chat/completions", json=CHAT).status_code == 200
    with server.client() as admin:
        assert admin.delete(f"/admin/v1/quotas/keys/{user}").status_code == 204


def test_api_keys_keep_working_beside_sso(server: BastionServer) -> None:
    with server.client() as admin:
        key = admin.post("/admin/v1/keys", json={"tenant": "acme"}).json()["key"]
    with server.client(key) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        # A header longer than a key but not a JWT is still malformed (a key's 401).
        client.headers["authorization"] = "Bearer " + "a" * 300
        refused = client.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_no_token_ever_reached_the_logs(server: BastionServer, minted: list[str]) -> None:
    assert len(minted) > 10
    _no_token_in_logs(server, minted)
