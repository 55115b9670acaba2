#!/usr/bin/env python3
"""Audit requirements.lock against known vulnerabilities with pip-audit, and say plainly
what could not be audited.

pip-audit asks a vulnerability service (PyPI's JSON API, or OSV) about each locked
package. Where it cannot reach one, it reports "no known vulnerabilities" while having
checked nothing; this says so instead.

Exit status: 1 if a locked package has a known vulnerability (each listed with its fix);
0 otherwise, with a notice of every package left unaudited, and a loud one when none
could be audited. With --strict, a package left unaudited is an error too (status 2).

Usage: .venv/bin/python scripts/audit_lock.py [--strict] [--service pypi|osv]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strict", action="store_true", help="unaudited packages fail")
    parser.add_argument("--service", default="pypi", choices=["pypi", "osv"])
    args = parser.parse_args()
    command = [
        sys.executable, "-m", "pip_audit", "--require-hashes", "--disable-pip",
        "--vulnerability-service", args.service, "--format", "json",
        "-r", str(ROOT / "requirements.lock"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        print(f"audit: pip-audit could not run against {args.service}: {reason}")
        print("audit: requirements.lock was NOT audited.")
        return 2 if args.strict else 0
    dependencies = report["dependencies"]
    vulnerable = [d for d in dependencies if d.get("vulns")]
    skipped = [d for d in dependencies if "skip_reason" in d]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions", [])) or "no fixed release"
            print(f"audit: {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixes})")
    audited = len(dependencies) - len(skipped)
    if skipped and not audited:
        print(
            f"audit: NOT AUDITED. The vulnerability service ({args.service}) answered for none "
            f"of the {len(dependencies)} locked packages (unreachable from here, or a mirror "
            "without vulnerability data): run `make audit` where it is reachable."
        )
    elif skipped:
        names = ", ".join(sorted(d["name"] for d in skipped))
        print(
            f"audit: {len(skipped)} package(s) not audited (not known to {args.service}): {names}"
        )
    if audited:
        print(f"audit: {audited} package(s) audited, {len(vulnerable)} with known vulnerabilities")
    if vulnerable:
        return 1
    return 2 if skipped and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
