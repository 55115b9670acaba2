"""The gateway's OHTTP checks: key ids, algorithms, retirement and replays, unopened."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from bastion.config import Settings
from bastion.crypto import hpke, ohttp
from bastion.errors import InvalidRequest, ModelUnavailable
from bastion.gateway.ohttp_keys import DEFAULT_SUITES, ActiveKey, OhttpKeyInfo
from bastion.gateway.sealing import (
    OhttpKeyProblem,
    Replayed,
    ReplayGuard,
    SealingState,
    replay_id,
)


def _active(
    key_id: int,
    state: str,
    retire_at: datetime | None = None,
    kem_id: int = hpke.KEM_X25519_SHA256,
) -> ActiveKey:
    key = ohttp.GatewayKey.generate(key_id, suites=DEFAULT_SUITES, kem_id=kem_id)
    config = key.config()
    info = OhttpKeyInfo(
        key_id=key_id,
        kem_id=config.kem_id,
        suites=config.suites,
        public_key=config.public_key,
        fingerprint=config.fingerprint(),
        state=state,
        created_at=datetime.now(UTC),
        retire_at=retire_at,
        retired_at=None,
    )
    return ActiveKey(key=key, info=info)


class Ticker:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_replay_guard_refuses_repeats_until_they_expire() -> None:
    clock = Ticker()
    guard = ReplayGuard(ttl_s=10, max_entries=100, clock=clock)
    guard.check(b"a")
    with pytest.raises(Replayed):
        guard.check(b"a")
    clock.now += 11
    guard.check(b"a")
    assert len(guard) == 1


def test_replay_guard_fails_closed_when_full() -> None:
    clock = Ticker()
    guard = ReplayGuard(ttl_s=10, max_entries=2, clock=clock)
    guard.check(b"a")
    guard.check(b"b")
    with pytest.raises(ModelUnavailable):
        guard.check(b"c")
    clock.now += 11
    guard.check(b"c")


def test_only_current_keys_are_published_and_previous_ones_accepted() -> None:
    state = SealingState(Settings())
    current = _active(2, "current")
    previous = _active(1, "previous", datetime.now(UTC) + timedelta(hours=1))
    message = state.update([current, previous])
    published = ohttp.decode_key_configs(state.published)
    assert [c.key_id for c in published] == [2]
    assert {k.key_id for k in message.keys} == {1, 2}
    for active in (current, previous):
        data, _ = ohttp.encapsulate_request(active.key.config(), b"x")
        assert state.check_request(data).key_id == active.key.key_id


def test_unknown_and_retired_keys_and_other_suites_are_key_problems() -> None:
    state = SealingState(Settings())
    current = _active(2, "current")
    expired = _active(1, "previous", datetime.now(UTC) - timedelta(seconds=1))
    state.update([current, expired])
    stranger = ohttp.GatewayKey.generate(9).config()
    for config in (stranger, expired.key.config()):
        data, _ = ohttp.encapsulate_request(config, b"x")
        with pytest.raises(OhttpKeyProblem):
            state.check_request(data)
    data, _ = ohttp.encapsulate_request(current.key.config(), b"x")
    forged = data[:3] + (0x0002).to_bytes(2, "big") + data[5:]  # another KDF id
    with pytest.raises(OhttpKeyProblem):
        state.check_request(forged)


def test_malformed_and_replayed_requests_are_refused() -> None:
    state = SealingState(Settings())
    current = _active(0, "current")
    state.update([current])
    with pytest.raises(InvalidRequest):
        state.check_request(b"\x00\x00")
    data, _ = ohttp.encapsulate_request(
        current.key.config(),
        b"x",
        suite=hpke.Suite(hpke.KEM_X25519_SHA256, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),
    )
    state.check_request(data)
    with pytest.raises(Replayed):
        state.check_request(data)


def test_keys_of_kems_not_offered_are_neither_published_nor_accepted() -> None:
    hybrid = _active(4, "current", kem_id=hpke.KEM_MLKEM768_X25519)
    classical = _active(5, "current")
    default = SealingState(Settings())
    message = default.update([hybrid, classical])
    published = ohttp.decode_key_configs(default.published)
    assert [c.kem_id for c in published] == [hpke.KEM_MLKEM768_X25519, hpke.KEM_X25519_SHA256]
    assert {k.kem_id for k in message.keys} == {hpke.KEM_MLKEM768_X25519, hpke.KEM_X25519_SHA256}

    # Only the hybrid offered: the X25519 key is kept from the workers too.
    narrow = SealingState(Settings(ohttp_kems="mlkem768-x25519"))
    message = narrow.update([hybrid, classical])
    assert [c.key_id for c in ohttp.decode_key_configs(narrow.published)] == [4]
    assert [k.key_id for k in message.keys] == [4]
    data, _ = ohttp.encapsulate_request(classical.key.config(), b"x")
    with pytest.raises(OhttpKeyProblem, match="unknown"):
        narrow.check_request(data)


def test_requiring_post_quantum_refuses_classical_requests_as_a_key_problem() -> None:
    hybrid = _active(4, "current", kem_id=hpke.KEM_MLKEM768_X25519)
    classical = _active(5, "current")
    state = SealingState(Settings(ohttp_require_pq=True))
    message = state.update([hybrid, classical])
    assert [k.key_id for k in message.keys] == [4]
    data, _ = ohttp.encapsulate_request(classical.key.config(), b"x")
    with pytest.raises(OhttpKeyProblem, match="post-quantum"):
        state.check_request(data)
    data, _ = ohttp.encapsulate_request(hybrid.key.config(), b"x")
    assert state.check_request(data).kem_id == hpke.KEM_MLKEM768_X25519


def test_the_replay_guard_keeps_a_hash_of_a_long_enc() -> None:
    hybrid = _active(4, "current", kem_id=hpke.KEM_MLKEM768_X25519)
    state = SealingState(Settings())
    state.update([hybrid])
    data, _ = ohttp.encapsulate_request(hybrid.key.config(), b"x")
    header = state.check_request(data)
    assert len(header.enc) == 1120
    guard = state.replays
    assert isinstance(guard, ReplayGuard) and len(guard) == 1
    with pytest.raises(Replayed):
        state.check_request(data)
    # What the guard holds is 32 bytes, and forgetting uses the same id.
    guard.forget(replay_id(header.enc))
    state.check_request(data)
    assert replay_id(header.enc) == hashlib.sha256(header.enc).digest()
    assert replay_id(b"x" * 32) == b"x" * 32
