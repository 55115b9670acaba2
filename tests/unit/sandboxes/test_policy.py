"""The seccomp allow-list shared by the bubblewrap and Docker backends."""

from __future__ import annotations

import json

from bastion.sandboxes import policy as seccomp


def test_the_allow_list_and_the_denied_calls_are_disjoint() -> None:
    allowed = set(seccomp.ALLOWED_SYSCALLS)
    assert not allowed & set(seccomp.DENIED_SYSCALLS)
    # What the issue found missing: io_uring and namespace creation are out.
    for name in ("io_uring_setup", "io_uring_enter", "unshare", "setns", "ptrace", "bpf"):
        assert name not in allowed
    for name in ("read", "write", "mmap", "futex", "openat", "connect", "getrandom"):
        assert name in allowed


def test_the_docker_profile_is_an_allow_list() -> None:
    profile = json.loads(seccomp.docker_profile())
    # Anything not listed fails with EPERM: Docker's own default, not a deny-list.
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1
    allowed = {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and "args" not in rule
        for name in rule["names"]
    }
    assert allowed == set(seccomp.ALLOWED_SYSCALLS)
    (clone,) = [r for r in profile["syscalls"] if r["names"] == ["clone"]]
    # clone() only without namespace flags (CLONE_NEWUSER among them).
    assert clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ" and clone["args"][0]["valueTwo"] == 0
    assert clone["args"][0]["value"] & 0x10000000
    (clone3,) = [r for r in profile["syscalls"] if r["names"] == ["clone3"]]
    assert clone3["action"] == "SCMP_ACT_ERRNO" and clone3["errnoRet"] == 38  # ENOSYS


def test_the_bpf_program_holds_a_rule_per_allowed_call() -> None:
    program = seccomp.bpf_program()
    # Classic BPF: 8 bytes per instruction; at least one per allowed call.
    assert len(program) % 8 == 0
    assert len(program) // 8 >= len(seccomp.ALLOWED_SYSCALLS)
