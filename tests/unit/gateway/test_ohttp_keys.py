"""OHTTP keys in the store: first key, rotation with a grace period, retirement, sealing."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from bastion.audit.events import (
    OHTTP_KEY_CREATED,
    OHTTP_KEY_RETIRED,
    OHTTP_KEY_ROTATED,
    MemoryEventSink,
)
from bastion.crypto import hpke, ohttp
from bastion.crypto.keyring import KeyRing, KeyRingError, LocalKek
from bastion.errors import Conflict, InvalidRequest
from bastion.gateway.ohttp_keys import OhttpKeyStore
from bastion.store.db import Database
from bastion.store.tables import ohttp_keys


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def master() -> bytes:
    return os.urandom(32)


# The lifecycle of one KEM's keys is the same for every KEM: these tests run for each.
@pytest.fixture(params=[hpke.KEM_X25519_SHA256, hpke.KEM_MLKEM768_X25519], ids=["x25519", "xwing"])
def store(
    request: pytest.FixtureRequest,
    db: Database,
    master: bytes,
    events: MemoryEventSink,
    clock: Clock,
) -> OhttpKeyStore:
    return OhttpKeyStore(db, KeyRing(LocalKek(master)), events, kems=(request.param,), clock=clock)


@pytest.fixture
def both(db: Database, master: bytes, events: MemoryEventSink, clock: Clock) -> OhttpKeyStore:
    """A store offering the default KEMs: the post-quantum hybrid first, then X25519."""
    return OhttpKeyStore(db, KeyRing(LocalKek(master)), events, clock=clock)


def test_first_key_is_created_once(store: OhttpKeyStore, events: MemoryEventSink) -> None:
    [created] = store.ensure_current("op")
    assert created.state == "current" and created.kem_id == store.kems[0]
    assert store.ensure_current("op") == []
    assert [k.key_id for k in store.list_keys()] == [created.key_id]
    assert events.kinds() == [OHTTP_KEY_CREATED]


def test_private_key_is_stored_only_sealed(store: OhttpKeyStore, db: Database) -> None:
    store.ensure_current("op")
    [active] = store.active()
    secret = active.key.private_key.to_bytes()
    with db.read() as conn:
        row = conn.execute(sa.select(ohttp_keys)).mappings().one()
    assert secret not in bytes(row["private_envelope"])
    assert row["fingerprint"] == active.key.config().fingerprint()


def test_active_key_decapsulates_what_its_public_config_encrypts(store: OhttpKeyStore) -> None:
    [info] = store.ensure_current("op")
    [active] = store.active()
    data, _ = ohttp.encapsulate_request(info.config(), b"hello")
    plaintext, _ = ohttp.decapsulate_request({active.key.key_id: active.key}, data)
    assert plaintext == b"hello"


def test_rotation_keeps_previous_key_for_the_grace_period(
    store: OhttpKeyStore, clock: Clock, events: MemoryEventSink
) -> None:
    [first] = store.ensure_current("op")
    [second] = store.rotate("op", timedelta(hours=1))
    assert second.key_id != first.key_id
    assert second.fingerprint != first.fingerprint
    states = {k.key_id: k.state for k in store.list_keys()}
    assert states == {first.key_id: "previous", second.key_id: "current"}
    assert [a.info.key_id for a in store.active()] == [second.key_id, first.key_id]

    clock.now += timedelta(minutes=59)
    assert store.retire_expired("system") == []
    clock.now += timedelta(minutes=2)
    # Past the grace period the previous key is no longer handed out, even before retirement.
    assert [a.info.key_id for a in store.active()] == [second.key_id]
    retired = store.retire_expired("system")
    assert [k.key_id for k in retired] == [first.key_id]
    assert store.list_keys(include_retired=False)[0].key_id == second.key_id
    assert {k.key_id: k.state for k in store.list_keys()}[first.key_id] == "retired"
    assert events.kinds() == [OHTTP_KEY_CREATED, OHTTP_KEY_ROTATED, OHTTP_KEY_RETIRED]


def test_retirement_erases_the_private_key(store: OhttpKeyStore, db: Database) -> None:
    store.ensure_current("op")
    store.rotate("op", timedelta(0))
    with db.read() as conn:
        rows = conn.execute(sa.select(ohttp_keys).order_by(ohttp_keys.c.id)).mappings().all()
    assert rows[0]["state"] == "retired"
    assert rows[0]["private_envelope"] is None
    assert rows[1]["state"] == "current"


def test_negative_grace_is_refused(store: OhttpKeyStore) -> None:
    store.ensure_current("op")
    with pytest.raises(InvalidRequest):
        store.rotate("op", timedelta(seconds=-1))


def test_key_ids_wrap_around_without_reusing_accepted_ids(store: OhttpKeyStore) -> None:
    store.ensure_current("op")
    # Keys within their grace period keep their ids: 256 accepted keys use them all.
    for _ in range(255):
        store.rotate("op", timedelta(hours=1))
    accepted = [k.key_id for k in store.list_keys(include_retired=False)]
    assert sorted(accepted) == list(range(256))
    with pytest.raises(Conflict, match="256"):
        store.rotate("op", timedelta(hours=1))
    # A rotation with no grace retires them all, which frees the ids: the next one is the
    # id after the last used (so the oldest comes back first).
    [fresh] = store.rotate("op", timedelta(0))
    assert fresh.key_id == 0
    assert [k.key_id for k in store.list_keys(include_retired=False)] == [0]
    assert [k.key_id for k in store.rotate("op", timedelta(hours=1))] == [1]


def test_keys_do_not_open_under_another_master_key(
    db: Database, store: OhttpKeyStore, events: MemoryEventSink
) -> None:
    store.ensure_current("op")
    stranger = OhttpKeyStore(db, KeyRing(LocalKek(os.urandom(32))), events, kems=store.kems)
    with pytest.raises(KeyRingError):
        stranger.active()


def test_a_rotation_shortens_older_grace_periods(store: OhttpKeyStore, clock: Clock) -> None:
    [first] = store.ensure_current("op")
    [second] = store.rotate("op", timedelta(days=1))
    [third] = store.rotate("op", timedelta(minutes=5))
    retire_at = {k.key_id: k.retire_at for k in store.list_keys()}
    assert retire_at[first.key_id] == retire_at[second.key_id] == clock.now + timedelta(minutes=5)
    store.rotate("op", timedelta(0))
    states = {k.key_id: k.state for k in store.list_keys()}
    assert states[first.key_id] == states[second.key_id] == states[third.key_id] == "retired"


def test_each_offered_kem_gets_a_current_key_the_hybrid_first(
    both: OhttpKeyStore, events: MemoryEventSink
) -> None:
    created = both.ensure_current("op")
    assert [k.kem for k in created] == ["mlkem768-x25519", "x25519"]
    assert both.ensure_current("op") == []
    active = both.active()
    assert [a.info.kem_id for a in active] == [hpke.KEM_MLKEM768_X25519, hpke.KEM_X25519_SHA256]
    hybrid = active[0].info.config()
    # The hybrid's public key is ML-KEM-768's 1184 bytes and X25519's 32, in a config that
    # still fits RFC 9458's two-byte length.
    assert len(hybrid.public_key) == 1216 and len(hybrid.encode()) < 0xFFFF
    assert ohttp.decode_key_configs(ohttp.encode_key_configs([hybrid])) == [hybrid]
    data, _ = ohttp.encapsulate_request(hybrid, b"post-quantum hello")
    keys = {a.key.key_id: a.key for a in active}
    assert ohttp.decapsulate_request(keys, data)[0] == b"post-quantum hello"
    assert [e.detail["kem"] for e in events.events] == ["mlkem768-x25519", "x25519"]


def test_a_rotation_of_one_kem_leaves_the_other_alone(both: OhttpKeyStore) -> None:
    hybrid, classical = both.ensure_current("op")
    [fresh] = both.rotate("op", timedelta(0), hpke.KEM_X25519_SHA256)
    assert fresh.kem_id == hpke.KEM_X25519_SHA256
    states = {k.key_id: k.state for k in both.list_keys()}
    assert states == {
        hybrid.key_id: "current",
        classical.key_id: "retired",
        fresh.key_id: "current",
    }
    # Without a KEM, every offered KEM gets a new key.
    renewed = both.rotate("op", timedelta(hours=1))
    assert [k.kem for k in renewed] == ["mlkem768-x25519", "x25519"]
    assert [a.info.state for a in both.active()] == ["current", "current", "previous", "previous"]


def test_a_kem_the_server_does_not_offer_cannot_be_rotated(store: OhttpKeyStore) -> None:
    store.ensure_current("op")
    other = next(k for k in (hpke.KEM_X25519_SHA256, hpke.KEM_MLKEM768) if k not in store.kems)
    with pytest.raises(InvalidRequest, match="does not offer"):
        store.rotate("op", timedelta(0), other)


def test_an_x25519_home_gains_a_hybrid_key_with_an_id_of_its_own(
    db: Database, master: bytes, events: MemoryEventSink, clock: Clock
) -> None:
    keyring = KeyRing(LocalKek(master))
    before = OhttpKeyStore(db, keyring, events, kems=(hpke.KEM_X25519_SHA256,), clock=clock)
    [classical] = before.ensure_current("op")
    after = OhttpKeyStore(db, keyring, events, clock=clock)
    [hybrid] = after.ensure_current("system")
    assert hybrid.kem == "mlkem768-x25519" and hybrid.key_id != classical.key_id
    assert [k.key_id for k in after.list_keys()] == [hybrid.key_id, classical.key_id]


def test_the_keys_of_a_kem_no_longer_offered_can_be_retired(
    db: Database, master: bytes, events: MemoryEventSink, clock: Clock
) -> None:
    keyring = KeyRing(LocalKek(master))
    both = OhttpKeyStore(db, keyring, events, clock=clock)
    hybrid, classical = both.ensure_current("op")
    pq_only = OhttpKeyStore(db, keyring, events, kems=(hpke.KEM_MLKEM768_X25519,), clock=clock)
    # An offered KEM is rotated, not retired.
    with pytest.raises(InvalidRequest, match="rotate its key instead"):
        pq_only.retire_kem("op", hpke.KEM_MLKEM768_X25519, timedelta(0))
    with pytest.raises(InvalidRequest):
        pq_only.retire_kem("op", hpke.KEM_X25519_SHA256, timedelta(seconds=-1))
    [scheduled] = pq_only.retire_kem("op", hpke.KEM_X25519_SHA256, timedelta(hours=1))
    assert scheduled.key_id == classical.key_id
    states = {k.key_id: (k.state, k.retire_at) for k in pq_only.list_keys()}
    assert states[classical.key_id] == ("previous", clock.now + timedelta(hours=1))
    assert pq_only.retire_kem("op", hpke.KEM_X25519_SHA256, timedelta(0))
    with db.read() as conn:
        row = (
            conn.execute(sa.select(ohttp_keys).where(ohttp_keys.c.key_id == classical.key_id))
            .mappings()
            .one()
        )
    assert row["state"] == "retired" and row["private_envelope"] is None
    assert [k.info.key_id for k in pq_only.active()] == [hybrid.key_id]
    assert events.kinds()[-1] == OHTTP_KEY_RETIRED
