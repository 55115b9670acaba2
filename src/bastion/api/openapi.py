"""The OpenAPI 3.1 document, generated from the same msgspec schemas that validate requests."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

import bastion
from bastion.api import schemas

_BODIES: dict[tuple[str, str], type[Any]] = {
    ("/v1/chat/completions", "post"): schemas.ChatCompletionRequest,
    ("/v1/completions", "post"): schemas.CompletionRequest,
    ("/v1/embeddings", "post"): schemas.EmbeddingRequest,
    ("/v2/models/{name}/infer", "post"): schemas.OipInferRequest,
    ("/admin/v1/tenants", "post"): schemas.TenantCreate,
    ("/admin/v1/keys", "post"): schemas.KeyCreate,
    ("/admin/v1/quotas/{kind}/{subject}", "patch"): schemas.QuotaUpdate,
}

_OPERATIONS: list[tuple[str, str, str, bool]] = [
    # path, method, summary, needs credentials
    ("/healthz", "get", "Liveness of the gateway process", False),
    ("/readyz", "get", "Readiness of the gateway", False),
    ("/metrics", "get", "Prometheus metrics (needs the metrics action)", True),
    ("/v1/models", "get", "List the models this key may use", True),
    ("/v1/models/{model}", "get", "Describe one model", True),
    ("/v1/chat/completions", "post", "Chat completion (stream: true for server-sent events)", True),
    ("/v1/completions", "post", "Text completion", True),
    ("/v1/embeddings", "post", "Sentence embeddings", True),
    (
        "/.well-known/ohttp-gateway",
        "get",
        "OHTTP key configuration (application/ohttp-keys, RFC 9540)",
        False,
    ),
    (
        "/v1/ohttp",
        "post",
        "End-to-end encrypted request (message/ohttp-req or message/ohttp-chunked-req, "
        "header Bastion-Model); see docs/e2e-encryption.md",
        True,
    ),
    ("/v2/health/live", "get", "OIP server liveness", False),
    ("/v2/health/ready", "get", "OIP server readiness", False),
    ("/v2", "get", "OIP server metadata", True),
    ("/v2/models/{name}", "get", "OIP model metadata", True),
    ("/v2/models/{name}/ready", "get", "OIP model readiness (200 ready, 400 not)", True),
    ("/v2/models/{name}/infer", "post", "OIP inference with JSON tensors", True),
    ("/admin/v1/tenants", "get", "List tenants", True),
    ("/admin/v1/tenants", "post", "Create a tenant", True),
    ("/admin/v1/tenants/{name}/disable", "post", "Disable a tenant and all its keys", True),
    ("/admin/v1/keys", "get", "List API keys (never their secrets)", True),
    ("/admin/v1/keys", "post", "Create an API key; the secret is shown once", True),
    ("/admin/v1/keys/{key_id}/revoke", "post", "Revoke a key", True),
    ("/admin/v1/keys/{key_id}/rotate", "post", "Replace a key by a new one", True),
    ("/admin/v1/models", "get", "List models with their live state", True),
    ("/admin/v1/models/{name}", "get", "One model's live state", True),
    ("/admin/v1/models/{name}/load", "post", "Load a model", True),
    ("/admin/v1/models/{name}/unload", "post", "Unload a model", True),
    ("/admin/v1/quotas", "get", "List quotas (?tenant= for one tenant and its keys)", True),
    ("/admin/v1/quotas/{kind}/{subject}", "get", "One tenant's or key's quota", True),
    (
        "/admin/v1/quotas/{kind}/{subject}",
        "patch",
        "Set or clear limits of a tenant (kind: tenants; * for defaults) or key (kind: keys)",
        True,
    ),
    ("/admin/v1/quotas/{kind}/{subject}", "delete", "Remove a quota", True),
    (
        "/admin/v1/usage",
        "get",
        "Metered usage (?tenant=&model=&since=24h&until=&group=total|day|hour)",
        True,
    ),
]


@functools.cache
def openapi_document() -> dict[str, Any]:
    (body_schemas, components) = msgspec.json.schema_components(
        list(_BODIES.values()), ref_template="#/components/schemas/{name}"
    )
    refs = dict(zip(_BODIES.keys(), body_schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for path, method, summary, secured in _OPERATIONS:
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {"200": {"description": "Success"}},
        }
        if not secured:
            operation["security"] = []
        else:
            operation["responses"].update(
                {
                    "401": {"description": "Missing or invalid API key"},
                    "403": {"description": "Key lacks the role, model or action"},
                }
            )
        if (path, method) in refs:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(path, method)]}},
            }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Bastion", "version": bastion.__version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
    }
