"""A process on a simulated host that is not a launched replica cannot connect to a
gateway's worker port, nor read anything from it: host c tries gateway 1's port (on host
a) with garbage, with TLS and no certificate, with a certificate of another CA, and with a
certificate of the cluster's own CA issued for a replica the gateway does not await."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from clusterlib import Cluster, complete, tenant_key

from bastion.cluster.authority import load_authority
from bastion.crypto.cluster_ca import ClusterAuthority, replica_key_and_request
from bastion.crypto.keyring import KeyRing, LocalKek
from bastion.crypto.master_key import load_or_create_master_key
from bastion.store.db import Database

pytestmark = pytest.mark.timeout(300)

PROBE = Path(__file__).with_name("worker_port_probe.py")
REFUSAL = "refused a connection to the worker port"


def _probe(cluster: Cluster, *args: str) -> dict[str, Any]:
    """Run the probe on host c against gateway 1's worker port."""
    import subprocess

    host, port = cluster.gw1.worker_port
    proc = subprocess.run(
        cluster.network["c"].command(sys.executable, str(PROBE), host, str(port), *args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _client_certificate(
    authority: ClusterAuthority, replica_id: str, folder: Path
) -> tuple[str, str]:
    """A replica's key (made here) and the certificate `authority` issues for it."""
    key_pem, request = replica_key_and_request(replica_id)
    issued = authority.issue_replica(request, replica_id, dt.timedelta(minutes=10))
    cert, key = folder / f"{replica_id}.crt", folder / f"{replica_id}.key"
    cert.write_bytes(issued.pem)
    key.touch(mode=0o600)
    key.write_bytes(key_pem)
    return str(cert), str(key)


def _cluster_authority(cluster: Cluster) -> ClusterAuthority:
    """The cluster CA, opened as a gateway opens it: from the shared database, with the
    key ring of the shared master key."""
    master_key, created = load_or_create_master_key(cluster.gw1.home / "master.key")
    assert not created
    db = Database(cluster.cli_env["BASTION_DATABASE_URL"])
    try:
        return load_authority(db, KeyRing(LocalKek(master_key)))
    finally:
        db.close()


def _refusals(cluster: Cluster) -> list[dict[str, Any]]:
    return [e for e in cluster.gw1.log_entries() if str(e.get("msg", "")).startswith(REFUSAL)]


def _nothing_read(result: dict[str, Any]) -> None:
    """The gateway sent nothing at all (not even a TLS alert) and closed the connection."""
    assert result["received"] == "", result
    assert result["end"] in ("closed", "reset") or result["end"].startswith("tls error"), result


def test_garbage_on_the_worker_port_gets_nothing_back(healthy: Cluster) -> None:
    before = len(_refusals(healthy))
    _nothing_read(_probe(healthy, "plain"))
    # It never got past TLS: the port's own refusal (after a handshake) is not reached.
    time.sleep(0.3)
    assert len(_refusals(healthy)) == before


def test_tls_without_a_client_certificate_is_refused(healthy: Cluster) -> None:
    before = len(_refusals(healthy))
    # In TLS 1.3 the client's side of the handshake ends before the server has checked
    # the client's certificate: the gateway's refusal shows as the connection closing.
    _nothing_read(_probe(healthy, "tls"))
    time.sleep(0.3)
    # The gateway's handshake failed: no connection was made to be refused afterwards.
    assert len(_refusals(healthy)) == before


def test_a_certificate_of_another_ca_is_refused(healthy: Cluster, tmp_path: Path) -> None:
    before = len(_refusals(healthy))
    stranger = ClusterAuthority.generate("Not the cluster CA")
    cert, key = _client_certificate(stranger, "intruder", tmp_path)
    _nothing_read(_probe(healthy, "tls", cert, key))
    time.sleep(0.3)
    assert len(_refusals(healthy)) == before


def test_a_cluster_certificate_for_a_replica_not_awaited_is_aborted(
    healthy: Cluster, tmp_path: Path
) -> None:
    before = len(_refusals(healthy))
    cert, key = _client_certificate(_cluster_authority(healthy), "not-awaited", tmp_path)
    result = _probe(healthy, "tls", cert, key)
    # The handshake succeeds (the certificate is the CA's), then the gateway drops the
    # connection at once: nothing is read, not even a byte of a frame.
    assert result["handshake"] == "completed", result
    _nothing_read(result)
    time.sleep(0.5)
    refusals = _refusals(healthy)[before:]
    assert refusals, "the gateway did not log the refusal"
    assert refusals[-1].get("peer") == healthy.network["c"].address, refusals
    # The gateway's own replica was not disturbed.
    token, _ = tenant_key(healthy.gw1, "intruders")
    assert complete(healthy.gw1, token).status_code == 200
