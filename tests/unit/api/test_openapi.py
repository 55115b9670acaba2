"""The OpenAPI document: valid OpenAPI 3.1, and a faithful list of every route each
listener serves."""

from __future__ import annotations

import json
import re

import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from bastion.api.app import routes_of
from bastion.api.openapi import openapi_document
from bastion.api.serving import Serving


@pytest.mark.parametrize("serving", list(Serving))
def test_the_document_is_valid_openapi(serving: Serving) -> None:
    # Operations used path parameters they did not declare: code generators, Swagger UI
    # and schemathesis refused the document.
    validate(openapi_document(serving))


@pytest.mark.parametrize("serving", list(Serving))
def test_every_route_a_listener_serves_is_documented_and_nothing_else(serving: Serving) -> None:
    served = set()
    for route in routes_of(serving):
        assert isinstance(route, Route)
        if route.path.startswith("/console"):
            continue  # the admin console's pages (docs/console.md), not the API
        path = re.sub(r"{([a-z_]+):[a-z]+}", r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((path, method.lower()))
    documented = {
        (path, method)
        for path, item in openapi_document(serving)["paths"].items()
        for method in item
    }
    assert documented == served
    assert openapi_document() == openapi_document(Serving.ALL)


def test_the_public_listeners_document_reveals_no_admin_api() -> None:
    # docs/tls.md: split, the public listener does not say that the admin API is elsewhere.
    public = json.dumps(openapi_document(Serving.PUBLIC))
    assert "/admin" not in public
    for schema in ("TenantCreate", "KeyCreate", "QuotaUpdate", "ProtectionUpdate"):
        assert schema not in public
        assert schema in json.dumps(openapi_document(Serving.ADMIN))
    admin = openapi_document(Serving.ADMIN)["paths"]
    assert {"/healthz", "/readyz"} <= set(admin)
    assert not {"/metrics", "/openapi.json", "/v1/chat/completions"} & set(admin)


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
