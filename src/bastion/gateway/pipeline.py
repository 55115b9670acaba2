"""What the inference routes need from whoever serves them: the :class:`Pipeline`.

The gateway is one pipeline. The worker that opens an end-to-end encrypted (OHTTP) request
is another: it runs the very same route code on the decrypted inner request, so that
validation, limits and answers are identical whether a request came in plaintext or
sealed. Routes that only the gateway serves (admin, model listing) use the gateway itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from bastion.config import Settings, SizeLimits
from bastion.errors import InvalidRequest
from bastion.identity.principal import Principal
from bastion.quotas.admission import Ticket
from bastion.supervision.channel import WorkRequest
from bastion.wire.protocol import FromWorker, ModelMetadata


class Pipeline(Protocol):
    """Authenticate, authorize, admit, dispatch and account one inference request."""

    @property
    def settings(self) -> Settings: ...

    def authenticate(self, authorization: str | None) -> Principal: ...

    def authorize(self, principal: Principal, action: str, model: str | None = None) -> None: ...

    def require_model(self, name: str) -> None:
        """Raise ModelNotFound unless `name` is a model this pipeline serves."""
        ...

    def ready_model(self, name: str, capability: str) -> ModelMetadata: ...

    def size_limits(self, name: str) -> SizeLimits:
        """How big the model's requests and answers may be."""
        ...

    def admit(
        self,
        principal: Principal,
        model: str,
        *,
        tokens: int = 0,
        request_bytes: int = 0,
        tokens_up_to: int | None = None,
    ) -> Ticket:
        """Admit a request estimated at `tokens` tokens (quotas), or raise 429/413."""
        ...

    async def call(self, model: str, message: WorkRequest, ticket: Ticket) -> FromWorker:
        """Send `message` and return its final reply; the pipeline accounts its usage."""
        ...

    def stream(self, model: str, message: WorkRequest, ticket: Ticket) -> AsyncIterator[FromWorker]:
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
