"""kill -9 under load, of a gateway, of a worker replica and of a whole Ray worker node: no
request hangs, the rest keeps serving, and what was lost comes back.

Every request has a client timeout of 30 s: a hung request shows as "timeout". These
tests run last in the cluster suite (conftest.py); what they kill is brought back before
any test that follows.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from clusterlib import Cluster, Gateway, Load, complete, eventually, set_quota, tenant_key

from bastion_testing import worker_pids

pytestmark = pytest.mark.timeout(300)

RECOVERY_S = 120.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _worker_process(replica_pid: int) -> int:
    """The worker's own process (python -m bastion.worker.main) of a replica whose
    sandbox process is `replica_pid`."""
    found = worker_pids(replica_pid)
    return found[0] if found else replica_pid


def _replaced(gateway: Gateway, old: int) -> int:
    """Wait for the gateway to start a new replica of echo after `old`, and for it to be
    ready; its pid."""
    eventually(
        lambda: bool(gateway.worker_pids("echo")) and gateway.worker_pids("echo")[-1] != old,
        RECOVERY_S,
        f"{gateway.name} starts a new replica",
        interval=0.25,
    )
    gateway.wait_model("echo", "ready", timeout=RECOVERY_S)
    return gateway.worker_pids("echo")[-1]


def test_a_worker_replica_killed_under_load(healthy: Cluster) -> None:
    gw1 = healthy.gw1
    key, _ = tenant_key(gw1, "replica-kill")
    replica = gw1.worker_pids("echo")[-1]
    worker = _worker_process(replica)
    assert _alive(worker)
    with Load([gw1], key, threads=4) as load:
        time.sleep(1.5)
        os.kill(worker, signal.SIGKILL)
        new = _replaced(gw1, replica)
        time.sleep(1.0)
    print(f"replica {replica} (worker {worker}) replaced by {new}: {dict(load.outcomes)}")
    outcomes = load.outcomes["gw1"]
    # Every request ended: answered, or refused with 503 and Retry-After while the
    # replica was gone; none hung.
    assert set(outcomes) <= {"200", "503"}, outcomes
    assert outcomes["200"] > 10 and outcomes["503"] >= 1, outcomes
    assert load.slowest < 30
    assert _alive(_worker_process(new))
    assert complete(gw1, key).status_code == 200


def test_a_ray_worker_node_killed_under_load(healthy: Cluster) -> None:
    gw1, gw2 = healthy.gw1, healthy.gw2
    key, _ = tenant_key(gw1, "node-kill")
    eventually(lambda: complete(gw2, key).status_code == 200, 2, "the key works on gw2")
    replicas = {gw.name: gw.worker_pids("echo")[-1] for gw in (gw1, gw2)}
    nodes = healthy.ray.workers
    on = {
        name: {gw for gw, pid in replicas.items() if pid in node.pids()}
        for name, node in nodes.items()
    }
    # Host c's node, unless Ray placed both replicas on host b.
    victim = "c" if on["c"] else "b"
    survivor = "b" if victim == "c" else "c"
    lost = on[victim]
    assert lost, f"no replica on any worker node: {replicas}, {on}"
    with Load([gw1, gw2], key) as load:
        time.sleep(1.5)
        nodes[victim].kill()
        new = {gw.name: _replaced(gw, replicas[gw.name]) for gw in (gw1, gw2) if gw.name in lost}
        time.sleep(1.0)
    print(f"node {victim} held {sorted(lost)}; new replicas {new}: {dict(load.outcomes)}")
    for name, outcomes in load.outcomes.items():
        assert set(outcomes) <= {"200", "503"}, (name, outcomes)
        assert outcomes["200"] > 5, (name, outcomes)
    assert load.slowest < 30
    # The lost replicas were placed again, on the node that is left.
    survivors = set(nodes[survivor].pids())
    assert all(pid in survivors for pid in new.values()), (new, survivor)
    for gw in (gw1, gw2):
        assert complete(gw, key).status_code == 200


def test_a_gateway_killed_under_load(healthy: Cluster) -> None:
    gw1, gw2 = healthy.gw1, healthy.gw2
    key, _ = tenant_key(gw1, "gateway-kill")
    slow_key, _ = tenant_key(gw1, "gateway-kill-slots")
    set_quota(gw1, "tenants", "gateway-kill-slots", concurrent_requests=2)
    eventually(lambda: complete(gw2, key).status_code == 200, 2, "the key works on gw2")
    # Two slow requests of a tenant with 2 concurrent slots, in flight on gateway 2.
    slow_ends: list[str] = []

    def slow() -> None:
        started = time.monotonic()
        try:
            answer = complete(gw2, slow_key, prompt="__sleep__:25 slow", timeout=60)
            outcome = str(answer.status_code)
        except httpx.TimeoutException:
            outcome = "timeout"
        except httpx.TransportError:
            outcome = "connection"
        slow_ends.append(f"{outcome} after {time.monotonic() - started:.1f} s")

    slow_threads = [threading.Thread(target=slow) for _ in range(2)]
    with Load([gw1, gw2], key) as load:
        time.sleep(1.0)
        for thread in slow_threads:
            thread.start()
        time.sleep(2.0)
        assert load.total("gw2", "200") > 0
        # Both slots are taken (the limit is shared through Redis).
        held = complete(gw1, slow_key)
        assert held.status_code == 429, held.text
        assert held.json()["error"]["code"] == "concurrency_limit_exceeded"
        gw2.kill()
        killed = time.monotonic()
        served_before = load.total("gw1", "200")
        time.sleep(3.0)
        # Gateway 1 keeps serving.
        assert load.total("gw1", "200") > served_before + 5
    for thread in slow_threads:
        thread.join(60)
    print(f"outcomes: {dict(load.outcomes)}, slow requests: {slow_ends}")
    assert set(load.outcomes["gw1"]) == {"200"}, load.outcomes
    assert set(load.outcomes["gw2"]) <= {"200", "connection"}, load.outcomes
    assert load.slowest < 30, load.slowest
    # The requests in flight on the dead gateway ended with it, at once.
    assert len(slow_ends) == 2 and all(e.startswith("connection") for e in slow_ends), slow_ends
    # Its concurrency slots were leases in Redis: they expire, and the tenant gets them
    # back on gateway 1 without waiting for the 25 s requests.
    waited = eventually(
        lambda: complete(gw1, slow_key).status_code == 200,
        20,
        "the dead gateway's concurrency slots come back",
        interval=0.25,
    )
    assert time.monotonic() - killed < 20, waited
    # The database is fine: gateway 1 still writes to it and serves what it wrote.
    fresh, _ = tenant_key(gw1, "gateway-kill")
    assert complete(gw1, fresh).status_code == 200
