"""The bubblewrap command line: what is mounted where, and in which order."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.workers import bwrap
from bastion.workers.bwrap import BwrapSandbox, WorkerLimits
from bastion.workers.sandbox import WorkerLaunch


def _argv(monkeypatch: pytest.MonkeyPatch, runtime: list[Path]) -> list[str]:
    monkeypatch.setattr(bwrap, "runtime_paths", lambda environ: runtime)
    launch = WorkerLaunch(
        worker_id="w",
        argv=["python", "-m", "bastion.workers.main"],
        ipc_dir=Path("/tmp/bastion-x/w"),
        model_dir=Path("/srv/home/bundles/m/1"),
    )
    sandbox = BwrapSandbox(WorkerLimits(tmp_bytes=1024))
    return sandbox._argv(launch, seccomp_fd=7)


def _mount_index(argv: list[str], option: str, target: str) -> int:
    for index in range(len(argv) - 1):
        if argv[index] == option and argv[index + 1 : index + 3][-1] == target:
            return index
    raise AssertionError(f"{option} {target} not in {argv}")


def test_everything_under_tmp_is_mounted_over_the_private_tmpfs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A checkout (and its venv) under /tmp, as in a CI clone: hidden by a later tmpfs.
    argv = _argv(monkeypatch, [Path("/tmp/clone/.venv"), Path("/tmp/clone/src")])
    tmpfs = argv.index("--tmpfs")
    assert argv[tmpfs + 1] == "/tmp" and argv[tmpfs - 2 : tmpfs] == ["--size", "1024"]
    for target in ("/tmp/clone/.venv", "/tmp/clone/src", "/srv/home/bundles/m/1"):
        assert _mount_index(argv, "--ro-bind", target) > tmpfs
    assert _mount_index(argv, "--bind", "/tmp/bastion-x/w") > tmpfs


def test_the_root_is_remounted_read_only_last_and_the_command_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = _argv(monkeypatch, [])
    end = argv.index("--")
    assert argv[end - 2 : end] == ["--remount-ro", "/"]
    assert argv[end + 1 :] == ["python", "-m", "bastion.workers.main"]
    assert argv[argv.index("--seccomp") + 1] == "7"
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-net", "--disable-userns"):
        assert flag in argv[:end]
    assert argv[argv.index("--cap-drop") : argv.index("--cap-drop") + 2] == ["--cap-drop", "ALL"]
    # Only the model's own directory is bound, read-only, and the worker's, writable.
    binds = [argv[i + 2] for i in range(end) if argv[i] in ("--bind", "--ro-bind")]
    assert "/srv/home/bundles/m/1" in binds and "/srv/home" not in binds


def test_the_seccomp_filter_denies_what_it_lists() -> None:
    program = bwrap.seccomp_program()
    # Classic BPF: 8 bytes per instruction; a rule per denied call and the arch checks.
    assert len(program) % 8 == 0
    assert len(program) // 8 >= len(bwrap.DENIED_SYSCALLS)
