"""Schemathesis against a live server, from its own /openapi.json: whatever a client sends
that the document allows (and much that it does not), the answer is never a 5xx.

The server is one of its own (requests here create tenants and keys, revoke them, change
quotas), with the echo model. Each operation gets a bounded number of generated cases,
with an admin key, a consumer key, and no key; the run is reproducible (derandomized).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from bastion.api.openapi import openapi_document
from bastion_testing import BastionServer, add_echo_model, run_cli

# Cases per operation (and per key); the suite's time, not a limit of the tool.
EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("schemathesis") / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    server = BastionServer(home, env={"BASTION_REQUEST_TIMEOUT_S": "5"})
    try:
        server.wait_ready(["echo"])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keys(fuzzed: BastionServer) -> dict[str, str]:
    with fuzzed.client() as admin:
        admin.post("/admin/v1/tenants", json={"name": "fuzz"})
        consumer = admin.post("/admin/v1/keys", json={"tenant": "fuzz"}).json()["key"]
    return {"admin": fuzzed.admin_key, "consumer": consumer, "none": ""}


@schemathesis.serializer("message/ohttp-req", "message/ohttp-chunked-req")
def _encapsulated(ctx: Any, value: Any) -> bytes:
    """Generated "encapsulated requests" are the bytes drawn for the binary body."""
    return value if isinstance(value, bytes) else str(value).encode()


# The document the server serves at /openapi.json (checked equal below), built in process
# so that the cases can be generated before the server starts.
schema = schemathesis.openapi.from_dict(openapi_document())
# Valid requests, and ones that break the document on purpose (wrong types, missing fields,
# out-of-range values, odd path and query parameters): both must get 2xx-4xx.
schema.config.generation.update(
    modes=list(schemathesis.GenerationMode), allow_x00=True, codec="utf-8"
)


def test_the_server_serves_this_document(fuzzed: BastionServer) -> None:
    served = httpx.get(
        f"{fuzzed.url}/openapi.json", headers={"authorization": f"Bearer {fuzzed.admin_key}"}
    )
    assert served.json() == openapi_document()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_server_error(
    case: Any, fuzzed: BastionServer, keys: dict[str, str]
) -> None:
    # The same case with an admin key, a tenant's consumer key, and none at all.
    for key in keys.values():
        headers = {"authorization": f"Bearer {key}"} if key else {}
        case.call_and_validate(
            base_url=fuzzed.url, headers=headers, checks=[not_a_server_error], timeout=30
        )
