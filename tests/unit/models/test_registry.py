"""The model registry: validation, CRUD, desired state, events and revision bumps."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bastion.audit.events import (
    MODEL_LOAD_REQUESTED,
    MODEL_REGISTERED,
    MODEL_UNLOAD_REQUESTED,
    PROTECT_POLICY_CHANGED,
    MemoryEventSink,
)
from bastion.errors import Conflict, InvalidRequest, ModelNotFound, PermissionDenied
from bastion.identity.principal import OPERATOR, Principal, validate_actions
from bastion.models.registry import ModelRegistry
from bastion.store.db import Database

pytestmark = pytest.mark.unit


@pytest.fixture
def registry(db: Database, events: MemoryEventSink) -> ModelRegistry:
    return ModelRegistry(db, events)


def _register(registry: ModelRegistry, name: str = "tiny-chat", **kw: Any) -> Any:
    args: dict[str, Any] = {
        "runtime": "echo",
        "path": "models/tiny-chat",
        "options": {"max_len": 64},
        "description": "A test model.",
    }
    args.update(kw)
    return registry.register(OPERATOR, name=name, **args)


def test_register_get_list(registry: ModelRegistry, db: Database, events: MemoryEventSink) -> None:
    record = _register(registry)
    assert record.desired_state == "loaded"
    assert registry.get("tiny-chat") == record
    assert record.options == {"max_len": 64}
    assert record.created_at.tzinfo is not None
    _register(registry, "digits", runtime="onnx", desired_state="unloaded")
    assert [r.name for r in registry.list()] == ["digits", "tiny-chat"]
    assert db.revision() == 2
    assert events.kinds() == [MODEL_REGISTERED, MODEL_REGISTERED]
    assert events.events[0].actor == "local-operator"
    assert events.events[0].target == "tiny-chat"
    json.dumps(record.to_dict())


def test_duplicates_conflict_unless_replace(registry: ModelRegistry) -> None:
    first = _register(registry)
    with pytest.raises(Conflict):
        _register(registry)
    replaced = _register(registry, path="models/other", replace=True)
    assert replaced.path == "models/other"
    assert replaced.created_at == first.created_at
    assert registry.get("tiny-chat").path == "models/other"


@pytest.mark.parametrize(
    "kw",
    [
        {"name": ""},
        {"name": "-leading-dash"},
        {"name": "has space"},
        {"name": "a" * 65},
        {"name": "../escape"},
        {"runtime": "pickle"},
        {"desired_state": "running"},
        {"path": ""},
        {"options": {"x": object()}},
        {"options": {"x": float("nan")}},
        {"options": {"blob": "x" * 70_000}},
        # A model may pick a sandbox backend, but only a real one, and never "none".
        {"options": {"sandbox": "podman"}},
        {"options": {"sandbox": "none"}},
        # How its replicas run: refused here rather than failing when the model starts.
        {"options": {"replicas": 0}},
        {"options": {"replicas": "two"}},
        {"options": {"replicas": 65}},
        {"options": {"cpus": -1}},
        {"options": {"gpus": "one"}},
        {"options": {"memory": "lots"}},
        {"description": "d" * 2001},
    ],
)
def test_validation(registry: ModelRegistry, db: Database, kw: dict[str, Any]) -> None:
    name = kw.pop("name", "valid.name_1")
    with pytest.raises(InvalidRequest):
        _register(registry, name, **kw)
    assert registry.list() == []
    assert db.revision() == 0


def test_desired_state(registry: ModelRegistry, db: Database, events: MemoryEventSink) -> None:
    _register(registry)
    unloaded = registry.set_desired_state(OPERATOR, "tiny-chat", "unloaded")
    assert unloaded.desired_state == "unloaded"
    assert registry.get("tiny-chat").desired_state == "unloaded"
    registry.set_desired_state(OPERATOR, "tiny-chat", "loaded")
    assert events.kinds()[-2:] == [MODEL_UNLOAD_REQUESTED, MODEL_LOAD_REQUESTED]
    assert db.revision() == 3
    with pytest.raises(InvalidRequest):
        registry.set_desired_state(OPERATOR, "tiny-chat", "paused")
    with pytest.raises(ModelNotFound):
        registry.set_desired_state(OPERATOR, "nope", "loaded")


def test_get_and_remove(registry: ModelRegistry) -> None:
    _register(registry)
    registry.remove(OPERATOR, "tiny-chat")
    with pytest.raises(ModelNotFound):
        registry.get("tiny-chat")
    with pytest.raises(ModelNotFound):
        registry.remove(OPERATOR, "tiny-chat")
    with pytest.raises(ModelNotFound):
        registry.get("not a valid name")


@pytest.mark.parametrize("role", ["consumer", "tenant-admin"])
def test_only_admins_change_the_registry(registry: ModelRegistry, role: str) -> None:
    _register(registry)
    principal = Principal(
        key_id="0123456789abcdef",
        tenant_id=1,
        tenant_name="acme",
        role=role,
        actions=validate_actions(role, None),
    )
    with pytest.raises(PermissionDenied):
        registry.register(principal, name="other", runtime="echo", path="p")
    with pytest.raises(PermissionDenied):
        registry.set_desired_state(principal, "tiny-chat", "unloaded")
    with pytest.raises(PermissionDenied):
        registry.remove(principal, "tiny-chat")
    assert registry.get("tiny-chat").desired_state == "loaded"


def test_the_hostile_test_runtime_is_not_a_runtime_of_bastion(
    db: Database, events: MemoryEventSink
) -> None:
    # It used to sit in the production table, where any admin could register it.
    with pytest.raises(InvalidRequest, match="Unknown runtime"):
        _register(ModelRegistry(db, events), "hostile", runtime="escape-test")
    # Only an operator's configuration (BASTION_EXTRA_RUNTIMES) adds a runtime.
    extended = ModelRegistry(db, events, extra_runtimes={"escape-test": "hostile_runtime"})
    assert _register(extended, "hostile", runtime="escape-test").runtime == "escape-test"
    # An extra runtime cannot replace a built-in one.
    shadowing = ModelRegistry(db, events, extra_runtimes={"onnx": "evil"})
    assert shadowing.runtimes["onnx"] == "bastion.runtimes.onnx"


def test_protection_is_set_and_reset_with_an_event(
    registry: ModelRegistry, db: Database, events: MemoryEventSink
) -> None:
    _register(registry, "digits", runtime="onnx")
    revision = db.revision()
    record = registry.set_protection(OPERATOR, "digits", {"protect.output": "full"})
    assert record.options["protect.output"] == "full" and record.options["max_len"] == 64
    assert registry.get("digits").options["protect.output"] == "full"
    assert db.revision() == revision + 1  # a running server sees the change
    event = events.events[-1]
    assert event.kind == PROTECT_POLICY_CHANGED and event.target == "digits"
    assert event.detail == {"protect.output": "full"}
    record = registry.set_protection(OPERATOR, "digits", {"protect.output": None})
    assert "protect.output" not in record.options
    assert events.events[-1].detail == {"protect.output": "default"}


def test_protection_changes_are_checked(registry: ModelRegistry) -> None:
    _register(registry, "digits", runtime="onnx")
    with pytest.raises(InvalidRequest, match="top_k"):
        registry.set_protection(OPERATOR, "digits", {"protect.output": "top_k=0"})
    with pytest.raises(InvalidRequest, match="Not a protection option"):
        registry.set_protection(OPERATOR, "digits", {"sandbox": "docker"})
    with pytest.raises(ModelNotFound):
        registry.set_protection(OPERATOR, "nope", {"protect.output": "full"})
    consumer = Principal(
        key_id="k", tenant_id=1, tenant_name="t", role="consumer",
        actions=validate_actions("consumer", None),
    )  # fmt: skip
    with pytest.raises(PermissionDenied):
        registry.set_protection(consumer, "digits", {"protect.output": "full"})
    assert "protect.output" not in registry.get("digits").options
