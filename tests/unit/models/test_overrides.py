"""Protection overrides per tenant and key: resolution order, checks, events."""

from __future__ import annotations

import pytest

from bastion.audit.events import MemoryEventSink
from bastion.errors import InvalidRequest, NotFound, PermissionDenied
from bastion.identity.principal import OPERATOR, Principal
from bastion.models.overrides import Override, OverrideStore, OverrideTable
from bastion.store.db import Database


def test_a_key_overrides_its_tenant_and_a_model_overrides_every_model() -> None:
    table = OverrideTable(
        [
            Override("tenant", "acme", "*", {"output": "top_k=1,decimals=2", "watermark": "off"}),
            Override("tenant", "acme", "digits", {"output": "full"}),
            Override("key", "k1", "*", {"block_at": "off"}),
            Override("key", "k1", "digits", {"output": "label_only"}),
        ]
    )
    assert table.resolve("acme", "k1", "digits") == {
        "protect.output": "label_only",
        "protect.watermark": "off",
        "protect.block_at": "off",
    }
    assert table.resolve("acme", "k2", "digits")["protect.output"] == "full"
    assert table.resolve("acme", "k2", "other")["protect.output"] == "top_k=1,decimals=2"
    assert table.resolve("other", "k3", "digits") == {}


def test_the_store_checks_changes_and_records_them(db: Database) -> None:
    events = MemoryEventSink()
    store = OverrideStore(db, events)
    before = db.revision()
    store.set(OPERATOR, "key", "k1", "digits", {"output": "full", "block_at": "off"})
    assert db.revision() > before
    assert store.table().resolve("t", "k1", "digits") == {
        "protect.output": "full",
        "protect.block_at": "off",
    }
    # A setting back to the default; the last one gone, the override is gone.
    store.set(OPERATOR, "key", "k1", "digits", {"output": None})
    store.set(OPERATOR, "key", "k1", "digits", {"block_at": None})
    assert store.list() == []
    with pytest.raises(InvalidRequest, match="top_k"):
        store.set(OPERATOR, "key", "k1", "digits", {"output": "top_k=0"})
    with pytest.raises(InvalidRequest, match="cannot be set per tenant or key"):
        store.set(OPERATOR, "key", "k1", "digits", {"squeeze": "on"})
    with pytest.raises(InvalidRequest):
        store.set(OPERATOR, "team", "k1", "digits", {"output": "full"})
    consumer = Principal(key_id="c", tenant_id=1, tenant_name="t", role="consumer")
    with pytest.raises(PermissionDenied):
        store.set(consumer, "key", "c", "*", {"block_at": "off"})
    with pytest.raises(NotFound):
        store.remove(OPERATOR, "key", "k1", "digits")
    assert events.kinds() == ["protect.override_changed"] * 3
    assert [e.detail["kind"] for e in events.events] == ["key"] * 3
