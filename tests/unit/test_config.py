from __future__ import annotations

from pathlib import Path

import pytest

from bastion.config import Settings


def test_environment_then_overrides() -> None:
    env = {"BASTION_HOME": "/tmp/h", "BASTION_PORT": "9000", "BASTION_DEMO_MODELS": "false"}
    settings = Settings.load(env, port=9100, host=None)
    assert settings.home == Path("/tmp/h")
    assert settings.port == 9100
    assert settings.host == "127.0.0.1"
    assert settings.demo_models is False
    assert settings.db_url == "sqlite:////tmp/h/bastion.db"


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ValueError, match="BASTION_PORT"):
        Settings.load({"BASTION_PORT": "eighty"})


def test_defaults_are_secure() -> None:
    settings = Settings.load({})
    assert settings.host == "127.0.0.1"
    assert settings.max_body_bytes == 1024 * 1024


def test_home_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings.load({}).home == tmp_path / ".bastion"
    assert Settings.load({}, home=Path("rel")).home == tmp_path / "rel"


def test_extra_runtimes_are_name_module_pairs() -> None:
    settings = Settings.load({"BASTION_EXTRA_RUNTIMES": "mine=acme.runtime, other = x_y.z"})
    assert settings.runtime_modules() == {"mine": "acme.runtime", "other": "x_y.z"}
    assert Settings().runtime_modules() == {}
    for bad in ("mine", "mine=", "=acme", "mine=../acme", "mine=acme-runtime"):
        with pytest.raises(ValueError, match=r"name=python\.module"):
            Settings(extra_runtimes=bad).runtime_modules()
