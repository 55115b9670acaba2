"""A process killed with SIGKILL while it audits heavily loses no committed record, and
the log it leaves verifies (and takes new records) afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bastion.audit.events import Event
from bastion.audit.log import AuditLog
from bastion.audit.verify import verify_log
from bastion.audit.writer import AuditWriter
from bastion.crypto.keyring import KeyRing, LocalKek
from bastion.store.db import Database

pytestmark = pytest.mark.integration

# The child: a server-like writer (background thread, group commit) fed as fast as it
# takes events; it prints how many records it knows are committed after each batch.
CHILD = r"""
import sys, time
from bastion.audit.events import Event
from bastion.audit.log import AuditLog
from bastion.audit.writer import AuditWriter
from bastion.crypto.keyring import KeyRing, LocalKek
from bastion.store.db import Database

db = Database(sys.argv[1])
writer = AuditWriter(
    AuditLog(db, KeyRing(LocalKek(bytes.fromhex(sys.argv[2]))), checkpoint_every=64),
    flush_interval_s=0.005,
)
writer.start_background()
i = 0
while True:
    for _ in range(200):
        writer.emit(Event(kind="auth.failed", outcome="failure", actor=f"k{i % 50}",
                          detail={"reason": "bad_secret", "n": i}))
        i += 1
    time.sleep(0.002)
    print(writer.written, flush=True)
"""


def test_kill_9_during_heavy_auditing_loses_no_committed_record(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bastion.db'}"
    db = Database(url)
    db.migrate()
    master = os.urandom(32)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, master.hex()],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    committed = 0
    deadline = time.monotonic() + 60
    while committed < 3000 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        committed = int(line)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert committed >= 3000, "the child did not get going"

    log = AuditLog(db, KeyRing(LocalKek(master)))
    records = log.records()
    assert len(records) >= committed
    assert [r.seq for r in records] == list(range(len(records)))
    verifier = log.own_verifier()
    assert verifier is not None
    report = verify_log(db, verifier)
    assert report.ok, report.problems
    assert report.checkpoints > 0
    # The log goes on where the dead process left it.
    writer = AuditWriter(log)
    writer.emit(Event(kind="server.started"))
    report = verify_log(db, verifier)
    assert report.ok and report.size == len(records) + 1
    assert report.unsigned == 0
