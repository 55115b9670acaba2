"""The parsers that face input, fuzzed: every committed seed, then a bounded coverage-guided
pass (atheris) per parser. Longer runs: tests/fuzz/run_atheris.py."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

from targets import TARGETS  # noqa: E402

# Per parser in the suite: at most this many inputs, or this many seconds.
RUNS = 200_000
SECONDS = 6


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_seed_is_parsed_or_refused_cleanly(name: str) -> None:
    seeds = sorted((FUZZ / "corpus" / name).iterdir())
    assert seeds, f"no seeds for {name}"
    for seed in seeds:
        TARGETS[name](seed.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_a_bounded_coverage_guided_pass_finds_nothing(name: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / name, corpus)
    # libFuzzer reads its RSS as the process's high-water mark, which Linux carries over
    # from the forking process (this test runner) through exec: allow 2 GiB on top of it.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    done = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "run_atheris.py"),
            name,
            f"-runs={RUNS}",
            f"-max_total_time={SECONDS}",
            "-max_len=65536",
            "-timeout=10",
            f"-rss_limit_mb={2048 + inherited_mb}",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS * 10 + 60,
    )
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash", "timeout")))
    assert done.returncode == 0 and not found, done.stderr[-3000:]
    # It did run: libFuzzer reports how many inputs it tried.
    assert "Done " in done.stderr or "DONE" in done.stderr, done.stderr[-500:]
