"""Host uids for workers: claimed one per worker, never shared, never root."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.errors import ConfigurationError
from bastion.sandboxes.uids import WorkerUids, grant_group_read


def test_each_claim_is_a_different_uid_above_the_base(tmp_path: Path) -> None:
    pool = WorkerUids(1_900_000_000, 3, lock_dir=tmp_path)
    claims = [pool.claim() for _ in range(3)]
    assert [c.uid for c in claims] == [1_900_000_001, 1_900_000_002, 1_900_000_003]
    assert all(c.gid == c.uid and c.group == 1_900_000_000 for c in claims)
    with pytest.raises(ConfigurationError, match="are in use"):
        pool.claim()
    claims[1].release()
    claims[1].release()  # idempotent
    assert pool.claim().uid == 1_900_000_002
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def test_two_gateways_never_share_a_uid(tmp_path: Path) -> None:
    mine = WorkerUids(1_900_000_000, 2, lock_dir=tmp_path).claim()
    # Another process (another gateway) holding the next one, through the same locks.
    code = (
        "import sys, time; from pathlib import Path;"
        "from bastion.sandboxes.uids import WorkerUids;"
        f"c = WorkerUids(1_900_000_000, 2, lock_dir=Path({str(tmp_path)!r})).claim();"
        "print(c.uid, flush=True); time.sleep(30)"
    )
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None
        theirs = int(other.stdout.readline())
        assert theirs != mine.uid
        with pytest.raises(ConfigurationError):
            WorkerUids(1_900_000_000, 2, lock_dir=tmp_path).claim()
    finally:
        other.kill()
        other.wait()
    # Its claim ended with its process.
    assert WorkerUids(1_900_000_000, 2, lock_dir=tmp_path).claim().uid == theirs


def test_ids_the_host_already_knows_are_skipped(tmp_path: Path) -> None:
    # 65534 is "nobody" (and its group) on every Debian system.
    pool = WorkerUids(65533, 2, lock_dir=tmp_path)
    assert pool.claim().uid == 65535


def test_a_range_reaching_root_or_beyond_2_31_is_refused(tmp_path: Path) -> None:
    for base, count in ((0, 10), (999, 1), (2**31 - 10, 20), (5000, 0)):
        with pytest.raises(ConfigurationError):
            WorkerUids(base, count, lock_dir=tmp_path)


def test_a_bundle_is_opened_to_the_workers_group_and_no_one_else(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "blobs").mkdir(parents=True, mode=0o700)
    bundle.chmod(0o700)
    (bundle / "bundle.json").write_text("{}")
    (bundle / "bundle.json").chmod(0o600)
    (bundle / "blobs" / "00000.enc").write_bytes(b"x")
    (bundle / "blobs" / "00000.enc").chmod(0o600)
    (bundle / "link").symlink_to("/etc/passwd")
    gid = os.getgid() if os.geteuid() != 0 else 1_900_000_000
    grant_group_read(bundle, gid)
    for path, mode in (
        (bundle, 0o750),
        (bundle / "blobs", 0o750),
        (bundle / "bundle.json", 0o640),
        (bundle / "blobs" / "00000.enc", 0o640),
    ):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == mode, path
        assert info.st_gid == gid
    # A link is left alone, and what it points at untouched.
    assert Path("/etc/passwd").stat().st_gid != gid or gid == os.getgid()
