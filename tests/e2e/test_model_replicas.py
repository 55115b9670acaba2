"""A model served by several replicas: its options checked as it is registered, and each
replica shown by the admin API with its own worker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bastion_testing import BastionServer, add_echo_model, cli_json, run_cli


def _add(home: Path, name: str, option: str, *, check: bool = True) -> Any:
    return add_echo_model(home, name, options=(option,), check=check)


def test_bad_replica_options_are_refused_as_the_model_is_added(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    for option, named in (
        ("replicas=0", "replicas"),
        ("replicas=many", "replicas"),
        ("replicas=65", "replicas"),
        ("cpus=-1", "cpus"),
        ("gpus=some", "gpus"),
        ("memory=lots", "memory"),
    ):
        proc = _add(home, "echo", option, check=False)
        assert proc.returncode == 1, option
        assert f"The {named} option must be" in proc.stderr, (option, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert cli_json(home, "models", "list") == []


def test_each_replica_is_shown_with_its_own_worker(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_cli(home, "init", "--no-demo-models")
    _add(home, "echo", "replicas=2")
    server = BastionServer(home)
    try:
        server.wait_ready(["echo"], timeout=120)
        deadline = time.monotonic() + 60
        with server.admin_client() as admin:
            while True:
                view = admin.get("/admin/v1/models/echo").json()
                replicas = view["replicas"]
                # Published within a refresh of the change (BASTION_REFRESH_INTERVAL_S).
                published = [g["state"] for g in view["gateways"]]
                if (
                    all(r["state"] == "ready" for r in replicas) and published == ["ready"]
                ) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            chat = admin.post(
                "/v1/chat/completions",
                json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert chat.status_code == 200
        assert [r["state"] for r in replicas] == ["ready", "ready"], view
        pids = [r["pid"] for r in replicas]
        assert len(set(pids)) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids)
        assert all(r["in_flight"] == 0 and r["restarts"] == 0 for r in replicas)
        # The state this gateway published for the others sharing the database.
        assert [g["gateway"] for g in view["gateways"]] == [view["gateway"]]
        assert view["gateways"][0]["state"] == "ready" and not view["gateways"][0]["stale"]
        assert f":{server.port}-" in view["gateway"]
        listed = cli_json(home, "models", "list")[0]
        assert listed["state"] == "ready"
        assert [g["gateway"] for g in listed["gateways"]] == [view["gateway"]]
    finally:
        server.stop()
    # A gateway that stops clears what it published.
    assert cli_json(home, "models", "list")[0]["gateways"] == []
