"""The shape of the source tree: which package may import which.

The most important line in Bastion's design runs between the gateway and the sandboxed
worker process. What both sides speak lives in `bastion.wire`; the worker process
(`bastion.worker`) imports that, the model runtimes, crypto and the route contract, and never
the gateway's own machinery. These tests read every module's imports (function-level ones
too; `if TYPE_CHECKING:` blocks are skipped, they never run) and fail when an import runs
against the layering, so the layout cannot decay silently.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "bastion"

# Each package (or top-level module) of `bastion`, and the Bastion packages it may import.
# "bastion" is the package itself (its __version__, or its location on disk).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "wire": {"errors"},
    "crypto": {"errors", "wire"},
    "runtimes": {"errors", "wire"},
    "protection": {"errors", "wire"},
    "store": {"errors"},
    # The audit log keeps its records in the database and its signing key in the key ring.
    "audit": {"errors", "store", "crypto"},
    "config": {"errors", "wire"},
    "observability": {"errors", "audit"},
    "client": {"errors", "wire", "crypto"},
    "sandboxes": {"bastion", "errors", "config"},
    "supervision": {"errors", "config", "wire", "sandboxes", "audit", "observability"},
    # Workers on a cluster's nodes: the CA (crypto, kept in the store), the node's own
    # sandbox, and the gateway's worker port (supervision).
    "cluster": {"errors", "config", "wire", "crypto", "store", "sandboxes", "supervision"},
    "identity": {"errors", "store", "audit"},
    "quotas": {"errors", "store", "audit", "identity"},
    "models": {
        "errors",
        # The batching settings a model's options may hold (bastion.wire.batching).
        "wire",
        "config",
        "crypto",
        "store",
        "audit",
        "identity",
        "runtimes",
        "sandboxes",
        "protection",
    },
    # The admin console (a web application over the admin API's services): what the API
    # may use, but never the worker process, the CLI, or the server's wiring (the API's app
    # factory imports the console, not the reverse).
    "console": {
        "errors",
        "wire",
        "config",
        "crypto",
        "store",
        "audit",
        "observability",
        "identity",
        "quotas",
        "models",
        "protection",
        "sandboxes",
        "supervision",
        "gateway",
        "api",
    },
    # The sandboxed process: what both sides share, the runtimes, crypto, the route contract
    # (bastion.api's inference routes), its log format and the bundle reader.
    "worker": {
        "errors",
        "wire",
        "crypto",
        "runtimes",
        "protection",
        "api",
        "observability",
        "models",
    },
}

# What must never be loaded into the worker process, however indirectly.
NEVER_IN_WORKER = (
    "bastion.gateway",
    "bastion.identity",
    "bastion.quotas",
    "bastion.store",
    "bastion.supervision",
    "bastion.sandboxes",
    "bastion.bootstrap",
    "bastion.server",
    "bastion.cli",
    "bastion.console",
    "bastion.config",
    # Of the models package, only the bundle reader (and the signatures it checks).
    "bastion.models.bundle.writer",
    "bastion.models.scan",
    "bastion.models.registry",
    "bastion.models.bundle_store",
    "bastion.models.demo",
    "sqlalchemy",
    "alembic",
    "uvicorn",
)

# Imports that still run against the layering, each with the issue that removes it. The
# tests fail when one is fixed and left here too: the list only shrinks.
KNOWN: dict[tuple[str, str], str] = {}


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, path: Path) -> set[str]:
    """Every module `module` imports when it runs, by absolute name."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            # `from bastion.x import y` may import the module bastion.x.y.
            found.update(f"{name}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


@cache
def _graph() -> dict[str, set[str]]:
    modules = dict(_modules())
    return {
        name: {m for m in _imported(name, path) if m in modules or not m.startswith("bastion")}
        for name, path in modules.items()
    }


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "bastion"


def _violations() -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    for module, imports in _graph().items():
        allowed = ALLOWED.get(_package(module))
        if allowed is None:
            continue
        for target in imports:
            if not target.startswith("bastion"):
                continue
            other = _package(target)
            if other != _package(module) and other not in allowed:
                found[(module, target)] = f"{_package(module)} may not import {other}"
    return found


def test_every_package_imports_only_what_its_layer_allows() -> None:
    found = _violations()
    new = {edge: why for edge, why in found.items() if edge not in KNOWN}
    assert not new, "imports against the layering:\n" + "\n".join(
        f"  {a} -> {b}: {why}" for (a, b), why in sorted(new.items())
    )


def test_the_list_of_known_exceptions_only_shrinks() -> None:
    fixed = set(KNOWN) - set(_violations())
    assert not fixed, f"fixed, remove from KNOWN: {sorted(fixed)}"


def _reachable(start: str, *, through_known: bool) -> set[str]:
    """Every module that importing `start` loads (Bastion's and others' top names); without
    `through_known`, as if the imports listed in KNOWN were gone."""
    graph, seen, todo = _graph(), set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        # Importing a.b.c runs the __init__ of a and a.b first.
        parents = [module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)]
        targets = [m for m in graph.get(module, ()) if through_known or (module, m) not in KNOWN]
        todo.extend(m for m in [*targets, *parents] if m in graph)
        seen.update(m for m in targets if m not in graph)
    return seen


def _forbidden(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == f or m.startswith(f + ".") for f in NEVER_IN_WORKER)}


def test_the_worker_process_never_loads_the_gateways_machinery() -> None:
    loaded = _forbidden(_reachable("bastion.worker.main", through_known=False))
    assert not loaded, f"the worker process loads {sorted(loaded)}"


def test_nothing_but_the_worker_process_imports_it() -> None:
    importers = sorted(
        module
        for module, imports in _graph().items()
        if _package(module) != "worker"
        and any(m.startswith("bastion.worker.") or m == "bastion.worker" for m in imports)
    )
    assert not importers, f"gateway-side modules import the worker process: {importers}"


def test_the_reader_sees_function_level_imports_and_skips_type_checking_ones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "probe.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from bastion.gateway.gateway import Gateway\n"
        "def f():\n    from bastion.store import db\n"
    )
    imported = _imported("bastion.wire.probe", path)
    assert {"bastion.store", "bastion.store.db"} <= imported
    assert not any(m.startswith("bastion.gateway") for m in imported)


def test_what_the_worker_really_loads_is_what_the_reading_says() -> None:
    # Not only the static reading: import the worker's entry point in a fresh interpreter.
    code = "import sys, bastion.worker.main\nprint('\\n'.join(sorted(sys.modules)))\n"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "bastion.worker.main" in loaded
    explained = _reachable("bastion.worker.main", through_known=True) - _reachable(
        "bastion.worker.main", through_known=False
    )
    # Third-party packages appear in the reading by the name imported, often the top one.
    bad = {m for m in _forbidden(loaded) if m not in explained and m.split(".")[0] not in explained}
    assert not bad, f"importing the worker loads {sorted(bad)}"


def test_no_hidden_parameters_on_the_request_path() -> None:
    # A request's context (caller, usage, limits) travels as values, never as ContextVars
    # that a callee reads behind its caller's back.
    users = sorted(
        module
        for module, imports in _graph().items()
        if _package(module) in ("api", "worker", "gateway") and "contextvars" in imports
    )
    assert not users, f"request-path modules importing contextvars: {users}"
