"""The one way from an inference route to a model: authenticate → authorize → model → admit.

Every inference route is an :func:`inference` endpoint. It gets an :class:`Admission` for
its request, and can reach the model only through the :class:`Admitted` call that
:meth:`Admission.admit` hands back: routes never call a pipeline's ``admit``, ``call`` or
``stream`` themselves (``tests/unit/api/test_admission.py`` holds them to it). The
admitted call's ticket (its hold on the caller's quotas) is settled here: once its answer
has been sent, or when the route fails or the client leaves, whatever happens. Its
``x-ratelimit-*`` headers go on the answer, error answers included.

The steps run in this order, each at most once, whatever order a route asks for them in:
the caller is authenticated (401) before anything else, a route may check the model
(403/404) before it reads the body, and :meth:`Admission.admit` runs whatever has not run
yet, then the model's readiness (503) and capability (400), then the quotas (429/413).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import wraps
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from bastion.api.context import authenticate, pipeline_of
from bastion.api.pipeline import AnyPipeline
from bastion.errors import BastionError
from bastion.wire.protocol import FromWorker, ModelMetadata, WorkRequest

# The action name an encrypted request is checked under (see Admission.check_sealed).
SEALED = "sealed"

# Marks an endpoint built by `inference`, for the test that every inference route is one.
INFERENCE_MARK = "__bastion_inference__"


class Admitted:
    """An admitted call to one model: the only way a route reaches it."""

    __slots__ = ("_pipeline", "metadata", "model", "ticket")

    def __init__(
        self, pipeline: AnyPipeline, model: str, metadata: ModelMetadata | None, ticket: Any
    ) -> None:
        self._pipeline = pipeline
        self.model = model
        self.metadata = metadata
        self.ticket = ticket

    def call(self, message: WorkRequest) -> Awaitable[FromWorker]:
        """Send `message` to the model; await its final reply."""
        return self._pipeline.call(self.model, message, self.ticket)

    def stream(self, message: WorkRequest) -> AsyncGenerator[FromWorker, None]:
        """Send `message` and yield its replies as they come."""
        return self._pipeline.stream(self.model, message, self.ticket)


class Admission:
    """One request's way through the steps; see the module docstring."""

    __slots__ = (
        "_caller",
        "_checked_action",
        "_checked_model",
        "_metadata",
        "_state",
        "admitted",
        "pipeline",
        "request",
    )

    def __init__(self, request: Request) -> None:
        self.request = request
        # request.state's own dict: the access log's labels, the body's size.
        self._state: dict[str, Any] = request.scope.setdefault("state", {})
        self.pipeline = pipeline_of(request)
        self._caller: Any = None
        self._checked_action: str | None = None
        self._checked_model: str | None = None
        self._metadata: tuple[str | None, ModelMetadata] | None = None
        self.admitted: Admitted | None = None

    async def caller(self) -> Any:
        """The authenticated caller (401 otherwise); its tenant labels the access log."""
        if self._caller is None:
            self._caller = await authenticate(self.request, self.pipeline)
        return self._caller

    async def check(self, action: str, model: str | None = None) -> Any:
        """Authenticate, authorize `action` (on `model`), and check that the model exists."""
        caller = self._caller or await self.caller()
        self._authorize(caller, action, model)
        return caller

    async def check_sealed(
        self, model: str, authorize: Callable[[Any, str], list[str]]
    ) -> list[str]:
        """For an encrypted request, whose action the gateway cannot see: authenticate, and
        the inference actions the caller holds on `model` (`authorize`, the gateway's: 403
        if none); the model exists."""
        caller = await self.caller()
        actions = authorize(caller, model)
        self.pipeline.require_model(model)
        self._state["model"] = model
        self._checked_action, self._checked_model = SEALED, model
        return actions

    async def ready(self, action: str, model: str, capability: str | None) -> ModelMetadata:
        """The steps up to the model: it must be ready (503) and offer `capability` (400)."""
        caller = self._caller or await self.caller()
        self._authorize(caller, action, model)
        return self._ready(model, capability)

    async def admit(
        self,
        action: str,
        model: str,
        *,
        capability: str | None,
        tokens: int = 0,
        tokens_up_to: int | None = None,
    ) -> Admitted:
        """Every step not run yet, then admission against the caller's quotas, for a
        request estimated at `tokens` tokens (or up to `tokens_up_to` when they allow)."""
        if self.admitted is not None:
            raise RuntimeError("a request is admitted once")
        caller = self._caller or await self.caller()
        self._authorize(caller, action, model)
        metadata = self._ready(model, capability)
        ticket = self.pipeline.admit(
            caller,
            model,
            tokens=tokens,
            request_bytes=self._state.get("body_bytes", 0),
            tokens_up_to=tokens_up_to,
        )
        self.admitted = Admitted(self.pipeline, model, metadata, ticket)
        return self.admitted

    def close(self) -> None:
        """Settle the admitted call's hold on its quotas, if there is one. Idempotent."""
        if self.admitted is not None:
            self.admitted.ticket.close()

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The `x-ratelimit-*` headers of the admitted call (none before admission)."""
        return self.admitted.ticket.headers if self.admitted is not None else []

    def _authorize(self, caller: Any, action: str, model: str | None) -> None:
        if action == self._checked_action and model == self._checked_model:
            return
        self.pipeline.authorize(caller, action, model)
        if model is not None:
            self.pipeline.require_model(model)
            # Labelled only once known to exist: a client-chosen name must not reach logs
            # or metrics.
            self._state["model"] = model
        self._checked_action, self._checked_model = action, model

    def _ready(self, model: str, capability: str | None) -> ModelMetadata:
        known = self._metadata
        if known is not None and known[0] == capability:
            return known[1]
        metadata = self.pipeline.ready_model(model, capability)
        self._metadata = (capability, metadata)
        return metadata


Handler = Callable[[Request, Admission], Awaitable[Response]]


def inference(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """An inference route: `handler` gets the request's Admission; its ticket is settled
    once the answer is sent, or when the handler fails or the client leaves."""

    @wraps(handler)
    async def endpoint(request: Request) -> Response:
        admission = Admission(request)
        try:
            response = await handler(request, admission)
        except BastionError as exc:
            for name, value in admission.headers():
                exc.headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
            admission.close()
            raise
        except BaseException:
            admission.close()
            raise
        if admission.admitted is None:
            return response
        return Settled(response, admission)

    setattr(endpoint, INFERENCE_MARK, True)
    return endpoint


class Settled(Response):
    """An admitted call's answer: sent with its `x-ratelimit-*` headers, then settled.
    (api/fast.py sends `answer` itself, with the same headers, and settles as this does.)"""

    def __init__(self, answer: Response, admission: Admission) -> None:
        # Not Response.__init__: this only wraps `answer`, which has its own body.
        self.answer = answer
        self.admission = admission
        self.status_code = answer.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = self.admission.headers()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], *headers]}
            await send(message)

        try:
            # Without quota headers (no limits apply) the answer goes out as it is.
            await self.answer(scope, receive, send_with_headers if headers else send)
        finally:
            # The answer is sent, or abandoned (the client left): settle the reservation.
            self.admission.close()
