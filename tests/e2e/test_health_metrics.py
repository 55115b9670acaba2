"""Health needs no credentials; metrics and the OpenAPI document do."""

from __future__ import annotations

import httpx

from bastion_testing import BastionServer, cli_json, run_cli


def test_health_and_readiness_are_open(server: BastionServer) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert httpx.get(server.url + "/v2/health/live").status_code == 200
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


def test_metrics_need_the_metrics_action(server: BastionServer, tenant: str) -> None:
    assert httpx.get(server.url + "/metrics").status_code == 401
    plain = cli_json(server.home, "keys", "create", "--tenant", tenant)["key"]
    with server.client(plain) as client:
        assert client.get("/metrics").status_code == 403
    # Metrics span all tenants, so only admin-role keys may hold the action; a scraper's key
    # holds it alone and can manage nothing.
    refused = run_cli(
        server.home, "keys", "create", "--tenant", tenant, "--action", "metrics", check=False
    )
    assert refused.returncode != 0
    scraper = cli_json(
        server.home,
        "keys",
        "create",
        "--tenant",
        "system",
        "--role",
        "admin",
        "--action",
        "metrics",
    )["key"]
    with server.client(plain) as client:
        client.post("/v1/embeddings", json={"model": "minilm-l6", "input": "x"})
    with server.client(scraper) as client:
        assert client.get("/admin/v1/keys").status_code == 403
        text = client.get("/metrics").text
    assert "bastion_requests_total" in text
    assert 'bastion_model_ready{model="minilm-l6"} 1.0' in text
    assert "bsk_" not in text


def test_openapi_needs_a_key(server: BastionServer, consumer_key: str) -> None:
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    with server.client(consumer_key) as client:
        document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert "/v1/chat/completions" in document["paths"]
    assert "ChatCompletionRequest" in document["components"]["schemas"]
