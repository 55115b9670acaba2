"""The extraction monitor against a real server: thieves are blocked, benign tenants never.

`digits` is served with its default policy and a reference of real digits stored at
import (`bastion protect reference`). Consumer keys send what a thief and what honest
users send, one image a request, through the Open Inference Protocol and through OHTTP.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from bastion.models.demo import digits_split
from bastion.wire import bhttp
from bastion_testing import (
    BastionServer,
    digits_model,
    ohttp_config,
    post_sealed,
    run_cli,
    seal_request,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    base = tmp_path_factory.mktemp("monitor")
    model = digits_model(base)
    home = base / "home"
    run_cli(home, "init", "--no-demo-models")
    run_cli(home, "models", "add", "digits", "--runtime", "onnx", "--path", str(model))
    srv = BastionServer(home)
    try:
        srv.wait_ready(["digits"])
        yield srv
    finally:
        srv.stop()


def _key(server: BastionServer, tenant: str) -> dict[str, Any]:
    with server.client() as admin:
        admin.post("/admin/v1/tenants", json={"name": tenant})
        created = admin.post(
            "/admin/v1/keys", json={"tenant": tenant, "role": "consumer", "models": ["digits"]}
        )
        assert created.status_code == 201, created.text
        return dict(created.json())


def _ask(client: httpx.Client, key: str, x: np.ndarray[Any, Any]) -> httpx.Response:
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": x.astype(np.float32).tolist()}]}  # fmt: skip
    return client.post(
        "/v2/models/digits/infer", json=body, headers={"authorization": f"Bearer {key}"}
    )


def _send(server: BastionServer, key: str, stream: np.ndarray[Any, Any]) -> int | None:
    """Send `stream` one image a request; the number of answers before a refusal."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i, x in enumerate(stream):
            answer = _ask(client, key, x)
            if answer.status_code == 403:
                assert "copy" in answer.json()["error"]
                return i
            assert answer.status_code == 200, answer.text
    return None


def _labels(server: BastionServer, key: str, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answers = [_ask(client, key, row).json() for row in x]
    return np.asarray([a["outputs"][0]["data"][0] for a in answers])


def test_benign_tenants_sending_real_digits_are_never_blocked(server: BastionServer) -> None:
    _, x_test, _, _ = digits_split()
    rng = np.random.default_rng(0)
    for tenant in range(8):
        key = _key(server, f"honest-{tenant}")["key"]
        stream = x_test[rng.permutation(len(x_test))[: int(rng.integers(100, 300))]]
        assert _send(server, key, stream) is None


def test_a_random_input_thief_is_blocked_and_an_admin_clears_it(server: BastionServer) -> None:
    thief = _key(server, "thief")
    bystander = _key(server, "bystander")["key"]
    probes = np.random.default_rng(1).uniform(0, 16, (500, 64))
    answered = _send(server, thief["key"], probes)
    assert answered is not None and 50 <= answered <= 500
    # Only that key, only that model: everyone else is served.
    _, x_test, _, _ = digits_split()
    assert _send(server, bystander, x_test[:5]) is None
    # The block is an event (no payload), a metric, and a row in `protect status`.
    logs = server.logs()
    assert "protect.key_blocked" in logs
    assert f"{probes[0][0]:.6f}" not in logs
    deadline = time.monotonic() + 10
    while True:
        status = json.loads(
            run_cli(server.home, "protect", "status", "--tenant", "thief", "--json").stdout
        )
        if status and status[0]["blocked"]:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    assert status[0]["key_id"] == thief["id"] and status[0]["risk"] >= 1.0
    with server.client() as admin:
        metrics = admin.get("/metrics").text
    assert 'bastion_protect_actions_total{action="block",model="digits"}' in metrics
    assert 'bastion_extraction_risk{model="digits"}' in metrics
    # Cleared by an admin, the key is served again (from a fresh history).
    cleared = run_cli(server.home, "protect", "clear", "--key", thief["id"])
    assert "Cleared 1 record" in cleared.stdout
    deadline = time.monotonic() + 10
    while _send(server, thief["key"], x_test[:1]) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    unknown = run_cli(server.home, "protect", "clear", "--key", "nope", check=False)
    assert unknown.returncode == 1 and "no extraction record" in unknown.stderr


def test_a_jbda_thief_starting_from_50_real_digits_is_blocked(server: BastionServer) -> None:
    """Papernot et al.'s Jacobian-based augmentation, with the answers it gets."""
    key = _key(server, "jbda")["key"]
    _, x_test, _, _ = digits_split()
    points = x_test[np.random.default_rng(2).permutation(len(x_test))[:50]].astype(np.float64)
    labels = _labels(server, key, points)
    blocked = False
    while len(points) < 500 and not blocked:
        substitute = LogisticRegression(max_iter=500).fit(points, labels)
        classes = list(substitute.classes_)
        rows = [classes.index(c) for c in substitute.predict(points)]
        new = np.clip(points + 1.6 * np.sign(substitute.coef_[rows]), 0, 16)
        answered = _send(server, key, new)
        blocked = answered is not None
        if not blocked:
            points = np.vstack([points, new])
            labels = np.concatenate([labels, _labels(server, key, new)])
    assert blocked and len(points) < 500


def test_an_encrypted_thief_is_watched_and_blocked_too(server: BastionServer) -> None:
    key = _key(server, "sealed-thief")["key"]
    config = ohttp_config(server)
    probes = np.random.default_rng(3).uniform(0, 16, (300, 64))
    refused_after = None
    for i, x in enumerate(probes):
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                            "data": x.tolist()}]}  # fmt: skip
        data, context = seal_request(config, body, path="/v2/models/digits/infer")
        response = post_sealed(server, key, data, model="digits")
        if response.status_code == 403:
            assert response.json()["error"]["code"] == "extraction_suspected"
            refused_after = i
            break
        assert response.status_code == 200, response.text
        inner = bhttp.decode_response(context.open(response.content))
        assert inner.status == 200
    assert refused_after is not None and 50 <= refused_after < 300


def test_the_admin_api_shows_and_changes_protection(server: BastionServer) -> None:
    thief = _key(server, "api-thief")
    probes = np.random.default_rng(4).uniform(0, 16, (200, 64))
    assert _send(server, thief["key"], probes) is not None
    with server.client() as admin:
        deadline = time.monotonic() + 10
        while True:
            shown = admin.get("/admin/v1/protection", params={"tenant": "api-thief"}).json()
            if shown["keys"] and shown["keys"][0]["blocked"]:
                break
            assert time.monotonic() < deadline, shown
            time.sleep(0.3)
        (model,) = shown["models"]
        assert model["model"] == "digits" and model["output"] == "label_only"
        assert model["monitor"]["block_at"] == 1.0
        assert shown["keys"][0]["key_id"] == thief["id"]
        # A consumer key may not look.
        consumer = httpx.get(
            f"{server.url}/admin/v1/protection",
            headers={"authorization": f"Bearer {thief['key']}"},
        )
        assert consumer.status_code == 403
        bad = admin.patch("/admin/v1/protection/models/digits", json={"block_at": "soon"})
        assert bad.status_code == 400 and "block_at" in bad.json()["error"]["message"]
        unknown = admin.patch("/admin/v1/protection/models/digits", json={"colour": "red"})
        assert unknown.status_code == 400
        changed = admin.patch("/admin/v1/protection/models/digits", json={"alert_at": "0.6"})
        assert changed.status_code == 200 and changed.json()["monitor"]["alert_at"] == 0.6
        reset = admin.patch("/admin/v1/protection/models/digits", json={"alert_at": None})
        assert reset.json()["monitor"]["alert_at"] == 0.75
        cleared = admin.delete(f"/admin/v1/protection/keys/{thief['id']}")
        assert cleared.status_code == 200 and cleared.json()["cleared"] == 1
        assert admin.delete(f"/admin/v1/protection/keys/{thief['id']}").status_code == 404
        # A tenant's own settings, on every model.
        url = "/admin/v1/protection/overrides/tenants/api-thief/*"
        set_ = admin.patch(url, json={"watermark": "off", "alert_at": "0.9"})
        assert set_.status_code == 200 and set_.json()["watermark"] == "off"
        shown = admin.get("/admin/v1/protection").json()["overrides"]
        assert {"kind": "tenant", "subject": "api-thief", "model": "*", "watermark": "off",
                "alert_at": "0.9"} in shown  # fmt: skip
        assert admin.patch(url, json={"squeeze": "on"}).status_code == 400
        assert admin.delete(url).status_code == 204
        assert admin.delete(url).status_code == 404
        assert admin.patch("/admin/v1/protection/overrides/teams/x/*", json={}).status_code == 404


def test_a_key_of_its_own_policy_is_served_and_watched_by_it(server: BastionServer) -> None:
    """A trusted key gets full scores and is never blocked (alerts only); others keep
    the model's policy."""
    trusted, other = _key(server, "partner"), _key(server, "someone")
    run_cli(
        server.home, "protect", "set", "digits", "output=full", "block_at=off",
        "--key", trusted["id"],
    )  # fmt: skip
    _, x_test, _, _ = digits_split()
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while True:
            scores = _ask(client, trusted["key"], x_test[0]).json()["outputs"][1]["data"]
            if sum(1 for v in scores if v > 0) > 1:
                break
            assert time.monotonic() < deadline, scores
            time.sleep(0.3)
        plain = _ask(client, other["key"], x_test[0]).json()["outputs"][1]["data"]
    assert sorted(plain) == [0.0] * 9 + [1.0]
    probes = np.random.default_rng(5).uniform(0, 16, (200, 64))
    assert _send(server, trusted["key"], probes) is None
    assert _send(server, other["key"], probes) is not None
    listed = json.loads(run_cli(server.home, "protect", "overrides", "--json").stdout)
    assert {"kind": "key", "subject": trusted["id"], "model": "digits", "output": "full",
            "block_at": "off"} in listed  # fmt: skip
    bad = run_cli(
        server.home, "protect", "set", "digits", "squeeze=on", "--key", trusted["id"],
        check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "cannot be set per tenant or key" in bad.stderr


def test_asking_for_the_labels_alone_does_not_hide_a_thief(server: BastionServer) -> None:
    """The model gives the protection its scores even when the caller asks for `label`
    only; the caller still gets only what it asked for."""
    key = _key(server, "label-thief")["key"]
    probes = np.random.default_rng(9).uniform(0, 16, (300, 64)).astype(np.float32)
    refused_after = None
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i, x in enumerate(probes):
            body = {
                "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                            "data": x.tolist()}],
                "outputs": [{"name": "label"}],
            }  # fmt: skip
            answer = client.post(
                "/v2/models/digits/infer", json=body, headers={"authorization": f"Bearer {key}"}
            )
            if answer.status_code == 403:
                refused_after = i
                break
            assert [o["name"] for o in answer.json()["outputs"]] == ["label"]
    assert refused_after is not None and 50 <= refused_after < 300
