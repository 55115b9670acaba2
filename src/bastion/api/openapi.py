"""The OpenAPI 3.1 document, generated from the same msgspec schemas that validate requests.

Each listener's lists the routes it serves: a public listener's (BASTION_ADMIN_LISTEN set)
names no admin route or schema.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import msgspec

import bastion
from bastion.api import schemas
from bastion.api.serving import Serving

_BODIES: dict[tuple[str, str], type[Any]] = {
    ("/v1/chat/completions", "post"): schemas.ChatCompletionRequest,
    ("/v1/completions", "post"): schemas.CompletionRequest,
    ("/v1/embeddings", "post"): schemas.EmbeddingRequest,
    ("/v2/models/{name}/infer", "post"): schemas.OipInferRequest,
    ("/admin/v1/tenants", "post"): schemas.TenantCreate,
    ("/admin/v1/keys", "post"): schemas.KeyCreate,
    ("/admin/v1/quotas/{kind}/{subject}", "patch"): schemas.QuotaUpdate,
    ("/admin/v1/protection/models/{model}", "patch"): schemas.ProtectionUpdate,
    ("/admin/v1/protection/overrides/{kind}/{subject}/{model}", "patch"): (
        schemas.ProtectionUpdate
    ),
}

# Query parameters of the operations that take some: name -> description.
_QUERY: dict[tuple[str, str], dict[str, str]] = {
    ("/admin/v1/keys", "get"): {"tenant": "Only this tenant's keys"},
    ("/admin/v1/quotas", "get"): {"tenant": "Only this tenant's quotas and its keys'"},
    ("/admin/v1/usage", "get"): {
        "tenant": "One tenant (a tenant-admin: its own)",
        "model": "One model",
        "since": "A duration back from now (30m, 24h, 7d) or an ISO 8601 date (default 24h)",
        "until": "A duration back from now or an ISO 8601 date",
        "group": "total (default), day or hour",
    },
    ("/admin/v1/protection", "get"): {"tenant": "Only this tenant's keys' extraction risk"},
    ("/admin/v1/protection/keys/{key_id}", "delete"): {"model": "One model only"},
    ("/admin/v1/audit/records", "get"): {
        "after": "Only records after this sequence number (the last page's next_after)",
        "since_ms": "Only records at or after this time (Unix milliseconds)",
        "until_ms": "Only records before this time (Unix milliseconds)",
        "tenant": "One tenant (a tenant-admin: its own)",
        "limit": "At most this many records (default 100, at most 1000)",
    },
    ("/admin/v1/audit/checkpoints", "get"): {"after": "Only checkpoints larger than this"},
    ("/admin/v1/audit/proof", "get"): {
        "index": "The record's sequence number",
        "size": "The tree size (default: the latest checkpoint's)",
    },
}

_OPERATIONS: list[tuple[str, str, str, bool]] = [
    # path, method, summary, needs credentials
    ("/healthz", "get", "Liveness of the gateway process", False),
    ("/readyz", "get", "Readiness of the gateway", False),
    ("/metrics", "get", "Prometheus metrics (needs the metrics action)", True),
    ("/openapi.json", "get", "This document", True),
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
    ("/v2/models/{name}/versions/{version}", "get", "OIP model metadata (one version)", True),
    ("/v2/models/{name}/ready", "get", "OIP model readiness (200 ready, 400 not)", True),
    (
        "/v2/models/{name}/versions/{version}/ready",
        "get",
        "OIP model readiness (one version)",
        True,
    ),
    ("/v2/models/{name}/infer", "post", "OIP inference with JSON tensors", True),
    (
        "/v2/models/{name}/versions/{version}/infer",
        "post",
        "OIP inference (one version)",
        True,
    ),
    ("/admin/v1/tenants", "get", "List tenants", True),
    ("/admin/v1/tenants", "post", "Create a tenant", True),
    ("/admin/v1/tenants/{name}/disable", "post", "Disable a tenant and all its keys", True),
    ("/admin/v1/keys", "get", "List API keys (never their secrets)", True),
    ("/admin/v1/keys", "post", "Create an API key; the secret is shown once", True),
    ("/admin/v1/keys/{key_id}", "delete", "Revoke a key", True),
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
    (
        "/admin/v1/quotas/{kind}/{subject}",
        "put",
        "Set or clear limits (as PATCH: fields left out are kept)",
        True,
    ),
    ("/admin/v1/quotas/{kind}/{subject}", "delete", "Remove a quota", True),
    ("/admin/v1/usage", "get", "Metered usage, per tenant and model", True),
    (
        "/admin/v1/protection",
        "get",
        "Every model's protection policy and each key's extraction risk",
        True,
    ),
    (
        "/admin/v1/protection/models/{model}",
        "patch",
        "Change a model's protection policy (null: back to the default)",
        True,
    ),
    ("/admin/v1/protection/models/{model}", "put", "As PATCH", True),
    (
        "/admin/v1/protection/keys/{key_id}",
        "delete",
        "Lift a key's extraction block and forget its scores",
        True,
    ),
    (
        "/admin/v1/protection/overrides/{kind}/{subject}/{model}",
        "patch",
        "A tenant's (kind: tenants) or key's (kind: keys) own protection settings on a "
        "model (* for every model): output, monitor, alert_at, throttle_at, block_at, "
        "throttle_rps, watermark",
        True,
    ),
    ("/admin/v1/protection/overrides/{kind}/{subject}/{model}", "put", "As PATCH", True),
    (
        "/admin/v1/protection/overrides/{kind}/{subject}/{model}",
        "delete",
        "Remove a tenant's or key's protection override",
        True,
    ),
    (
        "/admin/v1/audit/records",
        "get",
        "Audit log records, oldest first (a tenant-admin: its tenant's); see docs/audit.md",
        True,
    ),
    ("/admin/v1/audit/checkpoints", "get", "Every signed checkpoint and the verifier key", True),
    (
        "/admin/v1/audit/checkpoint",
        "get",
        "The latest signed checkpoint, as a C2SP signed note (text/plain), for witnesses",
        True,
    ),
    ("/admin/v1/audit/proof", "get", "An RFC 9162 inclusion proof of one record", True),
    ("/admin/v1/audit/verify", "get", "The last verification of the audit log", True),
    ("/admin/v1/audit/verify", "post", "Verify the whole audit log now", True),
]

# The health probes: served by every listener, the admin one's too.
_PROBES = ("/healthz", "/readyz")

_PATH_PARAMETER = re.compile(r"{([a-z_]+)}")
_ERROR = {
    "type": "object",
    "description": 'OpenAI\'s error shape; the /v2 routes answer {"error": message}.',
    "properties": {
        "error": {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "code": {"type": ["string", "null"]},
                        "param": {"type": ["string", "null"]},
                    },
                },
                {"type": "string"},
            ]
        }
    },
}


def _operation(path: str, method: str, summary: str, secured: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": f"{method}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}",
        "summary": summary,
        "responses": {
            "200": {"description": "Success"},
            "default": {
                "description": "An error in the API's own shape (4xx for the request, 5xx "
                "for the server)",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAMETER.findall(path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "description": text,
         "schema": {"type": "string"}}
        for name, text in _QUERY.get((path, method), {}).items()
    ]  # fmt: skip
    if path == "/v1/ohttp":
        parameters.append(
            {
                "name": "Bastion-Model",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
            }
        )
        operation["requestBody"] = {
            "required": True,
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ("message/ohttp-req", "message/ohttp-chunked-req")
            },
        }
    if parameters:
        operation["parameters"] = parameters
    if not secured:
        operation["security"] = []
    else:
        operation["responses"].update(
            {
                "401": {"description": "Missing or invalid API key"},
                "403": {"description": "Key lacks the role, model or action"},
            }
        )
    return operation


def _served(path: str, serving: Serving) -> bool:
    """Whether a listener that serves `serving` answers `path` (api/app.py's routes_of)."""
    if serving is Serving.ALL:
        return True
    admin = path.startswith("/admin/")
    if serving is Serving.ADMIN:
        return admin or path in _PROBES
    return not admin


# Operations whose request body is another operation's.
_SAME_BODY = {
    ("/admin/v1/quotas/{kind}/{subject}", "put"): ("/admin/v1/quotas/{kind}/{subject}", "patch"),
    ("/v2/models/{name}/versions/{version}/infer", "post"): ("/v2/models/{name}/infer", "post"),
}


@functools.cache
def openapi_document(serving: Serving = Serving.ALL) -> dict[str, Any]:
    """The document of a listener that serves `serving`: its operations and their
    schemas, nothing of the other listener's."""
    bodies = {key: body for key, body in _BODIES.items() if _served(key[0], serving)}
    (body_schemas, components) = msgspec.json.schema_components(
        list(bodies.values()), ref_template="#/components/schemas/{name}"
    )
    refs = dict(zip(bodies.keys(), body_schemas, strict=True))
    for key, same in _SAME_BODY.items():
        if same in refs:
            refs[key] = refs[same]
    paths: dict[str, dict[str, Any]] = {}
    for path, method, summary, secured in _OPERATIONS:
        if not _served(path, serving):
            continue
        operation = _operation(path, method, summary, secured)
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
            "schemas": {**components, "Error": _ERROR},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
    }
