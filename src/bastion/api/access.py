"""One access log line and one metrics sample per request, without bodies or raw paths;
the end of each admitted request's hold on its quotas; and the end of a request whose
client has left.

uvicorn goes on running a request whose client disconnected until the route returns: a
completion of 16 prompts once ran 150 s for nobody. A request still running after
:data:`DISCONNECT_CHECK_AFTER_S` (and done reading its body) is watched for the client's
disconnection, which cancels it: the model's worker is told to stop and the usage of the
work done is still settled. Quick requests never pay for the watch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.api.errors import internal_error_body
from bastion.observability.metrics import Metrics

logger = logging.getLogger("bastion.access")

# A request still running this long is watched for its client leaving.
DISCONNECT_CHECK_AFTER_S = 0.5
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
        departure = _Departure(receive, scope["method"])

        async def send_with_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                ticket = state.get("ticket")
                if ticket is not None and ticket.headers:
                    # OpenAI's x-ratelimit-* headers, on every admitted request's answer.
                    message = {**message, "headers": [*message["headers"], *ticket.headers]}
            elif not message.get("more_body", False):
                # The answer is complete: the end of the request is no departure.
                departure.stop()
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, departure.receive, send_with_status)
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
            ticket = state.get("ticket")
            if ticket is not None:
                # The answer is sent (or abandoned): settle the quota reservation.
                ticket.close()
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

    __slots__ = ("_body_read", "_done", "_gone", "_loop", "_receive", "_task", "_timer", "_watcher")

    def __init__(self, receive: Receive, method: str) -> None:
        self._receive = receive
        # Requests without a body: anything the server receives is a disconnection.
        self._body_read = method in ("GET", "HEAD", "DELETE", "OPTIONS")
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._gone = False
        self._done = False
        self._watcher: asyncio.Task[None] | None = None
        self._timer = self._loop.call_later(DISCONNECT_CHECK_AFTER_S, self._start)

    async def receive(self) -> Message:
        """The route's receive: notes when the body has been read."""
        message = await self._receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            self._body_read = True
        return message

    def left(self) -> bool:
        """Whether the request was cancelled because its client left (and so is over)."""
        if self._gone and self._task is not None:
            self._task.uncancel()
            return True
        return False

    def stop(self) -> None:
        self._done = True
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def _start(self) -> None:
        if self._done:
            return
        if not self._body_read:
            # Still reading its body (which has a deadline of its own): look again later.
            self._timer = self._loop.call_later(DISCONNECT_CHECK_AFTER_S, self._start)
            return
        self._watcher = self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        # The route has its body: all the server can receive now is the client leaving
        # (or, once the answer is complete, the end of the request, which ends the route).
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self._done and self._task is not None:
            self._gone = True
            self._task.cancel()
