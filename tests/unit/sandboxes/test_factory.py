"""The sandbox factory: the server's backend, and the ones models ask for by option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bastion.config import Settings
from bastion.errors import ConfigurationError
from bastion.sandboxes.base import WorkerLaunch
from bastion.sandboxes.factory import Sandboxes
from bastion.sandboxes.unconfined import SubprocessSandbox


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def check(self) -> None:
        pass

    async def launch(self, launch: WorkerLaunch) -> Any:
        raise NotImplementedError


def test_a_model_option_picks_its_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []

    def fake_make(settings: Settings, environ: Any = None, *, backend: str | None = None) -> Any:
        assert backend is not None
        made.append(backend)
        return _Named(backend)

    monkeypatch.setattr("bastion.sandboxes.factory.make_sandbox", fake_make)
    sandboxes = Sandboxes(_Named("bwrap"), Settings())
    assert sandboxes.for_options({}) is sandboxes.default
    assert sandboxes.for_options({"sandbox": "bwrap"}) is sandboxes.default
    docker = sandboxes.for_options({"sandbox": "docker"})
    assert docker.name == "docker"
    # Set up once, then reused.
    assert sandboxes.for_options({"sandbox": "docker"}) is docker and made == ["docker"]
    assert sandboxes.names() == ["bwrap", "docker"]
    for wrong in ("none", "podman", 3):
        with pytest.raises(ConfigurationError, match="must be one of bwrap, docker"):
            sandboxes.for_options({"sandbox": wrong})


def test_a_model_may_ask_for_a_sandbox_on_a_server_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        "bastion.sandboxes.factory.make_sandbox",
        lambda settings, environ=None, *, backend=None: _Named(str(backend)),
    )
    sandboxes = Sandboxes(SubprocessSandbox(), Settings(unsafe_no_sandbox=True))
    assert sandboxes.for_options({"sandbox": "docker"}).name == "docker"
    assert sandboxes.for_options({}).name == "none"


def test_a_backend_that_cannot_run_fails_only_the_model_that_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    sandboxes = Sandboxes(_Named("bwrap"), Settings())
    with pytest.raises(ConfigurationError, match="needs a running Docker engine"):
        sandboxes.for_options({"sandbox": "docker"})
    assert sandboxes.names() == ["bwrap"]
