"""The pipeline the inference routes see inside a worker, for decrypted (sealed) requests.

:class:`SealedPipeline` is the worker's model as a :class:`~bastion.api.pipeline.Pipeline`:
its limits (sent by the gateway), its metadata, and the runtime thread it hands jobs to.
:class:`SealedCall` is one request's view of it, carrying that request's context as values:
who sent it (the actions its key holds), where its usage is counted, the tokens the
gateway reserved for it, and whether it runs inline on the runtime thread. The sealed
server (:mod:`bastion.worker.sealed`) makes one per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    Callable,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

from bastion.api.pipeline import require_capability
from bastion.errors import InvalidRequest, ModelNotFound, PermissionDenied, RateLimited
from bastion.wire.protocol import (
    Caller,
    FromWorker,
    Infer,
    Message,
    ModelMetadata,
    RequestLimits,
    SealingKeys,
    SizeLimits,
    TextDelta,
    batch_size_of,
    compute_of,
    queued_of,
    usage_of,
)

# A job for the runtime thread: the request, and where its replies go (any thread).
Submit = Callable[[Any, Callable[[Message], None]], "JobHandle"]
# Runs an inner request on the calling thread, handing partial replies to the callback,
# and returns the final reply.
RunInline = Callable[[Any, Callable[[Message], None]], Message]


class JobHandle:
    """What the runtime thread's job exposes to the sealed side: a way to cancel it."""

    def __init__(self, cancel: Callable[[], None]) -> None:
        self.cancel = cancel


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compute_s: float = 0.0
    # Its inner jobs' waits in the worker's queue, and the largest batch one ran in.
    queue_s: float = 0.0
    batch_size: int = 1
    # Resolved when an inner job given up on (the sealed request was cancelled) has
    # reported what it did, so that the cancellation can carry its usage.
    outstanding: asyncio.Future[None] | None = None

    def add(self, reply: Message) -> None:
        prompt, completion = usage_of(reply)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.compute_s += compute_of(reply)
        self.queue_s += queued_of(reply)
        self.batch_size = max(self.batch_size, batch_size_of(reply))


@dataclass(frozen=True, slots=True)
class SealedCaller:
    """Who sent a sealed request, as far as the worker needs to know: the actions its key
    holds (the gateway authenticated it and checked the outer request)."""

    actions: frozenset[str]
    # The access log's tenant label; the gateway logs the real one for the outer request.
    tenant_name: str = "sealed"
    # The outer request's key, which the extraction monitor keeps a history of.
    identity: Caller | None = None

    def require_action(self, action: str) -> None:
        """Raise PermissionDenied unless the caller's key holds `action`."""
        if action not in self.actions:
            raise PermissionDenied(f"This API key is not allowed the '{action}' action.")


@dataclass(frozen=True, slots=True)
class SealedTicket:
    """An inner request's admission: it happened at the gateway, for the outer request,
    whose ticket the gateway settles and whose answer carries the quota headers."""

    model: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def close(self) -> None:
        """Nothing to settle here: the usage travels back beside the sealed answer."""


class SealedPipeline:
    """The :class:`~bastion.api.pipeline.Pipeline` for inner requests in a worker.

    The gateway already authenticated the caller and admitted the request; here the inner
    request may only use this worker's model and the actions the caller's key holds.
    """

    def __init__(
        self, model: str, submit: Submit, options: Mapping[str, Any] | None = None
    ) -> None:
        self.model = model
        self._submit = submit
        self._options = dict(options or {})
        self.metadata: ModelMetadata | None = None
        # Nothing is served before the gateway's SealingKeys (and its limits) arrive.
        self._limits: RequestLimits | None = None
        self._size_limits: SizeLimits | None = None

    @property
    def limits(self) -> RequestLimits:
        if self._limits is None:
            raise RuntimeError("a sealed request arrived before the gateway's limits")
        return self._limits

    def configure(self, keys: SealingKeys) -> None:
        self._limits = keys.request_limits
        self._size_limits = keys.size_limits.with_options(self._options)

    def size_limits(self, name: str) -> SizeLimits:
        if self._size_limits is None:
            raise RuntimeError("a sealed request arrived before the gateway's limits")
        return self._size_limits

    def authorize(self, principal: SealedCaller, action: str, model: str | None = None) -> None:
        principal.require_action(action)
        if model is not None and model != self.model:
            raise InvalidRequest(
                "The encrypted request names another model than the Bastion-Model header.",
                code="model_mismatch",
                param="model",
            )

    def require_model(self, name: str) -> None:
        if name != self.model:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")

    def ready_model(self, name: str, capability: str | None) -> ModelMetadata:
        self.require_model(name)
        if self.metadata is None:
            raise RuntimeError("a sealed request arrived before the model was ready")
        if capability is not None:
            require_capability(name, self.metadata, capability)
        return self.metadata

    def submit(self, message: Any, deliver: Callable[[Message], None]) -> JobHandle:
        """Hand `message` to the runtime thread; its replies go to `deliver`."""
        return self._submit(message, deliver)

    def for_request(
        self,
        caller: SealedCaller,
        usage: Usage,
        allowance: int | None,
        run_inline: RunInline | None,
    ) -> SealedCall:
        """The pipeline of one sealed request: this model, with that request's context."""
        return SealedCall(self, caller, usage, allowance, run_inline)


class SealedCall:
    """The :class:`~bastion.api.pipeline.Pipeline` the routes see for one sealed request.

    Everything the request's context decides travels here explicitly: who sent it (the
    actions its key holds), where its usage is counted, how many tokens the gateway
    reserved for it, and whether it runs inline on the runtime thread.
    """

    __slots__ = ("_pipeline", "allowance", "caller", "run_inline", "usage")

    def __init__(
        self,
        pipeline: SealedPipeline,
        caller: SealedCaller,
        usage: Usage,
        allowance: int | None,
        run_inline: RunInline | None,
    ) -> None:
        self._pipeline = pipeline
        self.caller = caller
        self.usage = usage
        # The tokens the gateway reserved for this request (None: no limit).
        self.allowance = allowance
        # Set when the request is served on the runtime thread itself (see serve_inline).
        self.run_inline = run_inline

    @property
    def limits(self) -> RequestLimits:
        return self._pipeline.limits

    def size_limits(self, name: str) -> SizeLimits:
        return self._pipeline.size_limits(name)

    async def authenticate(self, authorization: str | None) -> SealedCaller:
        # The outer request was authenticated; an inner Authorization header means nothing.
        return self.caller

    def authorize(self, principal: SealedCaller, action: str, model: str | None = None) -> None:
        self._pipeline.authorize(principal, action, model)

    def require_model(self, name: str) -> None:
        self._pipeline.require_model(name)

    def ready_model(self, name: str, capability: str | None) -> ModelMetadata:
        return self._pipeline.ready_model(name, capability)

    def admit(
        self,
        principal: SealedCaller,
        model: str,
        *,
        tokens: int = 0,
        request_bytes: int = 0,
        tokens_up_to: int | None = None,
    ) -> SealedTicket:
        """Admission (quotas, the fair queue) happened at the gateway, on the outer request;
        the usage of the inner one travels back beside the sealed answer. An inner request
        estimated at more tokens than the gateway could reserve is refused (429)."""
        allowance = self.allowance
        if allowance is not None and tokens > allowance:
            raise RateLimited(
                f"The request may use {tokens} tokens, more than the {allowance} its quotas "
                "leave now; lower max_tokens or n, or retry later.",
                code="tokens_limit_exceeded",
            )
        return SealedTicket(model)

    async def call(self, model: str, message: Any, ticket: SealedTicket) -> FromWorker:
        run_inline = self.run_inline
        if run_inline is not None:
            # On the runtime thread: run the model right here. Only the final reply
            # matters to a call, as in stream() below, whose partial replies it skips.
            final = cast(FromWorker, run_inline(self._watched(message), _skip))
            self.usage.add(final)
            return final
        last: FromWorker | None = None
        async for reply in self.stream(model, message, ticket):
            last = reply
        assert last is not None
        return last

    def _watched(self, message: Any) -> Any:
        if isinstance(message, Infer) and self.caller.identity is not None:
            # Watched like a plaintext request from the same key.
            return msgspec.structs.replace(message, caller=self.caller.identity)
        return message

    async def stream(
        self, model: str, message: Any, ticket: SealedTicket
    ) -> AsyncGenerator[FromWorker, None]:
        message = self._watched(message)
        # The usage goes back to the gateway beside the sealed answer, which accounts it.
        usage = self.usage
        run_inline = self.run_inline
        if run_inline is not None:
            # On the runtime thread, for an answer sent whole: run the model right here.
            partial: list[FromWorker] = []
            final = run_inline(message, lambda reply: partial.append(cast(FromWorker, reply)))
            usage.add(final)
            for reply in partial:
                yield reply
            yield cast(FromWorker, final)
            return
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[FromWorker] = asyncio.Queue()
        abandoned = False

        def arrive(reply: FromWorker) -> None:
            if not abandoned:
                replies.put_nowait(reply)
            elif not isinstance(reply, TextDelta):
                # The job given up on has stopped: what it did is charged all the same.
                usage.add(reply)
                if usage.outstanding is not None and not usage.outstanding.done():
                    usage.outstanding.set_result(None)

        def deliver(reply: Message) -> None:
            # The runtime thread only ever hands over replies (FromWorker messages).
            loop.call_soon_threadsafe(arrive, cast(FromWorker, reply))

        job = self._pipeline.submit(message, deliver)
        finished = False
        try:
            while True:
                reply = await replies.get()
                finished = not isinstance(reply, TextDelta)
                if finished:
                    usage.add(reply)
                yield reply
                if finished:
                    return
        finally:
            if not finished:
                abandoned = True
                while not replies.empty():
                    if not isinstance(waiting := replies.get_nowait(), TextDelta):
                        usage.add(waiting)
                        break
                else:
                    usage.outstanding = loop.create_future()
                    job.cancel()


def _skip(reply: Message) -> None:
    """Where a call run inline drops its partial replies (a call returns the final one)."""
