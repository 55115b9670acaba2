"""A migrated SQLite database and an identity service over it, for the identity tests."""

from __future__ import annotations

import pytest

from bastion.audit.events import MemoryEventSink
from bastion.identity.keys import KeyHasher
from bastion.identity.service import IdentityService
from bastion.store.db import Database


class FakeClock:
    """A settable clock (seconds since the epoch)."""

    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def hasher() -> KeyHasher:
    return KeyHasher(b"k" * 32)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(
    db: Database, hasher: KeyHasher, events: MemoryEventSink, clock: FakeClock
) -> IdentityService:
    return IdentityService(db, hasher, events, clock=clock)
