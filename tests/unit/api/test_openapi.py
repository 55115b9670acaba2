"""The OpenAPI document: valid OpenAPI 3.1, and a faithful list of every route."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from bastion.api import admin, health, oip, openai, sealed
from bastion.api.openapi import openapi_document


def test_the_document_is_valid_openapi() -> None:
    # Operations used path parameters they did not declare: code generators, Swagger UI
    # and schemathesis refused the document.
    validate(openapi_document())


def test_every_route_is_documented_and_nothing_else() -> None:
    served = set()
    for route in [*sealed.routes, *oip.routes, *openai.routes, *health.routes, *admin.routes]:
        path = re.sub(r"{([a-z_]+):[a-z]+}", r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((path, method.lower()))
    documented = {
        (path, method) for path, item in openapi_document()["paths"].items() for method in item
    }
    assert documented == served


def test_path_parameters_are_declared_and_public_routes_need_no_key() -> None:
    for path, item in openapi_document()["paths"].items():
        names = set(re.findall(r"{([a-z_]+)}", path))
        for operation in item.values():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == names, path
    public = {
        path
        for path, item in openapi_document()["paths"].items()
        if any(op.get("security") == [] for op in item.values())
    }
    assert public == {
        "/healthz",
        "/readyz",
        "/v2/health/live",
        "/v2/health/ready",
        "/.well-known/ohttp-gateway",
    }
