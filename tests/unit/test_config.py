from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from bastion.config import ENVIRONMENT, SECTIONS, Settings


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


def test_every_setting_has_a_section_and_a_variable_that_sets_it() -> None:
    samples = {bool: ("yes", True), int: ("7", 7), float: ("2.5", 2.5), str: ("x", "x")}
    for name, variable in ENVIRONMENT.items():
        assert variable.section in SECTIONS, name
        assert variable.name == f"BASTION_{name.upper()}"
        current = getattr(Settings(), name)
        kind = bool if isinstance(current, bool) else type(current)
        if name == "home":
            assert Settings.load({variable.name: "/tmp/x"}).home == Path("/tmp/x")
            continue
        raw, value = samples.get(kind, ("x", "x"))
        assert getattr(Settings.load({variable.name: raw}), name) == value, name
    assert {f.name for f in dataclasses.fields(Settings)} == set(ENVIRONMENT)


def test_the_configuration_reference_is_current() -> None:
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "scripts"))
    try:
        from configuration_doc import render
    finally:
        sys.path.remove(str(root / "scripts"))
    documented = (root / "docs" / "configuration.md").read_text()
    assert documented == render(), "run scripts/configuration_doc.py > docs/configuration.md"


def test_the_docs_name_only_variables_that_exist() -> None:
    root = Path(__file__).resolve().parents[2]
    known = {v.name for v in ENVIRONMENT.values()}
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        unknown = set(re.findall(r"BASTION_[A-Z0-9_]+", doc.read_text())) - known
        assert not unknown, f"{doc.name} names {sorted(unknown)}"
