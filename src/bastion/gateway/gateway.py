"""The request pipeline: authenticate, authorize, admit, dispatch, account.

A :class:`Gateway` holds the request steps, and nothing else: the inference routes reach
them through api/admission.py; each step has one job and raises a :mod:`bastion.errors`
error to stop. It serves from what it holds in memory (keys, quotas, models, OHTTP keys),
which the control plane (:mod:`bastion.gateway.control`) keeps current. Its collaborators
are built once at start (``server.build_services``) and handed in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import msgspec

from bastion.api.pipeline import require_capability
from bastion.audit.events import (
    ACCESS_DENIED,
    MODEL_STALLED,
    Event,
    EventSink,
)
from bastion.config import Settings
from bastion.errors import (
    AuthenticationError,
    ConfigurationError,
    GatewayTimeout,
    LimiterUnavailable,
    ModelNotFound,
    ModelUnavailable,
    PermissionDenied,
)
from bastion.gateway.auth import Authenticator, NeedsRead
from bastion.gateway.protection import ProtectionDesk
from bastion.gateway.sealing import SealingState
from bastion.identity.principal import (
    ACTION_CHAT,
    ACTION_COMPLETIONS,
    ACTION_EMBEDDINGS,
    ACTION_INFER,
    Principal,
)
from bastion.models.overrides import OverrideTable
from bastion.models.registry import ModelRecord
from bastion.observability.metrics import Metrics
from bastion.quotas.admission import Ticket, limit_headers
from bastion.quotas.fair import FairQueue, Hold, QueueFull
from bastion.quotas.limiter import (
    InMemoryLimiter,
    Limiter,
    LimitState,
    QuotaExceeded,
    QuotaLimits,
    RequestTooLarge,
    Subject,
)
from bastion.quotas.store import EMPTY_TABLE, KEY, TENANT, QuotaTable
from bastion.quotas.usage import UsageMeter
from bastion.quotas.window import DispatchWindow
from bastion.supervision.channel import Reply, Settle
from bastion.supervision.supervisor import ModelStatus, Supervisor, replica_count
from bastion.wire.batching import model_batch_policy
from bastion.wire.protocol import (
    Caller,
    FromWorker,
    Infer,
    ModelMetadata,
    SealedChunk,
    SealedRequest,
    SizeLimits,
    TextDelta,
    WorkRequest,
    batch_size_of,
    compute_of,
    queued_of,
    usage_of,
)

logger = logging.getLogger("bastion.gateway")

# What an encrypted request can ask of a model (the inner request names which one).
SEALED_ACTIONS = frozenset({ACTION_CHAT, ACTION_COMPLETIONS, ACTION_EMBEDDINGS, ACTION_INFER})

# Every hold on a worker's place ends by the request deadline; past it by this much more,
# the place leaked and is taken back.
LEAKED_HOLD_GRACE_S = 5.0


class Gateway:
    """The request steps of every API request; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        authenticator: Authenticator,
        supervisor: Supervisor,
        events: EventSink,
        metrics: Metrics,
        meter: UsageMeter,
        limiter: Limiter | None = None,
        protection: ProtectionDesk | None = None,
        sealing: SealingState | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.request_limits
        self.authenticator = authenticator
        self.supervisor = supervisor
        self.events = events
        self.metrics = metrics
        # The OHTTP keys in force and the replay guard (of this process unless a shared one
        # is given); the control plane updates the keys.
        self.sealing = sealing if sealing is not None else SealingState(settings)
        # Quotas: the limiter of this process (or the one gateways share), the stored
        # limits as of the last refresh, the fair queue of each model, and the meter.
        self.limiter: Limiter = limiter if limiter is not None else InMemoryLimiter()
        self.quotas: QuotaTable = EMPTY_TABLE
        self.meter = meter
        # Acts on the extraction monitors' reports: blocks and throttles suspected thieves.
        self.protection = protection
        self._queues: dict[str, FairQueue] = {}
        # Each model's in-flight window at its worker (the fair queue's places).
        self._windows: dict[str, DispatchWindow] = {}
        self._catalog: dict[str, ModelRecord] = {}
        # Protection settings of tenants and keys, over their models' own.
        self.overrides = OverrideTable()
        self._size_limits: dict[str, SizeLimits] = {}
        self._draining = False
        # The quota subjects of each (tenant, key) under the table they were found in.
        self._subjects_table: QuotaTable | None = None
        self._subjects: dict[tuple[str, str], list[tuple[Subject, QuotaLimits]]] = {}

    # ------------------------------------------------------------------ the control plane's

    def update(
        self,
        *,
        quotas: QuotaTable,
        records: list[ModelRecord],
        overrides: OverrideTable | None = None,
    ) -> None:
        """Take the quotas and models as of the latest revision (the control plane's call)."""
        self.quotas = quotas
        if overrides is not None:
            self.overrides = overrides
        self._catalog = {record.name: record for record in records}
        self._size_limits = {
            r.name: self.settings.size_limits.with_options(r.options) for r in records
        }
        for name, window in list(self._windows.items()):
            fresh = self._new_window(name)
            if (fresh.floor, fresh.ceiling) != (window.floor, window.ceiling):
                # Its batching changed: the window starts again from the new bounds.
                self._windows[name] = fresh
                self._queues[name].resize(fresh.size)
                self.metrics.dispatch_window.labels(name).set(fresh.size)

    def drain(self) -> None:
        """Refuse new work from now on: the server is stopping."""
        self._draining = True

    # ------------------------------------------------------------------ pipeline steps

    async def authenticate(self, authorization: str | None) -> Principal:
        try:
            try:
                return self.authenticator.authenticate(authorization, may_read=False)
            except NeedsRead:
                # A key not in the cache: its database read must not stall the event loop.
                return await asyncio.to_thread(self.authenticator.authenticate, authorization)
        except AuthenticationError:
            self.metrics.auth_failures.inc()
            raise

    def authorize(self, principal: Principal, action: str, model: str | None = None) -> None:
        try:
            principal.require_action(action)
            if model is not None:
                principal.require_model(model)
        except PermissionDenied:
            self._denied(principal, action)
            raise

    def authorize_sealed(self, principal: Principal, model: str) -> list[str]:
        """Check an encrypted request's outer headers; returns the inference actions the
        key holds, which the worker checks against the inner request it cannot see here."""
        actions = sorted(principal.actions & SEALED_ACTIONS)
        try:
            principal.require_model(model)
            if not actions:
                raise PermissionDenied("This API key is not allowed to run inference.")
        except PermissionDenied:
            self._denied(principal, "sealed")
            raise
        return actions

    def _denied(self, principal: Principal, action: str) -> None:
        self.events.emit(
            Event(
                kind=ACCESS_DENIED,
                outcome="failure",
                actor=principal.key_id,
                tenant=principal.tenant_name,
                detail={"action": action},
            )
        )

    def model_record(self, name: str) -> ModelRecord:
        record = self._catalog.get(name)
        if record is None:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        return record

    def require_model(self, name: str) -> None:
        self.model_record(name)

    def size_limits(self, name: str) -> SizeLimits:
        """How big the model's requests and answers may be (settings, or its options)."""
        self.model_record(name)
        return self._size_limits[name]

    def visible_models(self, principal: Principal) -> list[ModelRecord]:
        return [r for r in self._catalog.values() if principal.can_see_model(r.name)]

    def ready_model(self, name: str, capability: str | None) -> ModelMetadata:
        """The metadata of a model that exists, is ready, and offers `capability`
        (None: any)."""
        self.model_record(name)
        metadata = self.supervisor.ready_metadata(name)
        if metadata is None:
            status = self.supervisor.status(name)
            raise ModelUnavailable(_unavailable_message(name, status), retry_after_s=2)
        queue = self._queues.get(name)
        if queue is not None and queue.stalled(self.settings.request_timeout_s):
            raise ModelUnavailable(
                f"The model '{name}' is not making progress; retry shortly.",
                code="model_stalled",
                retry_after_s=5,
            )
        if capability is not None:
            require_capability(name, metadata, capability)
        return metadata

    def admit(
        self,
        principal: Principal,
        model: str,
        *,
        tokens: int = 0,
        request_bytes: int = 0,
        tokens_up_to: int | None = None,
    ) -> Ticket:
        """Reserve the request's estimated `tokens` (prompt + max_tokens) against the quotas
        of its tenant and key; 429 (or 413) with the rate-limit headers if they do not
        allow it. With `tokens_up_to`, reserve as much more as they have left, up to that
        (an encrypted request). The ticket holds the reservation until the request ends."""
        if self._draining:
            raise ModelUnavailable("The server is shutting down.", retry_after_s=5)
        if self.protection is not None:
            self.protection.check(principal.key_id, model)
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        subjects = self._quota_subjects(principal)
        tenant = principal.tenant_name
        self.meter.record(tenant, model, requests=1)
        if not subjects:
            return Ticket(principal, model, deadline=deadline)
        try:
            reservation = self.limiter.reserve(
                subjects, tokens=tokens, request_bytes=request_bytes, up_to=tokens_up_to
            )
        except (QuotaExceeded, RequestTooLarge) as exc:
            exc.headers.update(
                (name.decode(), value.decode())
                for name, value in self._limit_headers(subjects, exc.states)
            )
            self._refused(tenant, model, exc.code)
            raise
        except LimiterUnavailable as exc:
            # Redis does not answer and the policy is fail_closed.
            self._refused(tenant, model, exc.code)
            raise
        return Ticket(
            principal,
            model,
            limiter=self.limiter,
            reservation=reservation,
            headers=self._limit_headers(subjects, reservation.states),
            deadline=deadline,
        )

    def _quota_subjects(self, principal: Principal) -> list[tuple[Subject, QuotaLimits]]:
        """The tenant and key limits that apply to `principal`'s requests (none: no quota),
        as of the current quota table (each table is kept as a whole until the next)."""
        if self._subjects_table is not self.quotas:
            self._subjects_table, self._subjects = self.quotas, {}
        known = (principal.tenant_name, principal.key_id)
        subjects = self._subjects.get(known)
        if subjects is None:
            subjects = self._subjects[known] = self._find_quota_subjects(principal)
        return subjects

    def _find_quota_subjects(self, principal: Principal) -> list[tuple[Subject, QuotaLimits]]:
        subjects = []
        tenant_limits = self.quotas.tenant_limits(principal.tenant_name)
        if tenant_limits != _NO_LIMITS:
            subjects.append((Subject(TENANT, principal.tenant_name), tenant_limits))
        key_limits = self.quotas.key_limits(principal.key_id)
        if key_limits is not None and key_limits != _NO_LIMITS:
            subjects.append((Subject(KEY, principal.key_id), key_limits))
        return subjects

    def _limit_headers(
        self, subjects: list[tuple[Subject, QuotaLimits]], states: Sequence[LimitState]
    ) -> list[tuple[bytes, bytes]]:
        """The rate-limit headers from the `states` the limiter answered with the
        reservation or refusal (asked again only if it did not tell: no limiter here does)."""
        if not states:
            states = [self.limiter.state(subject, limits) for subject, limits in subjects]
        return limit_headers(states)

    def _refused(self, tenant: str, model: str, code: str) -> None:
        self.metrics.refused.labels(model, tenant, code).inc()
        self.meter.record(tenant, model, refused=1)

    def _queue(self, model: str) -> FairQueue:
        queue = self._queues.get(model)
        if queue is None:
            window = self._windows[model] = self._new_window(model)
            self.metrics.dispatch_window.labels(model).set(window.size)
            queue = self._queues[model] = FairQueue(
                window.size, self.settings.queue_size, self.quotas.weight
            )
        return queue

    def _new_window(self, model: str) -> DispatchWindow:
        """A model's window: fixed by BASTION_MODEL_CONCURRENCY, or adaptive between its
        batch size and BASTION_MODEL_WINDOW_MAX (or twice its batch size)."""
        fixed = self.settings.model_concurrency
        record = self._catalog.get(model)
        batch = model_batch_policy(record.runtime, record.options) if record else None
        floor = batch.max_size if batch is not None and batch.enabled else 1
        ceiling = max(self.settings.model_window_max, 2 * floor if floor > 1 else 1)
        # Each replica of the model (option replicas) is a worker with a window of its own.
        try:
            replicas = replica_count(record.options) if record else 1
        except ConfigurationError:
            replicas = 1
        return DispatchWindow(
            floor * replicas, ceiling * replicas, fixed * replicas if fixed > 0 else None
        )

    def window(self, model: str) -> DispatchWindow | None:
        """The model's in-flight window (None until its first request)."""
        return self._windows.get(model)

    def _observe(self, model: str, in_flight_s: float, reply: FromWorker) -> None:
        """Resize the model's window after an answer (see bastion.quotas.window)."""
        window = self._windows.get(model)
        if window is None or window.fixed is not None:
            return
        compute, queued = compute_of(reply), queued_of(reply)
        size = window.observe(in_flight_s, compute, queued)
        queue = self._queues.get(model)
        if queue is not None and size != queue.slots:
            queue.resize(size)
            self.metrics.dispatch_window.labels(model).set(size)

    async def _acquire(self, model: str, tenant: str) -> Hold:
        """Wait for a place at the model's worker, in fair order across tenants (503 if
        the queue is full); the caller releases the hold."""
        queue = self._queue(model)
        try:
            return await queue.acquire(tenant)
        except QueueFull as exc:
            self._refused(tenant, model, exc.code)
            raise

    def stalled_models(self) -> list[str]:
        """Models whose every place at the worker has been held past the request deadline:
        nothing moves there (a leaked place), until it is reclaimed."""
        limit = self.settings.request_timeout_s
        return sorted(name for name, queue in self._queues.items() if queue.stalled(limit))

    def reclaim_leaked(self) -> None:
        """Take back places held well past the deadline, which every request's hold ends
        by: they leaked. Each is reported (event, metric, log), never silently lost."""
        limit = self.settings.request_timeout_s + LEAKED_HOLD_GRACE_S
        for model, queue in self._queues.items():
            leaked = queue.overdue(limit)
            if not leaked:
                continue
            logger.error(
                "places at a model's worker were held past the deadline; reclaimed",
                extra={"model": model, "reclaimed": len(leaked)},
            )
            self.events.emit(
                Event(
                    kind=MODEL_STALLED,
                    outcome="failure",
                    target=model,
                    detail={"reclaimed": len(leaked), "slots": queue.slots},
                )
            )
            self.metrics.slots_reclaimed.labels(model).inc(len(leaked))
            for hold in leaked:
                queue.reclaim(hold)

    async def call(self, model: str, message: WorkRequest, ticket: Ticket) -> FromWorker:
        """Send one request and wait for its final answer, within the request's deadline
        (which the wait in the model's fair queue, and earlier calls, count toward)."""
        message = self._with_caller(message, model, ticket.principal)
        loop = asyncio.get_running_loop()
        try:
            with _Deadline(loop, self._deadline(ticket)):
                tenant = ticket.principal.tenant_name
                try:
                    # _acquire(), in this frame.
                    hold = await self._queue(model).acquire(tenant)
                except QueueFull as exc:
                    self._refused(tenant, model, exc.code)
                    raise
                try:
                    sent = loop.time()
                    reply = await self.supervisor.call(model, message, self._settler(ticket))
                finally:
                    hold.release()
                self._observe(model, loop.time() - sent, reply)
                return reply
        except TimeoutError:
            raise GatewayTimeout("The model did not answer in time.") from None

    async def stream(
        self, model: str, message: WorkRequest, ticket: Ticket
    ) -> AsyncGenerator[FromWorker, None]:
        """Stream a request's messages; past the deadline (the wait in the fair queue
        included) the job is cancelled (504)."""
        deadline = self._deadline(ticket)
        message = self._with_caller(message, model, ticket.principal)
        try:
            async with asyncio.timeout_at(deadline):
                hold = await self._acquire(model, ticket.principal.tenant_name)
        except TimeoutError:
            raise GatewayTimeout("The model did not answer in time.") from None
        try:
            replies = self.supervisor.stream(model, message, self._settler(ticket))
            try:
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            reply = await anext(replies)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise GatewayTimeout("The model did not answer in time.") from None
                    yield reply
                    if not isinstance(reply, TextDelta | SealedChunk):
                        return
            finally:
                # Closing the worker stream early tells the worker to cancel the job.
                await replies.aclose()
        finally:
            hold.release()

    def _with_caller(self, message: WorkRequest, model: str, principal: Principal) -> WorkRequest:
        """A classifier request, plain or encrypted, names its key (for the worker's
        extraction monitor, which keeps one history per key) and the protection settings
        its tenant or key has of its own."""
        if isinstance(message, Infer | SealedRequest):
            tenant, key = principal.tenant_name, principal.key_id
            if self.protection is not None:
                self.protection.saw(key, tenant, model)
            protect = self.overrides.resolve(tenant, key, model)
            caller = Caller(tenant=tenant, key=key, protect=protect)
            return msgspec.structs.replace(message, caller=caller)
        return message

    def protection_options(self, model: str, tenant: str, key: str) -> dict[str, Any]:
        """A model's protect.* options as a caller gets them (its overrides on top)."""
        options = dict(self.model_record(model).options)
        options.update(self.overrides.resolve(tenant, key, model))
        return options

    def _deadline(self, ticket: Ticket) -> float:
        if ticket.deadline is not None:
            return ticket.deadline
        return asyncio.get_running_loop().time() + self.settings.request_timeout_s

    def _settler(self, ticket: Ticket) -> Settle:
        """Accounts a request's usage from its final reply, as soon as the worker sends it:
        a client that leaves early (or stops reading at `[DONE]`) is still charged."""
        tenant, model = ticket.principal.tenant_name, ticket.model
        metrics, record = self.metrics, self.meter.record

        def settle(reply: Reply) -> None:
            prompt, completion = usage_of(reply)
            compute = compute_of(reply)
            if prompt:
                metrics.tokens_of(model, tenant, "prompt").inc(prompt)
            if completion:
                metrics.tokens_of(model, tenant, "completion").inc(completion)
            if compute:
                metrics.compute_seconds_of(model, tenant).inc(compute)
                metrics.batch_size_of(model).observe(batch_size_of(reply))
                metrics.queue_delay_of(model).observe(queued_of(reply))
            record(
                tenant,
                model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                compute_seconds=compute,
            )
            ticket.report(prompt + completion)

        return settle


_NO_LIMITS = QuotaLimits()


class _Deadline:
    """``asyncio.timeout_at(when)`` as a plain context manager (nothing in it awaits), for
    the request path: one timer that cancels the task at `when`, and asyncio's own
    bookkeeping of cancellations (TimeoutError only for the timer's, not for a cancel of
    the task's own, a client leaving say)."""

    __slots__ = ("_cancelling", "_task", "_timer", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        self._timer = loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def __enter__(self) -> _Deadline:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        self._timer.cancel()
        # As asyncio's: the task is uncancelled whenever the timer fired (first), and it is a
        # timeout if no other cancel came meanwhile.
        expired = self.expired and self._task.uncancel() <= self._cancelling
        if expired and kind is asyncio.CancelledError:
            raise TimeoutError from exc


def _unavailable_message(name: str, status: ModelStatus) -> str:
    if status.state == "integrity_failed":
        return f"The model '{name}' failed its integrity check; an operator must replace it."
    if status.state == "failed":
        return f"The model '{name}' failed to load."
    if status.state == "unloaded":
        return f"The model '{name}' is not loaded."
    return f"The model '{name}' is {status.state}; retry shortly."
