"""One access log line and one metrics sample per request, without bodies or raw paths;
and the end of a request whose client has left. (An admitted request's hold on its quotas
is settled by its own admission, api/admission.py.)

uvicorn goes on running a request whose client disconnected until the route returns: a
completion of 16 prompts once ran 150 s for nobody. Bastion's connection protocol
(``api/transport.py``) tells a request when its connection is lost before the answer is
complete, which cancels it: the model's worker is told to stop and the usage of the work
done is still settled. Nothing is watched or armed per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.api.errors import internal_error_body
from bastion.api.transport import ON_CLIENT_LEFT
from bastion.observability.metrics import Metrics

logger = logging.getLogger("bastion.access")

# The status logged for a request whose client left before its answer (nginx's).
CLIENT_CLOSED = 499


class AccessLog:
    """Pure ASGI middleware: logs the route template, never the raw path or query string."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, before_answer: Callable[[], None] | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        # Called as an error answer starts: the usage journal writes what it holds (a refused
        # request's record: quotas/journal.py). A success follows a worker's reply, in a
        # later turn of the event loop than any record of its own.
        self.before_answer = before_answer or _nothing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        state: dict[str, Any] = scope.setdefault("state", {})

        started = False
        departure = _Departure(state.get(ON_CLIENT_LEFT))
        before_answer = self.before_answer

        async def send_with_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                if status >= 400:
                    before_answer()
            elif not message.get("more_body", False):
                # The answer is complete: the end of the request is no departure.
                departure.stop()
            await send(message)

        self.metrics.serving += 1
        try:
            await self.app(scope, receive, send_with_status)
        except asyncio.CancelledError:
            if not departure.left():
                raise
            # The client left: nobody to answer. The route's own clean-up has run.
            status = CLIENT_CLOSED
        except Exception as exc:
            if not started:
                before_answer()
            if await answer_unhandled(scope, send, exc, started):
                status = 500
        finally:
            departure.stop()
            self.metrics.serving -= 1
            route = scope.get("route")
            finish(
                self.metrics,
                scope["method"],
                getattr(route, "path", "unmatched"),
                state,
                status,
                time.perf_counter() - start,
            )


async def answer_unhandled(scope: Scope, send: Send, exc: Exception, started: bool) -> bool:
    """An error no handler took: logged by type, and answered 500 if the answer has not
    started (True then)."""
    # Caught here rather than re-raised to the server, whose traceback could quote a
    # payload; only the exception type is logged.
    logger.error("unhandled error", extra={"exc_type": type(exc).__name__})
    if started:
        return False
    body = internal_error_body(scope.get("path", ""))
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return True


def finish(
    metrics: Metrics, method: str, template: str, state: dict[str, Any], status: int, elapsed: float
) -> None:
    """A request's metrics sample and access log line: its route template, model and
    tenant (once known to exist), status and time."""
    model = state.get("model", "")
    tenant = state.get("tenant", "")
    metrics.requests_of(template, model, tenant, str(status)).inc()
    metrics.latency_of(template).observe(elapsed)
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "request",
            extra={
                "method": method,
                "route": template,
                "status": status,
                "ms": round(elapsed * 1000, 2),
                "tenant": tenant,
                "model": model,
            },
        )


def _nothing() -> None:
    pass


class _Departure:
    """Cancels the running request if its client disconnects (see the module docstring)."""

    __slots__ = ("_gone", "_on_lost", "_task")

    def __init__(self, on_lost: list[Callable[[], None]] | None) -> None:
        # None when the server is not Bastion's (a test's in-process transport, say).
        self._on_lost = on_lost
        self._task = asyncio.current_task()
        self._gone = False
        if on_lost is not None:
            on_lost.append(self._client_left)

    def left(self) -> bool:
        """Whether the request was cancelled because its client left (and so is over)."""
        if self._gone and self._task is not None:
            self._task.uncancel()
            return True
        return False

    def stop(self) -> None:
        """The answer is complete (or abandoned): the connection's end is no departure."""
        on_lost = self._on_lost
        if on_lost is not None:
            self._on_lost = None
            client_left = self._client_left
            if client_left in on_lost:
                on_lost.remove(client_left)

    def _client_left(self) -> None:
        self._on_lost = None
        if self._task is not None and not self._task.done():
            self._gone = True
            self._task.cancel()
