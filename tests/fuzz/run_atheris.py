#!/usr/bin/env python3
"""Coverage-guided fuzzing of one parser (tests/fuzz/targets.py) with atheris (libFuzzer).

Usage: .venv/bin/python tests/fuzz/run_atheris.py TARGET [libFuzzer options] [CORPUS_DIR...]

For example, an hour on the Binary HTTP decoder, growing its corpus:
    .venv/bin/python tests/fuzz/run_atheris.py bhttp -max_total_time=3600 tests/fuzz/corpus/bhttp

A finding (an exception the parser should not raise) stops the run with a crash-* file
that reproduces it; the test suite runs a bounded pass of every target (see
tests/security/test_fuzzing.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["bastion"]):
    import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        names = ", ".join(sorted(targets.TARGETS))
        sys.exit(f"usage: run_atheris.py TARGET [libFuzzer options] [CORPUS...]; targets: {names}")
    target = targets.TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
