"""The exception tree, and the one place where exceptions map to HTTP statuses.

::

    BastionError                      500  every error Bastion raises on purpose
    ├── InvalidRequest                400  the request is malformed or out of range
    ├── AuthenticationError           401  no, malformed, unknown, expired or revoked credentials
    │   └── TokenRejected             401  a JWT bearer or ID token refused (identity/jwt.py)
    ├── PermissionDenied              403  valid credentials without the needed role/model/action
    ├── NotFound                      404  no such route, model, tenant or key
    │   ├── ModelNotFound             404
    │   └── OutOfScope                404  a tenant or key beyond a tenant admin's own
    ├── MethodNotAllowed              405
    ├── RequestTimeout                408  the client did not send its body in time
    ├── Conflict                      409  the resource exists or is in the wrong state
    ├── PayloadTooLarge               413  body over the configured limit
    ├── UnsupportedMediaType          415  the body is not JSON
    ├── RateLimited                   429  quotas: rate, concurrency, daily budgets
    │   └── AuthThrottled             429  too many failed sign-ins from an address or for a key
    ├── ModelUnavailable              503  model not loaded, loading, failed, or worker gone
    │   └── WorkerCrashed             503  the worker died while serving the request
    ├── StorageUnavailable            503  the database cannot be written now (disk full, locked)
    ├── LimiterUnavailable            503  Redis (shared rate limits, replay cache) unreachable
    ├── GatewayTimeout                504  the answer did not come before the deadline
    └── ConfigurationError            500  Bastion itself is set up wrongly (CLI: exit 2)

Every message is safe to show a client: it never contains a payload, a prompt, a key or a
secret. Lower-layer errors are translated with ``raise Ours(...) from exc``.
"""

from __future__ import annotations

from collections.abc import Mapping


class BastionError(Exception):
    """Base of every error Bastion raises on purpose."""

    status: int = 500
    # OpenAI's error "type" and a stable machine-readable "code".
    error_type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})


class InvalidRequest(BastionError):
    """The request is malformed, has a wrong type, or a value out of range."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationError(BastionError):
    """No credentials, malformed ones, or ones that are unknown, expired or revoked."""

    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    # Why it failed (a reason code of gateway/auth.py) and the key id it named, never the
    # secret: what the throttle of failed attempts counts (gateway/auth_throttle.py).
    # Neither reaches the client.
    reason: str | None = None
    key_id: str | None = None

    def __init__(self, message: str = "Invalid or missing API key.", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("www-authenticate", 'Bearer realm="bastion"')


class TokenRejected(AuthenticationError):
    """A JWT bearer token (or the console's ID token) that was refused. `reason` (a reason
    code of bastion.identity.jwt) is for audit events; the message is safe to show and
    never contains the token. `signed` is true when the token's signature had verified
    (expired, wrong audience, no tenant, ...); of those, the failures only the provider's
    tokens for this server meet (expired, not yet valid, a tenant unknown or disabled:
    identity/jwt.py's SIGNED_UNUSABLE_REASONS) are no guess, and the throttle of failed
    attempts does not count them."""

    code = "invalid_token"
    signed = False

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or "Invalid or missing bearer token.")
        self.reason = reason
        self.headers["www-authenticate"] = 'Bearer realm="bastion", error="invalid_token"'


class PermissionDenied(BastionError):
    """Valid credentials that lack the role, model or action the request needs."""

    status = 403
    error_type = "permission_error"
    code = "permission_denied"


class ExtractionSuspected(PermissionDenied):
    """The key's queries to a model look like an attempt to copy it: blocked until an
    admin clears it."""

    code = "extraction_suspected"


class NotFound(BastionError):
    """No such route, tenant or key."""

    status = 404
    error_type = "not_found_error"
    code = "not_found"


class ModelNotFound(NotFound):
    """The key could see this model, but no model has this name."""

    code = "model_not_found"


class OutOfScope(NotFound):
    """A tenant or key that a tenant-bound caller (a tenant's admin) may not manage, or
    that does not exist: the client gets exactly NotFound's answer (404, same code and
    message), so it cannot probe which tenants and keys exist. The layer that answers it
    (api/denials.py, the console's pages) records it as a refused escalation
    (``auth.denied``); the record is the same whether or not the target exists, since a
    tenant's admins read their tenant's audit records."""


class MethodNotAllowed(BastionError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(BastionError):
    """The client did not send the whole request body in time."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class Conflict(BastionError):
    """The resource already exists, or is in a state that forbids the change."""

    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(BastionError):
    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(BastionError):
    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(BastionError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class AuthThrottled(RateLimited):
    """Too many failed attempts to authenticate from this client address, or with this key
    id: refused for a while, without the key being checked where it cannot be valid. A
    request with a valid key is never refused so (gateway/auth_throttle.py)."""

    code = "auth_throttled"

    def __init__(
        self,
        message: str = "Too many failed authentication attempts: retry after Retry-After seconds.",
        *,
        retry_after_s: int = 1,
        **kwargs: object,
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("retry-after", str(max(1, retry_after_s)))


class ModelUnavailable(BastionError):
    """The model exists but cannot answer now; the client may retry later."""

    status = 503
    error_type = "server_error"
    code = "model_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("retry-after", str(max(1, retry_after_s)))


class WorkerCrashed(ModelUnavailable):
    """The worker serving the request died before answering."""

    code = "worker_crashed"


class StorageUnavailable(BastionError):
    """The database cannot be read or written now (its disk is full, another process holds
    its lock too long, its server is gone); nothing was changed, the client may retry."""

    status = 503
    error_type = "server_error"
    code = "storage_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("retry-after", str(max(1, retry_after_s)))


class LimiterUnavailable(BastionError):
    """Redis, which holds the rate limits and the OHTTP replay cache that gateways share,
    cannot be reached, and the failure policy is to refuse (``fail_closed``): the request
    was not served and took nothing; the client may retry."""

    status = 503
    error_type = "server_error"
    code = "limiter_unavailable"

    def __init__(
        self,
        message: str = "Rate limits cannot be checked now; retry shortly.",
        *,
        retry_after_s: int = 2,
        **kwargs: object,
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("retry-after", str(max(1, retry_after_s)))


class GatewayTimeout(BastionError):
    status = 504
    error_type = "server_error"
    code = "timeout"


class ConfigurationError(BastionError):
    """Bastion is set up wrongly (bad home directory, unreadable key file, ...)."""

    code = "configuration_error"
