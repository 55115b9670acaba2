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
import contextlib
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

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        state: dict[str, Any] = scope.setdefault("state", {})

        started = False
        departure = _Departure(state.get(ON_CLIENT_LEFT))

        async def send_with_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            elif not message.get("more_body", False):
                # The answer is complete: the end of the request is no departure.
                departure.stop()
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        except asyncio.CancelledError:
            if not departure.left():
                raise
            # The client left: nobody to answer. The route's own clean-up has run.
            status = CLIENT_CLOSED
        except Exception as exc:
            # Caught here rather than re-raised to the server, whose traceback could quote
            # a payload; only the exception type is logged.
            logger.error("unhandled error", extra={"exc_type": type(exc).__name__})
            if not started:
                status = 500
                body = internal_error_body(scope.get("path", ""))
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            departure.stop()
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            model = state.get("model", "")
            tenant = state.get("tenant", "")
            self.metrics.requests.labels(template, model, tenant, str(status)).inc()
            self.metrics.latency.labels(template).observe(elapsed)
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "route": template,
                        "status": status,
                        "ms": round(elapsed * 1000, 2),
                        "tenant": tenant,
                        "model": model,
                    },
                )


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
        if self._on_lost is not None:
            with contextlib.suppress(ValueError):
                self._on_lost.remove(self._client_left)
            self._on_lost = None

    def _client_left(self) -> None:
        self._on_lost = None
        if self._task is not None and not self._task.done():
            self._gone = True
            self._task.cancel()
