"""Bastion's own supply chain: what is installed is exactly the hash-locked set, and no
installed package ships a ``.pth`` file that runs code at every interpreter start (the
vector of the LiteLLM 1.82.8 release: a ``.pth`` that stole credentials)."""

from __future__ import annotations

import re
import site
import sysconfig
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"

# The .pth files the locked set installs, and what each may hold (the whole text).
EXPECTED_PTH = {
    # setuptools' shim choosing its own distutils: an import line, exactly this one.
    "distutils-precedence.pth": (
        "import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os.environ.get(var, 'local') "
        "== 'local'; enabled and __import__('_distutils_hack').add_shim(); "
    ),
}
# Bastion installed in place: one line, the path of its source tree.
EDITABLE = re.compile(r"__editable__\.bastion-[0-9.]+\.pth")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of every requirement in the lock."""
    found: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text()):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
            found[_normal(match.group(1))] = (match.group(2), hashes)
    return found


def _site_dirs() -> set[Path]:
    return {Path(p) for p in (*site.getsitepackages(), sysconfig.get_paths()["purelib"])}


def test_no_installed_package_ships_an_unexpected_pth_file() -> None:
    pth_files = sorted(p for d in _site_dirs() for p in d.glob("*.pth"))
    assert pth_files, "the virtual environment has no site-packages .pth at all?"
    for path in pth_files:
        text = path.read_text()
        if EDITABLE.fullmatch(path.name):
            assert text.strip() == str(ROOT / "src"), (path, text)
            continue
        assert path.name in EXPECTED_PTH, f"unexpected {path} (it runs at every start): {text!r}"
        assert text.strip() == EXPECTED_PTH[path.name].strip(), (path, text)


def test_every_pth_file_a_distribution_records_is_one_we_expect() -> None:
    # Also those a package would install elsewhere (a .pth in its data files, say).
    for dist in metadata.distributions():
        for file in dist.files or ():
            if file.name.endswith(".pth") and not EDITABLE.fullmatch(file.name):
                assert file.name in EXPECTED_PTH, (dist.metadata["Name"], str(file))


def test_what_is_installed_is_exactly_the_hash_locked_set() -> None:
    locked = _locked()
    assert len(locked) > 100
    for name, (_, hashes) in locked.items():
        assert hashes, f"{name} is locked without a hash"
        assert all(len(h) == 64 for h in hashes)
    installed = {
        _normal(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if _normal(d.metadata["Name"]) != "bastion"
    }
    assert installed == {name: version for name, (version, _) in locked.items()}


def test_the_lock_holds_every_pin_of_pyproject() -> None:
    locked = _locked()
    pins = re.findall(
        r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', (ROOT / "pyproject.toml").read_text()
    )
    assert len(pins) > 30
    for name, version in pins:
        got = locked[_normal(name)][0]
        # A local build label (torch's +cpu) satisfies a pin without one.
        assert got.split("+")[0] == version, (name, version, got)
