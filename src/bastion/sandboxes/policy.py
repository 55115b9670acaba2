"""The confinement every sandbox backend applies: one policy, whatever the backend.

What a worker may read (:func:`runtime_paths`: the Python runtime and Bastion, read-only),
where it may write (:data:`WORKER_TMP`, a small private tmpfs), and the system calls it may
make: one allow-list for every backend.

Modelled on Docker's default seccomp profile (the calls an unprivileged container gets),
minus what Bastion denies on top: tracing and reading other processes, io_uring (a large
kernel surface that seccomp cannot look into), kernel keyrings, ``userfaultfd``, handle-based
opens, ``modify_ldt``, and anything that creates namespaces. A call that is not listed
fails with EPERM; ``clone3`` fails with ENOSYS, so that the C library falls back to
``clone``, whose flags seccomp can check.

The same list becomes a BPF program for bubblewrap (:func:`bpf_program`, through
libseccomp) and a profile for Docker (:func:`docker_profile`), so both backends refuse the
same calls.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The only place a worker may write: its own tmpfs, sized by the model's limits.
WORKER_TMP = "/tmp"  # noqa: S108 - the sandbox's own, private tmpfs


def runtime_paths(environ: Mapping[str, str]) -> list[Path]:
    """What a worker needs to run Python and Bastion, each as its real path."""
    import bastion

    paths = {Path(sys.base_prefix), Path(sys.prefix)}
    package = Path(bastion.__file__).resolve().parent
    if not any(package.is_relative_to(p.resolve()) for p in paths):
        # Installed in place (pip install -e): the source tree, not the whole checkout,
        # which may hold the home directory.
        paths.add(package.parent)
    for entry in environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and Path(entry).is_dir():
            paths.add(Path(entry))
    return sorted({p.resolve() for p in paths} | {p for p in paths if p.is_absolute()})


# Grouped by what they are for; names the running kernel or libseccomp does not know are
# skipped (architecture variants, calls newer than the library).
_FILES = (
    "access", "chdir", "chmod", "chown", "close", "close_range", "copy_file_range", "creat",
    "dup", "dup2", "dup3", "faccessat", "faccessat2", "fadvise64", "fallocate", "fchdir",
    "fchmod", "fchmodat", "fchown", "fchownat", "fcntl", "fdatasync", "fgetxattr",
    "flistxattr", "flock", "fremovexattr", "fsetxattr", "fstat", "fstatfs", "fsync",
    "ftruncate", "futimesat", "getcwd", "getdents", "getdents64", "getxattr", "inotify_add_watch",
    "inotify_init", "inotify_init1", "inotify_rm_watch", "lchown", "lgetxattr", "link",
    "linkat", "listxattr", "llistxattr", "lremovexattr", "lseek", "lsetxattr", "lstat",
    "mkdir", "mkdirat", "mknod", "mknodat", "newfstatat", "open", "openat", "openat2",
    "pread64", "preadv", "preadv2", "pwrite64", "pwritev", "pwritev2", "read", "readahead",
    "readlink", "readlinkat", "readv", "removexattr", "rename", "renameat", "renameat2",
    "rmdir", "sendfile", "setxattr", "splice", "stat", "statfs", "statx", "symlink",
    "symlinkat", "sync", "sync_file_range", "syncfs", "tee", "truncate", "umask", "unlink",
    "unlinkat", "utime", "utimensat", "utimes", "vmsplice", "write", "writev",
)  # fmt: skip
_MEMORY = (
    "brk", "madvise", "membarrier", "memfd_create", "mincore", "mlock", "mlock2", "mlockall",
    "mmap", "mprotect", "mremap", "msync", "munlock", "munlockall", "munmap", "pkey_alloc",
    "pkey_free", "pkey_mprotect", "remap_file_pages",
)  # fmt: skip
_PROCESSES = (
    "arch_prctl", "capget", "capset", "execve", "execveat", "exit", "exit_group", "fork",
    "get_robust_list", "get_thread_area", "getcpu", "getegid", "geteuid", "getgid",
    "getgroups", "getitimer", "getpgid", "getpgrp", "getpid", "getppid", "getpriority",
    "getrandom", "getresgid", "getresuid", "getrlimit", "getrusage", "getsid", "gettid", "getuid",
    "ioprio_get", "ioprio_set", "kill", "pidfd_open", "pidfd_send_signal", "prctl",
    "prlimit64", "restart_syscall", "rseq", "rt_sigaction", "rt_sigpending",
    "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_tgsigqueueinfo", "sched_get_priority_max", "sched_get_priority_min",
    "sched_getaffinity", "sched_getattr", "sched_getparam", "sched_getscheduler",
    "sched_rr_get_interval", "sched_setaffinity", "sched_setattr", "sched_setparam",
    "sched_setscheduler", "sched_yield", "seccomp", "set_robust_list", "set_thread_area",
    "set_tid_address", "setfsgid", "setfsuid", "setgid", "setgroups", "setitimer", "setpgid",
    "setpriority", "setregid", "setresgid", "setresuid", "setreuid", "setrlimit", "setsid",
    "setuid", "sigaltstack", "tgkill", "tkill", "vfork", "wait4", "waitid",
)  # fmt: skip
_TIME_AND_EVENTS = (
    "alarm", "clock_getres", "clock_gettime", "clock_nanosleep", "epoll_create",
    "epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_pwait2", "epoll_wait", "eventfd",
    "eventfd2", "futex", "futex_waitv", "gettimeofday", "nanosleep", "pause", "poll",
    "ppoll", "pselect6", "select", "signalfd", "signalfd4", "sysinfo", "time",
    "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime", "timer_settime",
    "timerfd_create", "timerfd_gettime", "timerfd_settime", "times", "uname",
)  # fmt: skip
_IPC_AND_SOCKETS = (
    "accept", "accept4", "bind", "connect", "getpeername", "getsockname", "getsockopt",
    "listen", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive", "mq_timedsend",
    "mq_unlink", "msgctl", "msgget", "msgrcv", "msgsnd", "pipe", "pipe2", "recvfrom",
    "recvmmsg", "recvmsg", "semctl", "semget", "semop", "semtimedop", "sendmmsg", "sendmsg",
    "sendto", "setsockopt", "shmat", "shmctl", "shmdt", "shmget", "shutdown", "socketpair",
    "io_cancel", "io_destroy", "io_getevents", "io_pgetevents", "io_setup", "io_submit",
    "ioctl",
)  # fmt: skip
ALLOWED_SYSCALLS: tuple[str, ...] = tuple(
    sorted({*_FILES, *_MEMORY, *_PROCESSES, *_TIME_AND_EVENTS, *_IPC_AND_SOCKETS})
)

# Refused although an unprivileged container may make them elsewhere: named here so that
# no one adds them to the list above by accident (a test checks the two are disjoint).
DENIED_SYSCALLS: tuple[str, ...] = (
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_getfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "mount",
    "umount2", "pivot_root", "chroot", "bpf", "keyctl", "add_key", "request_key", "unshare",
    "setns", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "perf_event_open", "userfaultfd", "open_by_handle_at", "name_to_handle_at", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "modify_ldt", "fanotify_init", "lookup_dcookie", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "mount_setattr", "landlock_create_ruleset",
    "memfd_secret", "vhangup",
)  # fmt: skip

# clone() may not create namespaces: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
# NEWPID and NEWNET. (The 0x80 CSIGNAL bits and thread flags stay free.)
CLONE_NAMESPACE_FLAGS = 0x7E020000
_AF_VSOCK = 40
# personality() values a program may ask for (Docker's list): Linux, and the flags that
# only change how addresses are laid out; 0xffffffff queries.
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


def bpf_program() -> bytes:
    """The allow-list as a classic BPF program (for ``bwrap --seccomp FD``)."""
    import pyseccomp

    program = pyseccomp.SyscallFilter(pyseccomp.ERRNO(errno.EPERM))
    for name in ALLOWED_SYSCALLS:
        _add(program, pyseccomp.ALLOW, name)
    _add(program, pyseccomp.ALLOW, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ,
         CLONE_NAMESPACE_FLAGS, 0))  # fmt: skip
    _add(program, pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    _add(program, pyseccomp.ALLOW, "socket", pyseccomp.Arg(0, pyseccomp.NE, _AF_VSOCK))
    for value in _PERSONALITIES:
        _add(program, pyseccomp.ALLOW, "personality", pyseccomp.Arg(0, pyseccomp.EQ, value))
    reader, writer = os.pipe()
    try:
        with os.fdopen(writer, "wb", closefd=False) as handle:
            program.export_bpf(handle)
        os.close(writer)
        writer = -1
        chunks = []
        while chunk := os.read(reader, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(reader)
        if writer >= 0:
            os.close(writer)


def docker_profile() -> str:
    """The allow-list as a Docker seccomp profile (JSON), replacing Docker's default."""
    rules: list[dict[str, Any]] = [
        {"names": list(ALLOWED_SYSCALLS), "action": "SCMP_ACT_ALLOW"},
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {
                    "index": 0,
                    "value": CLONE_NAMESPACE_FLAGS,
                    "valueTwo": 0,
                    "op": "SCMP_CMP_MASKED_EQ",
                }
            ],
        },
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": _AF_VSOCK, "op": "SCMP_CMP_NE"}],
        },
        *(
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}],
            }
            for value in _PERSONALITIES
        ),
    ]
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.EPERM,
        "syscalls": rules,
    }
    return json.dumps(profile)


def _add(program: Any, action: Any, name: str, *args: Any) -> None:
    try:
        program.add_rule(action, name, *args)
    except (OSError, ValueError, RuntimeError):
        # Not a system call of this architecture, or newer than this libseccomp.
        return
