"""The model registry, live states, extraction risk, watermark records, protection
overrides and OHTTP keys on both backends, with two gateways writing at once where a
running fleet does."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from store_testing import run_threads

from bastion.audit.events import MemoryEventSink
from bastion.crypto.keyring import KeyRing, LocalKek
from bastion.errors import InvalidRequest
from bastion.gateway.ohttp_keys import OhttpKeyInfo, OhttpKeyStore
from bastion.identity.principal import OPERATOR
from bastion.models.marks import MarksStore, SealedRecord
from bastion.models.overrides import OverrideStore
from bastion.models.registry import ModelRegistry
from bastion.models.risk import RiskBoard, RiskRecord
from bastion.models.status import PublishedStatus, StatusBoard
from bastion.store.db import MIGRATIONS_DIR, Database, head_revision
from bastion.store.tables import model_status

SSO_USER = "jwt:" + "h" * 253 + ":" + "s" * 254


def test_models_are_registered_changed_and_removed(
    open_database: Callable[[], Database],
) -> None:
    cli, gateway = open_database(), open_database()
    registry = ModelRegistry(cli, MemoryEventSink())
    options = {"max_len": 64, "protect.output": "label_only", "nested": {"a": [1, 2.5, None]}}
    added = registry.register(
        OPERATOR, name="echo", runtime="echo", path="/m/echo", options=options, description="é"
    )
    registry.register(
        OPERATOR, name="digits", runtime="onnx", path="/m/d", desired_state="unloaded"
    )
    registry.set_desired_state(OPERATOR, "digits", "loaded")
    registry.set_protection(OPERATOR, "echo", {"protect.output": None})
    seen = ModelRegistry(gateway, MemoryEventSink())
    assert [r.name for r in seen.list()] == ["digits", "echo"]
    echo = seen.get("echo")
    assert echo.options == {"max_len": 64, "nested": {"a": [1, 2.5, None]}}
    assert echo.description == "é" and echo.created_at == added.created_at
    assert seen.get("digits").desired_state == "loaded"
    with pytest.raises(InvalidRequest):  # PostgreSQL keeps no NUL in text
        registry.register(OPERATOR, name="nul", runtime="echo", path="/m", description="a\0b")
    registry.remove(OPERATOR, "digits")
    assert [r.name for r in seen.list()] == ["echo"]
    assert gateway.revision() == 5


def test_two_gateways_publish_model_states_at_once(
    open_database: Callable[[], Database],
) -> None:
    boards = [StatusBoard(open_database(), f"gw{index}") for index in range(2)]
    since = datetime(2026, 12, 1, tzinfo=UTC)

    def publish(board: StatusBoard, index: int) -> Callable[[], None]:
        def run() -> None:
            for step in range(30):
                state = "ready" if step % 2 else "loading"
                board.publish(
                    [PublishedStatus(f"m{n}", state, f"gw{index}\0", step, since) for n in range(4)]
                )

        return run

    run_threads(*(publish(board, i) for i, board in enumerate(boards)))
    # Each gateway keeps its own rows: neither overwrote nor deleted the other's.
    rows = boards[0].rows()
    assert sorted((r.gateway, r.name) for r in rows) == [
        (f"gw{g}", f"m{n}") for g in range(2) for n in range(4)
    ]
    assert all(r.detail == r.gateway and r.restarts == 29 for r in rows)
    states = boards[1].read()
    assert sorted(states) == ["m0", "m1", "m2", "m3"]
    assert {s.state for s in states.values()} == {"ready"}
    boards[1].clear()
    assert {r.gateway for r in boards[0].rows()} == {"gw0"}


def test_model_states_are_keyed_by_gateway_after_the_migration(database_url: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    db = Database(database_url)
    try:

        def migrate(step: Callable[[Config, str], None], target: str) -> None:
            with db.engine.begin() as conn:
                config.attributes["connection"] = conn
                step(config, target)

        old = {"state": "ready", "detail": None, "restarts": 0}
        at = {"since": datetime(2026, 12, 1, tzinfo=UTC), "updated_at": datetime.now(UTC)}
        migrate(command.upgrade, "0011")
        with db.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO model_status VALUES (:name, :state, :detail, "
                    ":restarts, :since, :updated_at)"
                ),
                {"name": "m", **old, **at},
            )
        migrate(command.upgrade, "0012")
        # The old rows were one gateway's live states, published again within seconds.
        with db.engine.begin() as conn:
            assert conn.execute(sa.select(model_status)).all() == []
            conn.execute(
                sa.insert(model_status),
                [{"gateway": gateway, "name": "m", **old, **at} for gateway in ("a", "b")],
            )
            key = sa.inspect(conn).get_pk_constraint("model_status")["constrained_columns"]
        assert key == ["gateway", "name"]
        migrate(command.downgrade, "0011")
        with db.engine.begin() as conn:
            key = sa.inspect(conn).get_pk_constraint("model_status")["constrained_columns"]
        assert key == ["name"]
        migrate(command.upgrade, "head")
        assert db.schema_revision() == head_revision()
    finally:
        db.close()


def test_two_gateways_write_risk_scores_and_blocks_at_once(
    open_database: Callable[[], Database],
) -> None:
    boards = [RiskBoard(open_database(), MemoryEventSink()) for _ in range(2)]
    at = datetime(2026, 12, 1, tzinfo=UTC)

    def report(board: RiskBoard, index: int) -> Callable[[], None]:
        def run() -> None:
            for step in range(20):
                records = [
                    RiskRecord(key, "m", "acme", 0.1 * step, "alert", step)
                    for key in ("k1", "k2", "k3", SSO_USER)
                ]
                if index == 1 and step == 10:
                    records.append(
                        RiskRecord(
                            "k2", "m", "acme", 2.0, "block", 99, blocked_at=at, new_block=True
                        )
                    )
                # One gateway lists them the other way round: no deadlock.
                board.record(records if index else records[::-1])

        return run

    run_threads(*(report(board, i) for i, board in enumerate(boards)))
    rows = {r.key_id: r for r in boards[0].read()}
    assert set(rows) == {"k1", "k2", "k3", SSO_USER}
    assert rows["k2"].blocked and rows["k2"].level == "block"
    assert not rows["k1"].blocked and rows[SSO_USER].queries == 19
    blocked, present = boards[1].pairs()
    assert blocked == {("k2", "m")} and len(present) == 4
    assert boards[0].clear(OPERATOR, "k2") == 1


def test_watermark_records_and_overrides(open_database: Callable[[], Database]) -> None:
    db = open_database()
    marks = MarksStore(db, retention_days=1)
    old = datetime.now(UTC) - timedelta(days=2)
    marks.add(
        [
            SealedRecord("m", SSO_USER, "acme", "marks", 10, 3, b"\0\xff" * 100),
            SealedRecord("m", "k1", "acme", "controls", 10, 1, b"sealed", created_at=old),
        ]
    )
    assert [r.blob for r in marks.read("m", SSO_USER)] == [b"\0\xff" * 100]
    assert marks.expire() == 1
    assert [r.kind for r in MarksStore(open_database()).read("m")] == ["marks"]
    overrides = OverrideStore(db, MemoryEventSink())
    overrides.set(OPERATOR, "tenant", "acme", "*", {"output": "label_only"})
    overrides.set(OPERATOR, "key", "k1", "m", {"watermark": "off", "output": "full"})
    table = OverrideStore(open_database(), MemoryEventSink()).table()
    assert table.resolve("acme", "k1", "m") == {
        "protect.output": "full",
        "protect.watermark": "off",
    }
    with pytest.raises(InvalidRequest):
        overrides.set(OPERATOR, "key", "k\0", "m", {"output": "label_only"})


def test_gateways_starting_together_make_one_current_ohttp_key_per_kem(
    open_database: Callable[[], Database],
) -> None:
    keyring = KeyRing(LocalKek(os.urandom(32)))
    stores = [OhttpKeyStore(open_database(), keyring, MemoryEventSink()) for _ in range(4)]
    created: list[list[OhttpKeyInfo]] = []
    run_threads(*(lambda s=s: created.append(s.ensure_current("system")) for s in stores))
    # One gateway made both keys (the hybrid and X25519); the others found them.
    assert sorted(len(c) for c in created) == [0, 0, 0, 2]
    first = stores[0].active()
    assert [(k.info.state, k.info.kem) for k in first] == [
        ("current", "mlkem768-x25519"),
        ("current", "x25519"),
    ]
    [rotated] = stores[1].rotate("op", timedelta(hours=1), first[1].info.kem_id)
    active = stores[2].active()
    assert [k.info.key_id for k in active] == [
        first[0].info.key_id,
        rotated.key_id,
        first[1].info.key_id,
    ]
    # The private keys open from what the other gateway stored.
    assert [k.key.private_key.to_bytes() for k in (active[0], active[2])] == [
        k.key.private_key.to_bytes() for k in first
    ]
    assert stores[3].rewrap_all() == 3
    assert [k.info.fingerprint for k in stores[0].active()] == [k.info.fingerprint for k in active]
