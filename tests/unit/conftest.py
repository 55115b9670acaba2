"""Fixtures shared by unit tests: a migrated SQLite database and an in-memory event sink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.audit.events import MemoryEventSink
from bastion.store.db import Database


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'bastion.db'}")
    database.migrate()
    yield database
    database.close()


@pytest.fixture
def events() -> MemoryEventSink:
    return MemoryEventSink()
