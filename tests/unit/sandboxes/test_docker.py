"""The Docker container spec, its image and seccomp profile, and choosing a backend per model."""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest

from bastion.config import Settings
from bastion.errors import ConfigurationError
from bastion.sandboxes import docker as docker_backend
from bastion.sandboxes.base import WorkerLaunch, check_readable
from bastion.sandboxes.docker import ContainerLimits, DockerSandbox, image_context
from bastion.sandboxes.factory import make_sandbox
from bastion.sandboxes.policy import ALLOWED_SYSCALLS, DENIED_SYSCALLS
from bastion.sandboxes.uids import WorkerUids

MiB = 1024 * 1024
LAUNCH = WorkerLaunch(
    worker_id="w1",
    argv=["python", "-m", "bastion.worker.main"],
    ipc_dir=Path("/tmp/bastion-x/w1"),
    model_dir=Path("/srv/home/bundles/m/1"),
)


def _spec(monkeypatch: pytest.MonkeyPatch, **limits: Any) -> dict[str, Any]:
    runtime = [Path("/opt/python"), Path("/tmp/clone/.venv"), Path("/usr/lib/python3")]
    monkeypatch.setattr(docker_backend, "runtime_paths", lambda environ: runtime)
    uids = WorkerUids(1_900_000_000, 4, lock_dir=_LOCKS)
    sandbox = DockerSandbox(ContainerLimits(**limits), client=object(), uids=uids)
    user = uids.claim()
    try:
        return sandbox.container_spec(LAUNCH, {"PATH": "/usr/bin", "SECRET": "no"}, user=user)
    finally:
        user.release()


_LOCKS = Path(tempfile.mkdtemp(prefix="bastion-test-uids-"))


def _mounts(spec: dict[str, Any]) -> dict[str, bool]:
    """Target -> read-only, of every bind mount."""
    binds = {}
    for mount in spec["mounts"]:
        assert mount["Type"] == "bind" and mount["Source"] == mount["Target"]
        binds[mount["Target"]] = mount["ReadOnly"]
    return binds


def test_the_container_has_no_network_no_capabilities_and_a_read_only_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = _spec(monkeypatch)
    assert spec["network_mode"] == "none"
    assert spec["read_only"] is True
    assert spec["cap_drop"] == ["ALL"] and "cap_add" not in spec
    assert "no-new-privileges" in spec["security_opt"]
    assert "privileged" not in spec and "pid_mode" not in spec and "volumes" not in spec
    uid, gid = (int(part) for part in spec["user"].split(":"))
    # A user of its own (a root gateway's), in the workers' group.
    assert 1_900_000_000 < uid <= 1_900_000_004 and gid == uid
    assert spec["group_add"] == ["1900000000"]
    assert spec["hostname"] == "bastion-worker"
    assert spec["command"] == LAUNCH.argv
    assert spec["labels"]["bastion.worker"] == "w1"
    # The worker's environment is built, never the gateway's passed through.
    assert "SECRET" not in spec["environment"]
    assert spec["environment"]["HOME"] == "/tmp"


def test_nothing_of_the_host_is_mounted_writable(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(monkeypatch)
    binds = _mounts(spec)
    # The worker's own directory (its socket) too: its only writable place is its tmpfs.
    assert [target for target, read_only in binds.items() if not read_only] == []
    assert binds["/tmp/bastion-x/w1"] is True
    assert "nosuid" in spec["tmpfs"]["/tmp"] and "nodev" in spec["tmpfs"]["/tmp"]
    # The runtime, the model's own directory and /usr, read-only; paths under /usr come
    # with /usr itself.
    for target in ("/usr", "/opt/python", "/tmp/clone/.venv", "/srv/home/bundles/m/1"):
        assert binds[target] is True
    assert "/usr/lib/python3" not in binds and "/srv/home" not in binds
    assert "/var/run/docker.sock" not in binds


def test_limits_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(
        monkeypatch,
        memory_bytes=512 * MiB,
        cpus=1.5,
        processes=64,
        open_files=100,
        file_bytes=MiB,
        tmp_bytes=8 * MiB,
    )
    assert spec["mem_limit"] == spec["memswap_limit"] == 512 * MiB
    assert spec["nano_cpus"] == 1_500_000_000
    assert spec["pids_limit"] == 64
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in spec["ulimits"]}
    assert ulimits == {"core": (0, 0), "nofile": (100, 100), "fsize": (MiB, MiB)}
    assert spec["tmpfs"]["/tmp"].startswith(f"size={8 * MiB},")
    assert spec["log_config"]["Type"] == "none"


def test_zero_means_no_limit_of_that_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(monkeypatch, memory_bytes=0, cpus=0, processes=0)
    assert "mem_limit" not in spec and "nano_cpus" not in spec and spec["pids_limit"] is None


def test_the_seccomp_profile_is_the_shared_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    option = next(o for o in _spec(monkeypatch)["security_opt"] if o.startswith("seccomp="))
    profile = json.loads(option.removeprefix("seccomp="))
    # Not Docker's default (which allows io_uring, for one), and not a deny-list.
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW"
        for name in rule["names"]
    }
    assert allowed >= set(ALLOWED_SYSCALLS)
    assert not allowed & set(DENIED_SYSCALLS)
    assert "io_uring_setup" not in allowed and "ptrace" not in allowed


def test_the_image_is_mount_points_only_and_its_tag_is_stable() -> None:
    context = image_context()
    assert context == image_context()
    with tarfile.open(fileobj=BytesIO(context)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        dockerfile = tar.extractfile("Dockerfile")
        assert dockerfile is not None and dockerfile.read().startswith(b"FROM scratch\n")
    files = [name for name, m in members.items() if m.isfile() and name != "Dockerfile"]
    assert files == []
    assert members["rootfs/tmp"].mode == 0o1777
    # No /etc/passwd, no shadow: the image holds nothing to read.
    assert "rootfs/etc/passwd" not in members


def test_without_worker_uids_the_container_runs_as_the_gateway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(docker_backend, "runtime_paths", lambda environ: [])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(os, "getgid", lambda: 1000)
    spec = DockerSandbox(client=object()).container_spec(LAUNCH, {})
    assert spec["user"] == "1000:1000" and spec["group_add"] == []
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ConfigurationError, match="range of worker uids"):
        DockerSandbox(client=object())


def test_an_owner_only_model_directory_is_refused_for_another_user(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir(mode=0o700)
    me, group = os.getuid(), os.getgid()
    check_readable(model, me, group)
    with pytest.raises(ConfigurationError, match="not readable by uid 1900000001"):
        check_readable(model, 1_900_000_001, 1_900_000_001, (1_900_000_000,))
    # Open to the workers' group, or to everyone: readable.
    os.chown(model, -1, 1_900_000_000)
    model.chmod(0o750)
    check_readable(model, 1_900_000_001, 1_900_000_001, (1_900_000_000,))
    with pytest.raises(ConfigurationError):
        check_readable(model, 1_900_000_001, 1_900_000_001)
    model.chmod(0o755)
    check_readable(model, 1_900_000_001, 1_900_000_001)


def test_docker_without_an_engine_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(ConfigurationError, match="needs a running Docker engine"):
        make_sandbox(Settings(sandbox="docker"))


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="known: bwrap, docker, none"):
        make_sandbox(Settings(sandbox="podman"))
