"""Every route that reaches a model goes through the one admission path (api/admission.py).

Two guards: each inference route is an `inference` endpoint, and no route module calls a
pipeline's admit/call/stream itself (only an Admitted call, which only admission makes).
That a route under a quota really is refused is tested against a real server
(tests/e2e/test_quotas.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from starlette.routing import Route

from bastion.api import admin, health, oip, openai, sealed
from bastion.api.admission import INFERENCE_MARK
from bastion.api.sealed_app import SEALED_PATHS

pytestmark = pytest.mark.unit

API = Path(__file__).resolve().parents[3] / "src" / "bastion" / "api"
INFERENCE_PATHS = {*SEALED_PATHS, "/v1/ohttp"}
# How a route module may call admit/call/stream: admission admits, an admitted call
# reaches the model (and a request's body may be read as a stream).
DISPATCH = {"admit", "call", "stream"}
ALLOWED = {
    ("admission", "admit"),
    ("admitted", "call"),
    ("admitted", "stream"),
    ("request", "stream"),
}


def _routes() -> list[Route]:
    every = [*sealed.routes, *oip.routes, *openai.routes, *health.routes, *admin.routes]
    return [r for r in every if isinstance(r, Route)]


def test_every_inference_route_is_an_admission_endpoint() -> None:
    found = {r.path for r in _routes() if r.path in INFERENCE_PATHS}
    assert found == INFERENCE_PATHS
    for route in _routes():
        marked = getattr(route.endpoint, INFERENCE_MARK, False)
        assert marked == (route.path in INFERENCE_PATHS), route.path


def _bypasses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "pipeline_of":
            found.append(f"{path.name}:{node.lineno} pipeline_of()")
        if isinstance(func, ast.Attribute) and func.attr in DISPATCH:
            receiver = func.value
            name = receiver.id if isinstance(receiver, ast.Name) else None
            if (name, func.attr) not in ALLOWED:
                found.append(f"{path.name}:{node.lineno} .{func.attr}() on {ast.unparse(receiver)}")
    return found


def test_no_route_reaches_a_model_around_admission() -> None:
    found = [
        bypass
        for path in sorted(API.glob("*.py"))
        if path.name not in ("admission.py", "context.py")
        for bypass in _bypasses(path)
    ]
    assert not found, found


def test_the_guard_sees_a_bypass(tmp_path: Path) -> None:
    route = tmp_path / "route.py"
    route.write_text(
        "async def infer(request):\n"
        "    gateway = pipeline_of(request)\n"
        "    ticket = gateway.admit(None, 'm')\n"
        "    return await gateway.call('m', None, ticket)\n"
    )
    assert len(_bypasses(route)) == 3
