"""A real `bastion serve` alerting a webhook receiver on loopback: a burst of wrong API keys
makes one signed alert, benign traffic none, and /metrics counts both."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from alert_receiver import AlertReceiver
from bastion.audit.webhooks import verify_signature
from bastion_testing import BastionServer, cli_json, run_cli

SECRET = "e2e-webhook-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def receiver() -> Iterator[AlertReceiver]:
    found = AlertReceiver()
    yield found
    found.close()


@pytest.fixture(scope="module")
def alerting(
    tmp_path_factory: pytest.TempPathFactory, receiver: AlertReceiver
) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("alerts") / "home"
    run_cli(home, "init", "--no-demo-models")
    secret_file = home.parent / "webhook-secret"
    secret_file.write_text(SECRET + "\n")
    server = BastionServer(
        home,
        "--no-demo-models",
        env={
            "BASTION_ALERT_WEBHOOK_URL": receiver.url,
            "BASTION_ALERT_WEBHOOK_SECRET_FILE": str(secret_file),
            # The default throttle of failed sign-ins (the test suite turns it off).
            "BASTION_AUTH_THROTTLE_FAILURES": "10",
        },
    )
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()


def metric(server: BastionServer, name: str, **labels: str) -> float:
    with server.client() as client:
        text = client.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[1] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match[2])
    return total


def test_benign_traffic_fires_nothing(alerting: BastionServer, receiver: AlertReceiver) -> None:
    tenant = cli_json(alerting.home, "tenants", "create", "benign")["name"]
    key = cli_json(alerting.home, "keys", "create", "--tenant", tenant)["key"]
    time.sleep(1.5)  # the server reloads keys within its refresh interval (0.5 s here)
    with alerting.client(key) as client:
        for _ in range(20):
            assert client.get("/v1/models").status_code == 200
    with alerting.client() as admin:
        for _ in range(5):
            assert admin.get("/admin/v1/models").status_code == 200
    # A typo or two, and a key without the admin action asking for admin routes, once.
    wrong = key[:-1] + ("a" if key[-1] != "a" else "b")
    for _ in range(2):
        assert httpx.get(alerting.url + "/v1/models", headers=bearer(wrong)).status_code == 401
    assert httpx.get(alerting.url + "/admin/v1/models", headers=bearer(key)).status_code == 403
    time.sleep(1.0)
    assert receiver.deliveries == []
    assert metric(alerting, "bastion_alerts_fired_total") == 0
    # Every default rule's series is there from the start, at zero.
    assert 'rule="auth_failures_per_key"' in admin_metrics(alerting)


def test_a_burst_of_wrong_keys_sends_signed_alerts(
    alerting: BastionServer, receiver: AlertReceiver
) -> None:
    tenant = cli_json(alerting.home, "tenants", "create", "victim")["name"]
    key = cli_json(alerting.home, "keys", "create", "--tenant", tenant)["key"]
    key_id = key.split("_")[1]
    time.sleep(1.5)
    already = len(receiver.deliveries)
    # Someone holding the key id (it is in logs and events) guesses secrets.
    guesses = [key[:-1] + c for c in "abcdefghijklmnopqrstuvwxyz234567" if c != key[-1]]
    answers = [
        httpx.get(alerting.url + "/v1/models", headers=bearer(guess)).status_code
        for guess in guesses[:15]
    ]
    # The throttle of failed sign-ins turns 401 into 429 once the address is locked out.
    assert set(answers) == {401, 429}

    # Three alerts: the key id's failures, and the lock-outs of the address they came from
    # and of the key id.
    deliveries = receiver.wait(already + 3)[already:]
    for delivery in deliveries:
        header = delivery.headers["bastion-signature"]
        # Checked by Bastion's helper, and by the few lines any receiver can write.
        verify_signature(SECRET, header, delivery.body)
        parts = dict(item.split("=", 1) for item in header.split(","))
        expected = hmac.new(
            SECRET.encode(), parts["t"].encode() + b"." + delivery.body, hashlib.sha256
        ).hexdigest()
        assert hmac.compare_digest(expected, parts["v1"])
        assert abs(time.time() - int(parts["t"])) < 60
    alerts = {json.loads(d.body)["rule"]: d for d in deliveries}
    assert set(alerts) == {
        "auth_failures_per_key",
        "auth_failures_per_address",
        "auth_key_locked_out",
    }
    assert json.loads(alerts["auth_failures_per_address"].body)["group"] == {"target": "127.0.0.1"}
    assert json.loads(alerts["auth_key_locked_out"].body)["group"] == {"actor": key_id}

    delivery = alerts["auth_failures_per_key"]
    body = json.loads(delivery.body)
    assert body["rule"] == "auth_failures_per_key"
    assert body["severity"] == "warning"
    assert body["group"] == {"actor": key_id}
    assert body["count"] >= 10 and body["threshold"] == 10
    assert body["event"]["kind"] == "auth.failed"
    assert body["event"]["detail"]["reason"] == "bad_secret"
    assert delivery.headers["bastion-alert-id"] == body["id"]
    # Metadata only: no secret of the key, the guesses or the webhook travels.
    raw = delivery.body.decode()
    assert key.split("_")[2][:20] not in raw and SECRET not in raw and "bsk_" not in raw

    # The burst went on past the threshold: held back, not one alert per failure.
    time.sleep(1.0)
    assert len(receiver.deliveries) == already + 3
    assert metric(alerting, "bastion_alerts_fired_total", rule="auth_failures_per_key") == 1
    assert metric(alerting, "bastion_alerts_fired_total", rule="auth_failures_per_address") == 1
    assert metric(alerting, "bastion_alerts_fired_total", rule="auth_key_locked_out") == 1
    assert metric(alerting, "bastion_alerts_fired_total", rule="auth_failures_burst") == 0
    assert metric(alerting, "bastion_alert_deliveries_total", outcome="delivered") == 3
    assert metric(alerting, "bastion_alert_deliveries_total", outcome="dead_letter") == 0
    assert metric(alerting, "bastion_alert_dead_letters") == 0
    assert '"alert":"auth_failures_per_key"' in alerting.logs()


def test_a_tenant_admin_reaching_into_another_tenant_gets_404s_and_raises_an_alert(
    alerting: BastionServer, receiver: AlertReceiver
) -> None:
    already = len(receiver.deliveries)
    with alerting.client() as admin:
        for name in ("team-a", "team-b"):
            assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
        made = admin.post("/admin/v1/keys", json={"tenant": "team-a", "role": "tenant-admin"})
        ta_id, ta_key = made.json()["id"], made.json()["key"]
        team_b_key = admin.post("/admin/v1/keys", json={"tenant": "team-b"}).json()["id"]
    # Each reach into team-b, and the same for a tenant and a key id that do not exist.
    reaches: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/admin/v1/keys", {"params": {"tenant": "team-b"}}),
        ("POST", "/admin/v1/keys", {"json": {"tenant": "team-b"}}),
        ("POST", f"/admin/v1/keys/{team_b_key}/revoke", {}),
        ("POST", f"/admin/v1/keys/{team_b_key}/rotate", {}),
        ("GET", "/admin/v1/quotas", {"params": {"tenant": "team-b"}}),
        ("GET", "/admin/v1/quotas/tenants/team-b", {}),
        ("GET", f"/admin/v1/quotas/keys/{team_b_key}", {}),
        ("GET", "/admin/v1/audit/records", {"params": {"tenant": "team-b"}}),
        ("GET", "/admin/v1/usage", {"params": {"tenant": "team-b"}}),
    ]

    def missing(value: Any) -> Any:
        text = json.dumps(value).replace("team-b", "team-zz")
        return json.loads(text.replace(team_b_key, "0123456789abcdef"))

    with alerting.client(ta_key) as tenant_admin:
        for method, path, options in reaches:
            other = tenant_admin.request(method, path, **options)
            nobody = tenant_admin.request(method, missing(path), **missing(options))
            # The same answer as for what does not exist: no probing of names or ids.
            assert other.status_code == nobody.status_code == 404, (method, path, other.text)
            assert other.json() == nobody.json()
            assert other.headers.get("content-length") == nobody.headers.get("content-length")
        # Its own tenant's audit records show its refusals, and not which target exists.
        own = tenant_admin.get("/admin/v1/audit/records", params={"limit": 1000})
        assert own.status_code == 200
    denied = [r for r in own.json()["data"] if r["action"] == "auth.denied" and r["actor"] == ta_id]
    assert len(denied) == 2 * len(reaches)
    for first, second in zip(denied[::2], denied[1::2], strict=True):
        assert (first["target"], first["detail"]) == (second["target"], second["detail"])
    assert team_b_key not in own.text and "team-b" not in own.text

    # In the audit log, as an auditor exports it.
    exported = [
        json.loads(line) for line in run_cli(alerting.home, "audit", "export").stdout.splitlines()
    ]
    records = [e for e in exported if e["action"] == "auth.denied" and e["actor"] == ta_id]
    assert len(records) == 2 * len(reaches)
    for record in records:
        assert record["tenant"] == "team-a" and record["outcome"] == "failure"
        assert record["detail"]["action"] == "admin"
        assert record["detail"]["reason"] == "cross_tenant"

    # And the escalation alert fires, once, for that key.
    deadline = time.monotonic() + 10
    fired: list[dict[str, Any]] = []
    while not fired:
        assert time.monotonic() < deadline, "no access_denied_repeated alert"
        bodies = [json.loads(d.body) for d in receiver.deliveries[already:]]
        fired = [b for b in bodies if b["rule"] == "access_denied_repeated"]
        time.sleep(0.1)
    (alert,) = fired
    assert alert["group"] == {"actor": ta_id}
    assert alert["event"]["detail"]["reason"] == "cross_tenant"
    assert metric(alerting, "bastion_alerts_fired_total", rule="access_denied_repeated") == 1


def test_the_server_refuses_a_webhook_that_is_not_http(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    server = BastionServer(
        home,
        "--no-demo-models",
        env={
            "BASTION_ALERT_WEBHOOK_URL": "file:///etc/passwd",
            "BASTION_ALERT_WEBHOOK_SECRET": SECRET,
        },
    )
    try:
        assert server.proc.wait(timeout=120) != 0
    finally:
        server.stop()
    assert "The alert webhook must be an http:// or https:// URL." in server.logs()
    assert SECRET not in server.logs()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def admin_metrics(server: BastionServer) -> str:
    with server.client() as client:
        return client.get("/metrics").text
