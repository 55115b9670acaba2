"""The bubblewrap command line: what is mounted where, in which order, and as whom."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from bastion.errors import ConfigurationError
from bastion.sandboxes import bwrap
from bastion.sandboxes.base import SubprocessWorker, WorkerLaunch
from bastion.sandboxes.bwrap import BwrapSandbox, WorkerLimits
from bastion.sandboxes.uids import WorkerUid, WorkerUids

LAUNCH = WorkerLaunch(
    worker_id="w",
    argv=["python", "-m", "bastion.worker.main"],
    ipc_dir=Path("/tmp/bastion-x/w"),
    model_dir=Path("/srv/home/bundles/m/1"),
)


@pytest.fixture()
def uids(tmp_path: Path) -> WorkerUids:
    return WorkerUids(1_900_000_000, 16, lock_dir=tmp_path / "locks")


def _argv(
    monkeypatch: pytest.MonkeyPatch,
    runtime: list[Path],
    uids: WorkerUids,
    user: WorkerUid | None = None,
) -> list[str]:
    monkeypatch.setattr(bwrap, "runtime_paths", lambda environ: runtime)
    sandbox = BwrapSandbox(WorkerLimits(tmp_bytes=1024), uids=uids)
    return sandbox._argv(LAUNCH, seccomp_fd=7, user=user)


def _mount_index(argv: list[str], option: str, target: str) -> int:
    """Where `option` mounts (or makes) `target`: binds name it second, the others first."""
    width = 2 if option.endswith("bind") else 1
    for index in range(len(argv) - width):
        if argv[index] == option and argv[index + width] == target:
            return index
    raise AssertionError(f"{option} {target} not in {argv}")


def test_everything_under_tmp_is_mounted_over_the_private_tmpfs(
    monkeypatch: pytest.MonkeyPatch, uids: WorkerUids
) -> None:
    # A checkout (and its venv) under /tmp, as in a CI clone: hidden by a later tmpfs.
    argv = _argv(monkeypatch, [Path("/tmp/clone/.venv"), Path("/tmp/clone/src")], uids)
    tmpfs = _mount_index(argv, "--tmpfs", "/tmp")
    assert argv[tmpfs - 4 : tmpfs] == ["--perms", "01777", "--size", "1024"]
    for target in ("/tmp/clone/.venv", "/tmp/clone/src", "/srv/home/bundles/m/1"):
        assert _mount_index(argv, "--ro-bind", target) > tmpfs
    # The worker's own directory is read-only too: nothing of the host's disk is writable.
    assert _mount_index(argv, "--ro-bind", "/tmp/bastion-x/w") > tmpfs
    assert "--bind" not in argv
    # The directories above each bind are made first, open to a worker that is not root.
    made = _mount_index(argv, "--dir", "/tmp/clone")
    assert argv[made - 2 : made] == ["--perms", "0755"]
    assert made > tmpfs and made < _mount_index(argv, "--ro-bind", "/tmp/clone/.venv")
    assert argv.count("/tmp/clone") == 1


def test_a_root_gateway_starts_the_worker_as_a_user_of_its_own(
    monkeypatch: pytest.MonkeyPatch, uids: WorkerUids
) -> None:
    user = uids.claim()
    argv = _argv(monkeypatch, [], uids, user)
    end = argv.index("--")
    # No user namespace (it could only map the worker onto root): setpriv drops to the
    # worker's uid, in the workers' group, with every capability set emptied.
    assert "--unshare-user" not in argv[:end]
    caps = argv[argv.index("--cap-drop") : argv.index("--cap-drop") + 8]
    assert caps == ["--cap-drop", "ALL"] + [
        x for c in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP") for x in ("--cap-add", c)
    ]
    command = argv[end + 1 :]
    assert command[0].endswith("setpriv")
    assert f"--reuid={user.uid}" in command and f"--regid={user.uid}" in command
    assert f"--groups={uids.group}" in command
    for dropped in ("--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"):
        assert dropped in command
    assert command[command.index("--") + 1 :] == ["python", "-m", "bastion.worker.main"]
    assert user.uid != 0 and user.uid > uids.group


def test_the_root_is_remounted_read_only_last_and_proc_sys_is_read_only(
    monkeypatch: pytest.MonkeyPatch, uids: WorkerUids
) -> None:
    argv = _argv(monkeypatch, [], uids)
    end = argv.index("--")
    assert argv[end - 2 : end] == ["--remount-ro", "/"]
    assert argv[end + 1 :] == ["python", "-m", "bastion.worker.main"]
    assert argv[argv.index("--seccomp") + 1] == "7"
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-net", "--disable-userns"):
        assert flag in argv[:end]
    assert argv[argv.index("--cap-drop") : argv.index("--cap-drop") + 2] == ["--cap-drop", "ALL"]
    # bubblewrap leaves /proc/sys writable to a root-mapped user: it is bound read-only.
    assert _mount_index(argv, "--ro-bind", "/proc/sys") > _mount_index(argv, "--proc", "/proc")
    # Only the model's own directory is bound, read-only, and the worker's.
    binds = [argv[i + 2] for i in range(end) if argv[i] in ("--bind", "--ro-bind")]
    assert "/srv/home/bundles/m/1" in binds and "/srv/home" not in binds
    assert _mount_index(argv, "--tmpfs", "/dev/shm") > _mount_index(argv, "--dev", "/dev")


def test_a_root_gateway_needs_worker_uids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ConfigurationError, match="range of worker uids"):
        BwrapSandbox(WorkerLimits())


@pytest.mark.parametrize(("status", "reported"), [(137, -9), (153, -25), (152, -24), (3, 3)])
def test_a_worker_killed_inside_bwrap_reports_its_signal_as_a_child_does(
    status: int, reported: int
) -> None:
    # bwrap exits with 128 + N when a signal N killed the worker it runs (as a shell does).
    async def exit_status() -> int:
        process = await asyncio.create_subprocess_exec(
            "sh", "-c", f"exit {status}", stdout=asyncio.subprocess.PIPE
        )
        return await SubprocessWorker(process, "w", signal_statuses=True).wait()

    assert asyncio.run(exit_status()) == reported
