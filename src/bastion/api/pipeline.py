"""What the inference routes need from whoever serves them: the :class:`Pipeline`.

The gateway is one pipeline. The worker that opens an end-to-end encrypted (OHTTP) request
is another: it runs the very same route code on the decrypted inner request, so that
validation, limits and answers are identical whether a request came in plaintext or
sealed. Routes that only the gateway serves (admin, model listing) use the gateway itself.

The caller and the admission ticket are the pipeline's own types: a route only hands them
back. So this contract (and the routes) import nothing of identities or quotas, and the
worker that runs them stays free of the gateway's machinery.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol, TypeVar

from bastion.errors import InvalidRequest
from bastion.wire.protocol import FromWorker, ModelMetadata, RequestLimits, SizeLimits, WorkRequest


class Ticket(Protocol):
    """What the admission step needs of a pipeline's ticket (its hold on the quotas)."""

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The `x-ratelimit-*` headers for the answer."""
        ...

    def close(self) -> None:
        """The request is over (answered, failed or abandoned): settle. Idempotent."""
        ...


class Caller(Protocol):
    """What the admission step needs of a pipeline's caller: its tenant, for the log."""

    @property
    def tenant_name(self) -> str: ...


CallerT = TypeVar("CallerT", bound=Caller)
TicketT = TypeVar("TicketT", bound=Ticket)


class Pipeline(Protocol[CallerT, TicketT]):
    """Authenticate, authorize, admit, dispatch and account one inference request."""

    @property
    def limits(self) -> RequestLimits: ...

    async def authenticate(self, authorization: str | None) -> CallerT:
        """The caller of a request with this Authorization header, or 401."""
        ...

    def authorize(self, principal: CallerT, action: str, model: str | None = None) -> None: ...

    def require_model(self, name: str) -> None:
        """Raise ModelNotFound unless `name` is a model this pipeline serves."""
        ...

    def ready_model(self, name: str, capability: str | None) -> ModelMetadata:
        """The metadata of a ready model (503 otherwise) that offers `capability` (400)."""
        ...

    def size_limits(self, name: str) -> SizeLimits:
        """How big the model's requests and answers may be."""
        ...

    def admit(
        self,
        principal: CallerT,
        model: str,
        *,
        tokens: int = 0,
        request_bytes: int = 0,
        tokens_up_to: int | None = None,
    ) -> TicketT:
        """Admit a request estimated at `tokens` tokens (quotas), or raise 429/413."""
        ...

    async def call(self, model: str, message: WorkRequest, ticket: TicketT) -> FromWorker:
        """Send `message` and return its final reply; the pipeline accounts its usage."""
        ...

    def stream(
        self, model: str, message: WorkRequest, ticket: TicketT
    ) -> AsyncGenerator[FromWorker, None]:
        """Stream `message`'s replies; the pipeline accounts the usage of the work done,
        even when the caller stops reading before the end."""
        ...


def require_capability(name: str, metadata: ModelMetadata, capability: str) -> None:
    """Raise InvalidRequest unless the model `name` offers `capability`."""
    if capability not in metadata.capabilities:
        raise InvalidRequest(
            f"The model '{name}' does not support {capability}.",
            code="unsupported_operation",
            param="model",
        )


# What a route holds: some pipeline, whose caller and ticket it only passes back.
AnyPipeline = Pipeline[Any, Any]


def estimate_tokens(*texts: str) -> int:
    """A rough token count for a reservation: one token per 4 bytes of UTF-8, rounded up.

    The real count comes from the model's tokenizer in the worker and replaces this
    estimate when the request is settled.
    """
    return sum(-(-len(text.encode("utf-8", "surrogatepass")) // 4) for text in texts)
