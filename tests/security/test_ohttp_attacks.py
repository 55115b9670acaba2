"""Attacks on end-to-end encryption: what the gateway, its logs and the wire can see, and
tampered, truncated, replayed, stale, misrouted and retired-key requests."""

from __future__ import annotations

import email.utils
import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bastion.client import OHTTPTransport
from bastion.crypto import hpke, ohttp
from bastion.wire import bhttp
from bastion_testing import (
    BastionServer,
    RecordingTransport,
    add_echo_model,
    cli_json,
    ohttp_config,
    ohttp_fingerprints,
    post_sealed,
    run_cli,
    seal_request,
)

KEY_PROBLEM = "https://iana.org/assignments/http-problem-types#ohttp-key"


def _open(context: ohttp.ClientResponseContext, response: httpx.Response) -> bhttp.Response:
    assert response.status_code == 200, response.text
    return bhttp.decode_response(context.open(response.content))


def _assert_healthy(server: BastionServer, key: str) -> None:
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    data, context = seal_request(
        ohttp_config(server), {"model": "echo", "messages": [{"role": "user", "content": "ok"}]}
    )
    assert _open(context, post_sealed(server, key, data)).status == 200


ECHO = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}


def test_marker_is_seen_by_nobody_between_client_and_worker(
    server: BastionServer, consumer_key: str
) -> None:
    marker = "E2E-" + secrets.token_hex(12)
    wire = RecordingTransport()
    transport = OHTTPTransport(fingerprints=ohttp_fingerprints(server.home), transport=wire)
    sdk = openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key=consumer_key,
        http_client=httpx.Client(transport=transport, timeout=60),
        max_retries=0,
    )
    prompt = [{"role": "user", "content": f"repeat {marker} please"}]
    # The echo model's answers repeat the marker: answers are covered, not only prompts.
    answer = sdk.chat.completions.create(model="echo", messages=prompt)  # type: ignore[arg-type]
    assert marker in (answer.choices[0].message.content or "")
    streamed = sdk.chat.completions.create(model="echo", messages=prompt, stream=True)  # type: ignore[arg-type]
    assert marker in "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert marker in (sdk.completions.create(model="echo", prompt=marker).choices[0].text)
    assert sdk.embeddings.create(model="minilm-l6", input=[marker]).data
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(
            model="echo",
            messages=[{"role": marker, "content": marker}],  # type: ignore[list-item]
        )
    oip = httpx.Client(
        base_url=server.url,
        transport=transport,
        headers={"authorization": f"Bearer {consumer_key}"},
    )
    infer = oip.post(
        "/v2/models/minilm-l6/infer",
        json={
            "id": marker,
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [marker]}],
        },
    )
    assert infer.status_code == 200 and infer.json()["id"] == marker

    assert wire.sent and marker.encode() not in wire.wire()
    metrics = server.client().get("/metrics").text
    assert marker not in metrics
    time.sleep(0.5)  # let log lines reach the files
    assert marker not in server.logs()
    for path in Path(server.home).rglob("*"):
        if path.is_file():
            assert marker.encode() not in path.read_bytes(), path


def test_tampered_and_truncated_requests_are_refused(
    server: BastionServer, consumer_key: str
) -> None:
    config = ohttp_config(server)
    for position in (7, 20, 60, -1):
        # A fresh encapsulation each time: the gateway refuses a reused one as a replay.
        data, _ = seal_request(config, ECHO)
        tampered = bytearray(data)
        tampered[position] ^= 0x40
        response = post_sealed(server, consumer_key, bytes(tampered))
        assert response.status_code == 400
        assert response.json()["error"]["code"] in ("ohttp_decrypt", "ohttp_malformed")
        assert "hello" not in response.text
    for length in (3, 7, 30, -1):
        data, _ = seal_request(config, ECHO)
        assert post_sealed(server, consumer_key, data[:length]).status_code == 400
    _assert_healthy(server, consumer_key)


def test_unknown_key_id_and_suite_get_the_key_problem(
    server: BastionServer, consumer_key: str
) -> None:
    stranger = ohttp.GatewayKey.generate((ohttp_config(server).key_id + 7) % 256).config()
    data, _ = seal_request(stranger, ECHO)
    response = post_sealed(server, consumer_key, data)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == KEY_PROBLEM
    data, _ = seal_request(ohttp_config(server), ECHO)
    other_aead = data[:5] + (0x0002).to_bytes(2, "big") + data[7:]  # AES-256-GCM: not offered
    assert post_sealed(server, consumer_key, other_aead).json()["type"] == KEY_PROBLEM


def test_a_forged_copy_cannot_block_the_genuine_request(
    server: BastionServer, consumer_key: str
) -> None:
    # Someone who sees the request in flight sends a tampered copy first (same enc): it
    # does not decrypt, and so does not make the genuine one look like a replay.
    data, context = seal_request(ohttp_config(server), ECHO)
    forged = bytearray(data)
    forged[-1] ^= 0x01
    assert (
        post_sealed(server, consumer_key, bytes(forged)).json()["error"]["code"] == "ohttp_decrypt"
    )
    assert _open(context, post_sealed(server, consumer_key, data)).status == 200
    assert post_sealed(server, consumer_key, data).json()["error"]["code"] == "ohttp_replay"


def test_replayed_request_is_refused(server: BastionServer, consumer_key: str) -> None:
    data, context = seal_request(ohttp_config(server), ECHO)
    assert _open(context, post_sealed(server, consumer_key, data)).status == 200
    replay = post_sealed(server, consumer_key, data)
    assert replay.status_code == 400
    assert replay.json()["error"]["code"] == "ohttp_replay"
    # Refusals are counted, for alerting, and recorded as events (never with the payload).
    metrics = server.client().get("/metrics").text
    assert re.search(r'bastion_ohttp_refused_total\{reason="ohttp_replay"\} [1-9]', metrics)
    time.sleep(0.5)
    assert '"event":"ohttp.refused"' in server.logs()


@pytest.mark.parametrize("offset", [-3600.0, 3600.0])
def test_stale_date_gets_the_date_problem_with_the_server_time(
    server: BastionServer, consumer_key: str, offset: float
) -> None:
    data, context = seal_request(ohttp_config(server), ECHO, date=time.time() + offset)
    answer = _open(context, post_sealed(server, consumer_key, data))
    assert answer.status == 400
    assert json.loads(answer.content)["type"] == (
        "https://iana.org/assignments/http-problem-types#date"
    )
    server_date = email.utils.parsedate_to_datetime(answer.header("date") or "")
    assert abs(server_date.timestamp() - time.time()) < 30


def test_a_date_out_of_any_range_gets_the_date_problem(
    server: BastionServer, consumer_key: str
) -> None:
    # A 20-digit year overflowed the clock conversion: an encrypted 500 before.
    for text in (
        "Sun, 06 Dec 99999999999999999999 10:00:00 GMT",
        "Mon, 01 Jan 0001 00:00:00 -0100",
    ):
        data, context = seal_request(ohttp_config(server), ECHO, date_text=text)
        answer = _open(context, post_sealed(server, consumer_key, data))
        assert answer.status == 400, text
        assert json.loads(answer.content)["type"].endswith("#date")


def test_invalid_utf8_inside_an_encrypted_request_is_an_encrypted_400(
    server: BastionServer, consumer_key: str
) -> None:
    body = b'{"model":"echo","messages":[{"role":"user","content":"\xff\xfe"}]}'
    data, context = seal_request(ohttp_config(server), ECHO, raw=body)
    answer = _open(context, post_sealed(server, consumer_key, data))
    assert answer.status == 400
    assert json.loads(answer.content)["error"]["code"] == "invalid_json"
    _assert_healthy(server, consumer_key)


@pytest.mark.parametrize("stream", [False, True])
def test_client_corrects_its_clock_after_a_date_problem(
    server: BastionServer, consumer_key: str, stream: bool
) -> None:
    transport = OHTTPTransport(fingerprints=ohttp_fingerprints(server.home))
    transport._clock_offset = -7200.0  # a client clock two hours slow
    sdk = openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key=consumer_key,
        http_client=httpx.Client(transport=transport),
        max_retries=0,
    )
    if stream:
        chunks = sdk.chat.completions.create(stream=True, **ECHO)  # type: ignore[call-overload]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
    else:
        answer = sdk.chat.completions.create(**ECHO)  # type: ignore[call-overload]
        assert answer.choices[0].message.content == "hello"
    assert abs(transport._clock_offset) < 60


def test_client_retries_a_date_problem_only_once(server: BastionServer, consumer_key: str) -> None:
    class SkewedTransport(OHTTPTransport):
        def date_header(self) -> str:
            return email.utils.formatdate(time.time() - 7200, usegmt=True)  # never corrected

    wire = RecordingTransport()
    transport = SkewedTransport(fingerprints=ohttp_fingerprints(server.home), transport=wire)
    with httpx.Client(base_url=server.url, transport=transport) as client:
        answer = client.post(
            "/v1/chat/completions", json=ECHO, headers={"authorization": f"Bearer {consumer_key}"}
        )
    assert answer.status_code == 400 and answer.json()["type"].endswith("#date")
    assert len([s for s in wire.sent if b"message/ohttp-req" in s]) == 2


def test_inner_request_for_another_model_is_refused(
    server: BastionServer, consumer_key: str
) -> None:
    # Outer header says echo (routing, quotas); the inner request asks for tiny-chat.
    data, context = seal_request(ohttp_config(server), {**ECHO, "model": "tiny-chat"})
    answer = _open(context, post_sealed(server, consumer_key, data, model="echo"))
    assert answer.status == 400
    assert json.loads(answer.content)["error"]["code"] == "model_mismatch"
    data, context = seal_request(
        ohttp_config(server),
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]},
        path="/v2/models/digits/infer",
    )
    answer = _open(context, post_sealed(server, consumer_key, data, model="echo"))
    assert answer.status == 400
    _assert_healthy(server, consumer_key)


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("rotation") / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    srv = BastionServer(home)
    try:
        srv.wait_ready(["echo"])
        yield srv
    finally:
        srv.stop()


def _wait_published(server: BastionServer, fingerprint: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if ohttp_config(server).fingerprint() == fingerprint:
            return
        time.sleep(0.2)
    raise AssertionError("the new key was not published")


def test_rotation_grace_period_and_retirement(rotating: BastionServer, tmp_path: Path) -> None:
    server = rotating
    key = server.admin_key
    old = ohttp_config(server)
    pins = tmp_path / "pins.json"
    tofu = OHTTPTransport(pin_file=pins)
    with httpx.Client(base_url=server.url, transport=tofu) as client:
        assert (
            client.post(
                "/v1/chat/completions", json=ECHO, headers={"authorization": f"Bearer {key}"}
            ).status_code
            == 200
        )

    # `old` is the published hybrid key: rotate that KEM alone.
    assert old.kem_id == hpke.KEM_MLKEM768_X25519
    [rotated] = cli_json(
        server.home, "ohttp", "rotate", "--grace", "1h", "--kem", "mlkem768-x25519"
    )
    _wait_published(server, rotated["fingerprint"])
    listed = {k["fingerprint"]: k["state"] for k in cli_json(server.home, "ohttp", "keys")}
    assert listed[rotated["fingerprint"]] == "current" and listed[old.fingerprint()] == "previous"
    # The X25519 key was not rotated.
    assert sorted(listed.values()) == ["current", "current", "previous"]
    # Within the grace period the previous key still works.
    data, context = seal_request(old, ECHO)
    assert _open(context, post_sealed(server, key, data)).status == 200

    # A client pinned on first use refuses the new key until its operator updates the pin.
    client = httpx.Client(base_url=server.url, transport=OHTTPTransport(pin_file=pins))
    with pytest.raises(httpx.TransportError, match="pinned fingerprint"):
        client.post("/v1/chat/completions", json=ECHO, headers={"authorization": f"Bearer {key}"})
    client.close()

    # Every KEM's key at once, the older ones retired.
    newest, newest_classical = cli_json(server.home, "ohttp", "rotate", "--grace", "0")
    assert (newest["kem"], newest_classical["kem"]) == ("mlkem768-x25519", "x25519")
    _wait_published(server, newest["fingerprint"])
    time.sleep(1.5)  # the running server reloads the key set
    for retired in (old, ohttp.KeyConfig.decode(rotated_config(rotated))):
        data, _ = seal_request(retired, ECHO)
        response = post_sealed(server, key, data)
        assert response.status_code == 400
        assert response.json()["type"] == KEY_PROBLEM
    every = {k["fingerprint"]: k["state"] for k in cli_json(server.home, "ohttp", "keys", "--all")}
    assert every[old.fingerprint()] == "retired" and every[rotated["fingerprint"]] == "retired"

    # A client pinning the operator's published fingerprints follows the rotation: the key
    # problem makes it fetch the configuration again.
    transport = OHTTPTransport(fingerprints=[newest["fingerprint"]])
    transport._configs[server.url] = old
    with httpx.Client(base_url=server.url, transport=transport) as client:
        ok = client.post(
            "/v1/chat/completions", json=ECHO, headers={"authorization": f"Bearer {key}"}
        )
    assert ok.status_code == 200


def rotated_config(info: dict[str, object]) -> bytes:
    """The encoded key configuration of a key as `bastion ohttp rotate --json` shows it."""
    suites = info["suites"]
    assert isinstance(suites, list)
    return ohttp.KeyConfig(
        key_id=int(str(info["key_id"])),
        kem_id=int(str(info["kem_id"])),
        public_key=bytes.fromhex(str(info["public_key"])),
        suites=tuple((int(s["kdf_id"]), int(s["aead_id"])) for s in suites),
    ).encode()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def test_private_keys_reach_workers_only_over_their_channel(server: BastionServer) -> None:
    from bastion.bootstrap import open_home
    from bastion.config import Settings

    home = open_home(Settings.load(environ={}, home=server.home))
    secrets_ = [k.key.private_key.to_bytes() for k in home.ohttp_keys.active()]
    assert secrets_
    forms = [form for s in secrets_ for form in (s, s.hex().encode(), s.hex().upper().encode())]
    workers = _descendants(server.proc.pid)
    assert workers
    directories = 0
    for pid in workers:
        proc = Path(f"/proc/{pid}")
        cmdline = (proc / "cmdline").read_bytes()
        seen = [cmdline, (proc / "environ").read_bytes()]
        argv = cmdline.split(b"\0")
        if b"bastion.worker.main" in argv:
            # The worker's private directory: where its socket is.
            directory = Path(argv[argv.index(b"--endpoint") + 1].decode()).parent
            files = [p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()]
            seen += [p.read_bytes() for p in files]
            directories += 1
        for blob in seen:
            assert not any(form in blob for form in forms), pid
    assert directories > 0
    # Nor does the database or any file under the home hold them in the clear.
    for path in Path(server.home).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(form in data for form in forms), path
