"""The throttle of failed authentication against a real server: an address that keeps
failing, and a key id whose secret is being guessed, get 429 with Retry-After, while the
real key's holder keeps working through the `openai` SDK.

The clients connect from addresses of their own in 127.0.0.0/8 (all loopback on Linux),
so each test's attacker has an address, or several, to itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from bastion.crypto import ohttp
from bastion.errors import AuthThrottled
from bastion.identity.keys import generate_api_key
from bastion.wire import bhttp
from bastion_testing import BastionServer, add_echo_model, ohttp_config, run_cli, seal_request

FAILURES = 3
# Long enough that no lock-out ends while a test runs, however slow the machine.
BACKOFF_INITIAL_S = 30
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture(scope="module")
def throttled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("auth-throttle") / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    server = BastionServer(
        home,
        env={
            "BASTION_AUTH_THROTTLE_FAILURES": str(FAILURES),
            "BASTION_AUTH_THROTTLE_WINDOW_S": "60",
            "BASTION_AUTH_THROTTLE_BACKOFF_INITIAL_S": str(BACKOFF_INITIAL_S),
            "BASTION_AUTH_THROTTLE_BACKOFF_MAX_S": "600",
        },
    )
    try:
        server.wait_ready(["echo"])
        yield server
    finally:
        server.stop()


def _new_key(server: BastionServer, tenant: str) -> str:
    with server.client() as admin:
        admin.post("/admin/v1/tenants", json={"name": tenant})
        created = admin.post("/admin/v1/keys", json={"tenant": tenant})
        assert created.status_code == 201
        key: str = created.json()["key"]
    return key


def _from(server: BastionServer, address: str, key: str | None = None) -> httpx.Client:
    """A client whose connections come from `address`."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(
        base_url=server.url,
        headers=headers,
        timeout=60,
        transport=httpx.HTTPTransport(local_address=address),
    )


def _sdk(server: BastionServer, key: str, address: str = "127.0.0.1") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1",
        api_key=key,
        max_retries=0,
        http_client=httpx.Client(transport=httpx.HTTPTransport(local_address=address)),
    )


def _made_up() -> dict[str, str]:
    return {"authorization": f"Bearer {generate_api_key().token}"}


def _assert_throttled(response: httpx.Response, *, oip: bool = False) -> None:
    assert response.status_code == 429, response.text
    retry_after = int(response.headers["retry-after"])
    assert BACKOFF_INITIAL_S <= retry_after <= 600
    body = response.json()
    if oip:
        assert body == {"error": AuthThrottled().message}
    else:
        assert body["error"]["code"] == "auth_throttled"
        assert body["error"]["type"] == "rate_limit_error"
        assert body["error"]["param"] is None


def _events(server: BastionServer, kind: str) -> list[dict[str, Any]]:
    found = []
    for line in server.logs().splitlines():
        if kind not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == kind:
            found.append(record)
    return found


def _lockouts(server: BastionServer, scope: str) -> float:
    with server.client() as admin:
        text = admin.get("/metrics").text
    match = re.search(rf'^bastion_auth_throttled_total\{{scope="{scope}"\}} (\S+)$', text, re.M)
    assert match is not None
    return float(match.group(1))


def test_an_address_that_keeps_failing_is_refused_but_its_valid_keys_are_not(
    throttled: BastionServer,
) -> None:
    server = throttled
    key = _new_key(server, "neighbours")
    address = "127.0.0.5"
    with _from(server, address) as attacker:
        for _ in range(FAILURES):
            response = attacker.post("/v1/chat/completions", json=CHAT, headers=_made_up())
            assert response.status_code == 401
        # From now on, every route that authenticates refuses this address's failures, on
        # the fast path and through the router alike, each in its API's error shape.
        _assert_throttled(attacker.post("/v1/chat/completions", json=CHAT, headers=_made_up()))
        _assert_throttled(attacker.post("/v1/chat/completions", json=CHAT))
        _assert_throttled(attacker.get("/v1/models", headers=_made_up()))
        _assert_throttled(attacker.get("/admin/v1/tenants", headers=_made_up()))
        _assert_throttled(attacker.get("/v2/models/echo", headers=_made_up()), oip=True)
        _assert_throttled(
            attacker.post("/v2/models/echo/infer", json={"inputs": []}, headers=_made_up()),
            oip=True,
        )
        # An encrypted request is throttled by its outer connection's address.
        data, _ = seal_request(ohttp_config(server), CHAT)
        sealed_headers = {"bastion-model": "echo", "content-type": ohttp.REQUEST_MEDIA_TYPE}
        _assert_throttled(
            attacker.post("/v1/ohttp", content=data, headers={**sealed_headers, **_made_up()})
        )
        # A real key id with a wrong secret is checked, and refused all the same.
        wrong = f"bsk_{key.split('_')[1]}_{generate_api_key().secret}"
        _assert_throttled(
            attacker.post(
                "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {wrong}"}
            )
        )
        # A valid key from the same address (a neighbour behind the same NAT) still works:
        # through the SDK, and encrypted.
        with _sdk(server, key, address) as client:
            reply = client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "still here"}]
            )
        assert reply.choices[0].message.content == "still here"
        data, context = seal_request(ohttp_config(server), CHAT)
        sealed = attacker.post(
            "/v1/ohttp",
            content=data,
            headers={**sealed_headers, "authorization": f"Bearer {key}"},
        )
        assert sealed.status_code == 200
        assert bhttp.decode_response(context.open(sealed.content)).status == 200
    # Another address is not concerned.
    with _from(server, "127.0.0.6") as other:
        response = other.post("/v1/chat/completions", json=CHAT, headers=_made_up())
        assert response.status_code == 401
    (event,) = [e for e in _events(server, "auth.throttled") if e["target"] == address]
    assert event["detail"]["scope"] == "address"
    assert event["detail"]["failures"] == FAILURES
    assert event["detail"]["retry_after_s"] == BACKOFF_INITIAL_S
    assert _lockouts(server, "address") >= 1


def test_a_key_id_under_attack_refuses_guesses_but_not_its_holder(
    throttled: BastionServer,
) -> None:
    server = throttled
    key = _new_key(server, "victims")
    key_id = key.split("_")[1]
    bystander_id = _new_key(server, "bystanders").split("_")[1]

    def guess(public_id: str = key_id) -> dict[str, str]:
        return {"authorization": f"Bearer bsk_{public_id}_{generate_api_key().secret}"}

    # A guesser spread over addresses, each failing fewer times than an address may.
    attackers = [f"127.0.0.{20 + n}" for n in range(FAILURES + 3)]
    for address in attackers[:FAILURES]:
        with _from(server, address) as attacker:
            response = attacker.post("/v1/chat/completions", json=CHAT, headers=guess())
            assert response.status_code == 401
    answers = []
    for address in attackers[FAILURES:]:
        with _from(server, address) as attacker:
            response = attacker.post("/v1/chat/completions", json=CHAT, headers=guess())
            _assert_throttled(response)
            answers.append(response.json())
    # The same answer to every wrong secret, and the same as an address's lock-out.
    assert all(a == answers[0] for a in answers)
    # The key's holder is never refused: from its own address, and from an attacker's.
    for address in ("127.0.0.1", attackers[0], attackers[-1]):
        with _sdk(server, key, address) as client:
            reply = client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "mine"}]
            )
        assert reply.choices[0].message.content == "mine"
    with _sdk(server, key) as client:
        assert [m.id for m in client.models.list()] == ["echo"]
    # Only that key id is locked out.
    with _from(server, "127.0.0.40") as other:
        response = other.post("/v1/chat/completions", json=CHAT, headers=guess(bystander_id))
        assert response.status_code == 401
    (event,) = [e for e in _events(server, "auth.throttled") if e["actor"] == key_id]
    assert event["detail"] == {
        "scope": "key",
        "failures": FAILURES,
        "retry_after_s": BACKOFF_INITIAL_S,
    }
    assert key.split("_")[-1] not in server.logs()
    assert _lockouts(server, "key") >= 1
