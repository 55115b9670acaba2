"""A unique marker sent through every endpoint appears in no log line and no stored file."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx

from bastion_testing import BastionServer


def _send_marker_everywhere(client: httpx.Client, marker: str) -> None:
    msgs = [{"role": "user", "content": f"please repeat {marker} {marker}"}]
    assert (
        client.post(
            "/v1/chat/completions", json={"model": "tiny-chat", "messages": msgs, "max_tokens": 4}
        ).status_code
        == 200
    )
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "echo", "messages": msgs, "stream": True},
    ) as streamed:
        body = streamed.read()
        assert streamed.status_code == 200 and marker.encode() in body
    assert (
        client.post(
            "/v1/completions",
            json={"model": "echo", "prompt": f"{marker} text", "stop": [f"x{marker}"]},
        ).status_code
        == 200
    )
    assert (
        client.post(
            "/v1/embeddings", json={"model": "minilm-l6", "input": [marker, f"and {marker}"]}
        ).status_code
        == 200
    )
    assert (
        client.post(
            "/v2/models/minilm-l6/infer",
            json={
                "id": marker,
                "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [marker]}],
            },
        ).status_code
        == 200
    )
    # Error paths must not echo the payload into logs either.
    for body_json in (
        {"model": "tiny-chat", "messages": [{"role": marker, "content": marker}]},
        {"model": marker, "messages": msgs},
        {"model": "tiny-chat", "messages": msgs, "temperature": marker},
        {"model": "echo", "messages": [{"role": "user", "content": f"__fail__ {marker}"}]},
    ):
        status = client.post("/v1/chat/completions", json=body_json).status_code
        assert 400 <= status < 600 and status != 200
    bad_oip = client.post(
        "/v2/models/digits/infer",
        json={"inputs": [{"name": marker, "shape": [1], "datatype": "BYTES", "data": [marker]}]},
    )
    assert bad_oip.status_code == 400
    assert (
        marker
        not in client.post(
            "/v1/chat/completions",
            content=marker.encode(),
            headers={"content-type": "application/json"},
        ).text
    )


def test_marker_reaches_no_log_and_no_file(server: BastionServer) -> None:
    marker = "MARK" + secrets.token_hex(8)
    with server.client() as client:
        _send_marker_everywhere(client, marker)
        # One request with an invalid key containing the marker-like secret.
        bad = httpx.get(
            server.url + "/v1/models",
            headers={"authorization": f"Bearer bsk_0123456789abcdef_{marker}"},
        )
        assert bad.status_code == 401
    logs = server.logs()
    assert len(logs) > 0
    assert marker not in logs
    assert marker.lower() not in logs.lower()
    for path in Path(server.home).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert marker.encode() not in data, f"marker found in {path}"
            assert marker.encode("utf-16-le") not in data
