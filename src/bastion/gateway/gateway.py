"""The request pipeline: authenticate, authorize, admit, dispatch, account.

A :class:`Gateway` owns the components a request passes through. The HTTP routes call its
steps in order; each step has one job and raises a :mod:`bastion.errors` error to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from bastion.audit.events import ACCESS_DENIED, SERVER_STOPPED, Event, EventSink
from bastion.config import Settings
from bastion.errors import (
    AuthenticationError,
    GatewayTimeout,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    PermissionDenied,
)
from bastion.gateway.auth import Authenticator
from bastion.identity.principal import Principal
from bastion.models.registry import ModelRecord, ModelRegistry
from bastion.observability.metrics import Metrics
from bastion.store.db import Database
from bastion.workers.channel import WorkRequest
from bastion.workers.protocol import FromWorker, ModelMetadata, TextDelta
from bastion.workers.supervisor import ModelSpec, ModelStatus, Supervisor

logger = logging.getLogger("bastion.gateway")


class Gateway:
    """Identity, routing and dispatch for every API request."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        authenticator: Authenticator,
        registry: ModelRegistry,
        supervisor: Supervisor,
        events: EventSink,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.db = db
        self.authenticator = authenticator
        self.registry = registry
        self.supervisor = supervisor
        self.events = events
        self.metrics = metrics
        self._catalog: dict[str, ModelRecord] = {}
        self._revision = -1
        self._refresher: asyncio.Task[None] | None = None
        self._draining = False
        self.started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.supervisor.start()
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="bastion-refresh")
        self.started = True

    async def stop(self) -> None:
        self._draining = True
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.supervisor.stop(self.settings.drain_timeout_s)
        self.events.emit(Event(kind=SERVER_STOPPED))

    async def refresh(self) -> None:
        """Re-read keys and models when the database changed, and reconcile the workers."""
        revision = await asyncio.to_thread(self.db.revision)
        if revision == self._revision:
            return
        await asyncio.to_thread(self.authenticator.refresh)
        records = await asyncio.to_thread(self.registry.list)
        self._catalog = {record.name: record for record in records}
        self._revision = revision
        await self._reconcile()

    async def _reconcile(self) -> None:
        for record in self._catalog.values():
            if record.desired_state == "loaded":
                await self.supervisor.ensure(
                    ModelSpec(
                        name=record.name,
                        runtime=record.runtime,
                        path=self.resolve_model_path(record.path),
                        options=dict(record.options),
                    )
                )
            elif self.supervisor.status(record.name).state != "unloaded":
                await self.supervisor.unload(record.name)
        for name in list(self.supervisor.statuses()):
            if name not in self._catalog:
                await self.supervisor.unload(name)

    def resolve_model_path(self, path: str) -> Path:
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.settings.home / candidate
        # Workers start in their own directory: hand them an absolute path.
        return candidate.absolute()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval_s)
            try:
                await self.refresh()
            except Exception as exc:  # keep serving from the cache if the store hiccups
                logger.warning("refresh failed", extra={"exc_type": type(exc).__name__})

    # ------------------------------------------------------------------ pipeline steps

    def authenticate(self, authorization: str | None) -> Principal:
        try:
            return self.authenticator.authenticate(authorization)
        except AuthenticationError:
            self.metrics.auth_failures.inc()
            raise

    def authorize(self, principal: Principal, action: str, model: str | None = None) -> None:
        try:
            principal.require_action(action)
            if model is not None:
                principal.require_model(model)
        except PermissionDenied:
            self.events.emit(
                Event(
                    kind=ACCESS_DENIED,
                    outcome="failure",
                    actor=principal.key_id,
                    tenant=principal.tenant_name,
                    detail={"action": action},
                )
            )
            raise

    def model_record(self, name: str) -> ModelRecord:
        record = self._catalog.get(name)
        if record is None:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        return record

    def visible_models(self, principal: Principal) -> list[ModelRecord]:
        return [r for r in self._catalog.values() if principal.can_see_model(r.name)]

    def ready_model(self, name: str, capability: str) -> ModelMetadata:
        """The metadata of a model that exists, is ready, and offers `capability`."""
        self.model_record(name)
        status = self.supervisor.status(name)
        if status.state != "ready" or status.metadata is None:
            raise ModelUnavailable(_unavailable_message(name, status), retry_after_s=2)
        if capability not in status.metadata.capabilities:
            raise InvalidRequest(
                f"The model '{name}' does not support {capability}.",
                code="unsupported_operation",
                param="model",
            )
        return status.metadata

    def admit(self, principal: Principal, model: str) -> None:
        """Admission control. Quotas and fair queuing arrive with the governance issue."""
        if self._draining:
            raise ModelUnavailable("The server is shutting down.", retry_after_s=5)

    async def call(self, model: str, message: WorkRequest) -> FromWorker:
        """Send one request and wait for its final answer, within the request deadline."""
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                return await self.supervisor.call(model, message)
        except TimeoutError:
            raise GatewayTimeout("The model did not answer in time.") from None

    async def stream(self, model: str, message: WorkRequest) -> AsyncIterator[FromWorker]:
        """Stream a request's messages; past the deadline the job is cancelled (504)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        replies = self.supervisor.stream(model, message)
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
                if not isinstance(reply, TextDelta):
                    return
        finally:
            # Closing the worker stream early tells the worker to cancel the job.
            await replies.aclose()  # type: ignore[attr-defined]

    def account(self, model: str, principal: Principal, prompt: int, completion: int) -> None:
        tenant = principal.tenant_name
        if prompt:
            self.metrics.tokens.labels(model, tenant, "prompt").inc(prompt)
        if completion:
            self.metrics.tokens.labels(model, tenant, "completion").inc(completion)


def _unavailable_message(name: str, status: ModelStatus) -> str:
    if status.state == "failed":
        return f"The model '{name}' failed to load."
    if status.state == "unloaded":
        return f"The model '{name}' is not loaded."
    return f"The model '{name}' is {status.state}; retry shortly."
