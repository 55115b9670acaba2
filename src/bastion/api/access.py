"""One access log line and one metrics sample per request, without bodies or raw paths;
and the end of each admitted request's hold on its quotas."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.api.errors import internal_error_body
from bastion.observability.metrics import Metrics

logger = logging.getLogger("bastion.access")


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

        async def send_with_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                ticket = state.get("ticket")
                if ticket is not None and ticket.headers:
                    # OpenAI's x-ratelimit-* headers, on every admitted request's answer.
                    message = {**message, "headers": [*message["headers"], *ticket.headers]}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
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
