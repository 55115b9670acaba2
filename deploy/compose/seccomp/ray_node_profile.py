"""Write the seccomp profile of a Ray node's container (ray-node.json beside this file).

A Ray node starts Bastion's workers inside bubblewrap, and bubblewrap needs a few calls
that a container runtime's default profile refuses to a process without CAP_SYS_ADMIN: it
makes a user namespace (``clone``/``unshare`` with namespace flags), mounts the sandbox's
file system (``mount``, ``umount2``, ``pivot_root``, ``chroot``) and names it
(``sethostname``). Rather than switch seccomp off for the whole container
(``seccomp=unconfined``), this profile is Bastion's own worker allow-list
(``bastion.sandboxes.policy``, itself Docker's default less what Bastion denies) with just
those calls added, and the NUMA memory-policy calls that allocators in Ray's processes may
make. The worker inside the sandbox still gets the stricter allow-list from bubblewrap.

    python deploy/compose/seccomp/ray_node_profile.py > deploy/compose/seccomp/ray-node.json

tests/unit/deploy/test_cluster_manifests.py checks that the file is what this writes.
"""

from __future__ import annotations

import json
from typing import Any

from bastion.sandboxes import policy

# What bubblewrap itself needs to build a sandbox as an unprivileged user.
BUBBLEWRAP_SYSCALLS = ("unshare", "mount", "umount2", "pivot_root", "chroot", "sethostname")
# Allowed by Docker's default profile, not by Bastion's worker list; harmless here.
RAY_SYSCALLS = ("get_mempolicy", "mbind", "set_mempolicy")


def profile() -> dict[str, Any]:
    """Bastion's worker profile, plus what bubblewrap and Ray's processes need."""
    base: dict[str, Any] = json.loads(policy.docker_profile())
    rules = []
    for rule in base["syscalls"]:
        if rule["names"] == ["clone"]:
            # bubblewrap clones into new namespaces: clone without a condition on its flags.
            rules.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW"})
        else:
            rules.append(rule)
    added = sorted(set(BUBBLEWRAP_SYSCALLS) | set(RAY_SYSCALLS))
    rules.append({"names": added, "action": "SCMP_ACT_ALLOW"})
    return {**base, "syscalls": rules}


if __name__ == "__main__":
    print(json.dumps(profile(), indent=1))
