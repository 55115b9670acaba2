"""The inference routes' fast path (api/fast.py) answers exactly as the Starlette app does.

Each request here is sent twice, to two apps built alike by ``create_app`` around a fake
pipeline: once through the FastPath it returns, once straight to the Starlette app behind
it (which the fast path stands in front of, and which serves everything else). Status,
headers, body, the metrics sample, the access log line, the settling of the admitted call
and the end of a request whose client left must be the same, and the fast path must have
taken the request itself (the Starlette app's exception middleware never saw it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, MutableMapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route

from bastion.api.app import create_app
from bastion.api.fast import FastPath
from bastion.api.services import Services
from bastion.api.transport import ON_CLIENT_LEFT, WRITES, HeldWrites
from bastion.errors import (
    AuthenticationError,
    ModelNotFound,
    ModelUnavailable,
    PermissionDenied,
    RateLimited,
)
from bastion.observability.metrics import Metrics
from bastion.wire.protocol import (
    Choice,
    Embed,
    EmbedResult,
    FromWorker,
    Generate,
    GenerateResult,
    Infer,
    InferResult,
    ModelMetadata,
    RequestLimits,
    SizeLimits,
    TensorData,
    TensorSpec,
    TextDelta,
    WorkRequest,
)

pytestmark = pytest.mark.unit

KEY = "Bearer good-key"
LIMIT_HEADERS = [(b"x-ratelimit-limit-requests", b"60"), (b"x-ratelimit-remaining-requests", b"59")]
METADATA = ModelMetadata(
    runtime="echo",
    capabilities=["infer", "chat", "completions", "embeddings"],
    inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
    outputs=[TensorSpec(name="output", datatype="FP32", shape=[-1, 4])],
    embedding_dim=2,
)
OIP = "/v2/models/echo/infer"
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
EMBED = {"model": "echo", "input": "a"}
NO_KEY = {"headers": {"authorization": ""}}
TEXT = {"headers": {"content-type": "text/plain"}}


@dataclass
class Caller:
    tenant_name: str = "acme"


@dataclass
class Ticket:
    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: list(LIMIT_HEADERS))
    closed: int = 0

    def close(self) -> None:
        self.closed += 1


class Pipeline:
    """The gateway as the inference routes see it, with the faults a test asks for."""

    limits = RequestLimits(max_body_bytes=4096, max_tokens_limit=1024, max_choices=4)

    def __init__(self, fault: str | None = None) -> None:
        self.fault = fault
        self.tickets: list[Ticket] = []
        self.cancelled = False
        self.called = asyncio.Event()

    async def authenticate(self, authorization: str | None) -> Caller:
        if authorization != KEY:
            raise AuthenticationError()
        return Caller()

    def authorize(self, principal: Caller, action: str, model: str | None = None) -> None:
        if self.fault == "forbidden":
            raise PermissionDenied("This API key may not use this model.")

    def require_model(self, name: str) -> None:
        if name != "echo":
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")

    def ready_model(self, name: str, capability: str | None) -> ModelMetadata:
        if self.fault == "unavailable":
            raise ModelUnavailable("The model 'echo' is loading; retry shortly.", retry_after_s=3)
        return METADATA

    def size_limits(self, name: str) -> SizeLimits:
        return SizeLimits(max_batch=8, max_input_elements=1000, max_answer_bytes=100_000)

    def admit(
        self,
        principal: Caller,
        model: str,
        *,
        tokens: int = 0,
        request_bytes: int = 0,
        tokens_up_to: int | None = None,
    ) -> Ticket:
        if self.fault == "quota":
            raise RateLimited(
                "Rate limit exceeded: 60 requests per minute.",
                headers={"retry-after": "7", "x-ratelimit-remaining-requests": "0"},
            )
        ticket = Ticket()
        self.tickets.append(ticket)
        return ticket

    async def call(self, model: str, message: WorkRequest, ticket: Ticket) -> FromWorker:
        self.called.set()
        if self.fault == "crash":
            raise RuntimeError("a bug that must not quote the payload")
        if self.fault == "http":
            raise HTTPException(418)
        if self.fault == "hang":
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if isinstance(message, Infer):
            return InferResult(id=0, outputs=[msgspec_replace(message.inputs[0], "output")])
        if isinstance(message, Embed):
            vectors = np.ones((len(message.texts), 2), dtype="<f4").tobytes()
            return EmbedResult(
                id=0, vectors=vectors, count=len(message.texts), dim=2, prompt_tokens=3
            )
        assert isinstance(message, Generate)
        return GenerateResult(
            id=0,
            choices=[Choice(index=0, text="hello", finish_reason="stop")],
            prompt_tokens=2,
            completion_tokens=1,
        )

    async def stream(
        self, model: str, message: WorkRequest, ticket: Ticket
    ) -> AsyncGenerator[FromWorker, None]:
        yield TextDelta(id=0, index=0, text="hel")
        yield TextDelta(id=0, index=0, text="lo")
        yield GenerateResult(
            id=0,
            choices=[Choice(index=0, text="hello", finish_reason="stop")],
            prompt_tokens=2,
            completion_tokens=2,
        )


def msgspec_replace(tensor: TensorData, name: str) -> TensorData:
    return TensorData(name=name, datatype=tensor.datatype, shape=tensor.shape, raw=tensor.raw)


@dataclass
class Served:
    """What one app did with one request."""

    status: int | None
    headers: list[tuple[bytes, bytes]]
    body: bytes
    messages: list[dict[str, Any]]
    receives: int
    scope: dict[str, Any]
    pipeline: Pipeline
    metrics: Metrics
    log: list[tuple[Any, ...]]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _apps(pipeline: Pipeline) -> tuple[FastPath, Metrics]:
    metrics = Metrics()
    services = SimpleNamespace(
        control=SimpleNamespace(started=True),
        gateway=pipeline,
        settings=SimpleNamespace(body_timeout_s=5.0),
        metrics=metrics,
        meter=SimpleNamespace(sync=lambda: None),
    )
    return create_app(cast(Services, services)), metrics


def serve(
    path: str,
    body: bytes | dict[str, Any] = b"",
    *,
    fast: bool,
    fault: str | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    leave_after_call: bool = False,
) -> Served:
    """Send one request to a fresh app: its fast path, or the Starlette app behind it."""
    pipeline = Pipeline(fault)
    front, metrics = _apps(pipeline)
    app: Any = front if fast else front.app
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    sent_headers = {"content-type": "application/json", "authorization": KEY}
    sent_headers.update(headers or {})
    sent_headers.setdefault("content-length", str(len(raw)))
    on_lost: list[Any] = []
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "root_path": "",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in sent_headers.items() if v],
        "state": {ON_CLIENT_LEFT: on_lost},
    }
    messages: list[dict[str, Any]] = []
    receives = 0
    done: asyncio.Event | None = None

    async def receive() -> dict[str, Any]:
        # The body, then (as uvicorn does) nothing until the answer is complete.
        nonlocal receives
        receives += 1
        if receives == 1:
            return {"type": "http.request", "body": raw, "more_body": False}
        assert done is not None
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            assert done is not None
            done.set()

    async def run() -> None:
        nonlocal done
        done = asyncio.Event()
        task = asyncio.create_task(app(scope, receive, send))
        if leave_after_call:
            await pipeline.called.wait()
            await asyncio.sleep(0)
            # What api/transport.py does when the connection is lost.
            lost = list(on_lost)
            on_lost.clear()
            for function in lost:
                function()
        await task

    records = _Records()
    access = logging.getLogger("bastion.access")
    level = access.level
    access.addHandler(records)
    access.setLevel(logging.INFO)
    try:
        asyncio.run(run())
    finally:
        access.removeHandler(records)
        access.setLevel(level)
    start = next((m for m in messages if m["type"] == "http.response.start"), None)
    body_out = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    log = [
        (
            r.getMessage(),
            *(getattr(r, k, None) for k in ("method", "route", "status", "tenant", "model")),
            getattr(r, "exc_type", None),
        )
        for r in records.records
    ]
    return Served(
        status=start["status"] if start else None,
        headers=list(start["headers"]) if start else [],
        body=body_out,
        messages=messages,
        receives=receives,
        scope=scope,
        pipeline=pipeline,
        metrics=metrics,
        log=log,
    )


def _requests_samples(metrics: Metrics) -> list[str]:
    """The request counter's samples and the latency histogram's counts (not times)."""
    return sorted(
        line
        for line in metrics.render().decode().splitlines()
        if line.startswith(("bastion_requests_total{", "bastion_request_duration_seconds_count"))
    )


def _comparable(body: bytes) -> Any:
    """The body, less what differs from one answer to the next (a completion's id and
    time)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    if isinstance(answer, dict) and str(answer.get("id", "")).startswith(("chatcmpl-", "cmpl-")):
        answer = {k: v for k, v in answer.items() if k not in ("id", "created")}
        return answer
    return body


def both(path: str, body: bytes | dict[str, Any] = b"", **kwargs: Any) -> Served:
    """Serve the request both ways; everything observable must match. Returns the fast
    path's account of it."""
    fast = serve(path, body, fast=True, **kwargs)
    slow = serve(path, body, fast=False, **kwargs)
    assert fast.status == slow.status
    assert fast.headers == slow.headers
    assert _comparable(fast.body) == _comparable(slow.body)
    assert [m["type"] for m in fast.messages] == [m["type"] for m in slow.messages]
    assert fast.receives == slow.receives
    assert _requests_samples(fast.metrics) == _requests_samples(slow.metrics)
    assert fast.log == slow.log
    assert [t.closed for t in fast.pipeline.tickets] == [t.closed for t in slow.pipeline.tickets]
    assert fast.metrics.serving == slow.metrics.serving == 0
    # The fast path served it (Starlette's exception middleware marks what it sees).
    assert "starlette.exception_handlers" not in fast.scope
    assert "starlette.exception_handlers" in slow.scope
    return fast


def _tensor(values: list[Any], shape: list[int] | None = None) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": shape or [1, 4], "datatype": "FP32",
                        "data": values}]}  # fmt: skip


def test_an_answer_is_the_same_with_its_rate_limit_headers_and_settled_once() -> None:
    served = both(OIP, _tensor([0.5, 1.0, 2.0, 3.0]))
    assert served.status == 200
    assert served.headers[-2:] == LIMIT_HEADERS
    assert json.loads(served.body)["outputs"][0]["data"] == [0.5, 1.0, 2.0, 3.0]
    assert [t.closed for t in served.pipeline.tickets] == [1]
    labels = 'model="echo",route="/v2/models/{name}/infer",status="200",tenant="acme"'
    assert f"bastion_requests_total{{{labels}}} 1.0" in _requests_samples(served.metrics)
    assert served.log == [("request", "POST", "/v2/models/{name}/infer", 200, "acme", "echo", None)]


def test_the_versioned_route_and_its_path_parameters() -> None:
    served = both("/v2/models/echo/versions/7/infer", _tensor([1, 2, 3, 4]))
    assert served.status == 200
    assert served.scope["path_params"] == {"name": "echo", "version": "7"}
    assert served.scope["route"].path == "/v2/models/{name}/versions/{version}/infer"


@pytest.mark.parametrize(
    ("status", "path", "body", "options"),
    [
        (401, OIP, _tensor([1, 2, 3, 4]), NO_KEY),
        (401, "/v1/embeddings", EMBED, NO_KEY),
        (403, OIP, _tensor([1, 2, 3, 4]), {"fault": "forbidden"}),
        (404, "/v2/models/nope/infer", _tensor([1, 2, 3, 4]), {}),
        (404, "/v1/chat/completions", {**CHAT, "model": "nope"}, {}),
        (413, OIP, _tensor([1, 2, 3, 4]), {"headers": {"content-length": "100000"}}),
        (413, OIP, _tensor([1.0] * 4 * 9, [9, 4]), {}),
        (415, OIP, _tensor([1, 2, 3, 4]), TEXT),
        (415, "/v1/embeddings", EMBED, TEXT),
        (400, OIP, b"{not json", {}),
        (400, OIP, _tensor([1, 2, "x", 4]), {}),
        (400, "/v1/embeddings", b"[]", {}),
        (429, OIP, _tensor([1, 2, 3, 4]), {"fault": "quota"}),
        (429, "/v1/chat/completions", CHAT, {"fault": "quota"}),
        (503, OIP, _tensor([1, 2, 3, 4]), {"fault": "unavailable"}),
        (500, OIP, _tensor([1, 2, 3, 4]), {"fault": "crash"}),
        (500, "/v1/embeddings", EMBED, {"fault": "crash"}),
        (400, OIP, _tensor([1, 2, 3, 4]), {"fault": "http"}),
    ],
)  # fmt: skip
def test_error_answers_are_the_same(
    status: int, path: str, body: bytes | dict[str, Any], options: dict[str, Any]
) -> None:
    served = both(path, body, **options)
    assert served.status == status
    error = json.loads(served.body)["error"]
    # Each API's own shape: OIP's {"error": "..."}, OpenAI's {"error": {...}}.
    assert isinstance(error, str) if path.startswith("/v2/") else set(error) >= {"message", "code"}
    assert b"payload" not in served.body
    if status == 401:
        assert (b"www-authenticate", b'Bearer realm="bastion"') in served.headers
    if status == 503:
        assert (b"retry-after", b"3") in served.headers
    if status == 429:
        assert (b"retry-after", b"7") in served.headers
    if status == 500:
        # Logged by type only, once, before the request's own line.
        assert served.log[0] == ("unhandled error", None, None, None, None, None, "RuntimeError")
    if status == 413 and served.headers and "content-length" in (options.get("headers") or {}):
        # Refused on its declared size, before a byte of it was read.
        assert served.receives == 0
    # Whatever was admitted is settled, once.
    assert all(t.closed == 1 for t in served.pipeline.tickets)


def test_the_openai_routes_answer_alike() -> None:
    chat = both("/v1/chat/completions", CHAT)
    assert chat.status == 200
    assert json.loads(chat.body)["choices"][0]["message"]["content"] == "hello"
    embedded = both("/v1/embeddings", {"model": "echo", "input": ["a", "b"]})
    assert embedded.status == 200 and len(json.loads(embedded.body)["data"]) == 2
    assert embedded.headers[-2:] == LIMIT_HEADERS


def test_a_streamed_answer_keeps_its_headers_and_events() -> None:
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    fast = serve("/v1/chat/completions", body, fast=True)
    slow = serve("/v1/chat/completions", body, fast=False)
    assert fast.status == slow.status == 200
    assert fast.headers == slow.headers
    assert fast.headers[-2:] == LIMIT_HEADERS
    # The chunks carry an id and a time of their own: compare their shape.
    assert fast.body.count(b"data: ") == slow.body.count(b"data: ") == 5
    assert fast.body.endswith(b"data: [DONE]\n\n")
    assert _requests_samples(fast.metrics) == _requests_samples(slow.metrics)
    assert [t.closed for t in fast.pipeline.tickets] == [1]


def test_a_client_that_leaves_cancels_its_request_which_is_still_settled() -> None:
    served = both(OIP, _tensor([1, 2, 3, 4]), fault="hang", leave_after_call=True)
    # Nobody to answer: nothing sent, the model's call cancelled, the hold settled, 499.
    assert served.status is None and served.messages == []
    assert served.pipeline.cancelled
    assert [t.closed for t in served.pipeline.tickets] == [1]
    assert served.log == [("request", "POST", "/v2/models/{name}/infer", 499, "acme", "echo", None)]


def test_an_answered_request_leaves_nothing_to_call_when_the_connection_ends() -> None:
    served = serve(OIP, _tensor([1, 2, 3, 4]), fast=True)
    assert served.status == 200
    assert served.scope["state"][ON_CLIENT_LEFT] == []


def _starlette_match(app: Starlette, method: str, path: str) -> tuple[Route, dict[str, Any]] | None:
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    for route in app.routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            assert isinstance(route, Route)
            return route, child["path_params"]
    return None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/echo/infer"),
        ("POST", "/v2/models/a.b-c_d/versions/3/infer"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/ohttp"),
    ],
)
def test_the_fast_path_takes_each_inference_route_as_the_router_would(
    method: str, path: str
) -> None:
    front, _ = _apps(Pipeline())
    found = front.match({"type": "http", "method": method, "path": path, "root_path": ""})
    assert found is not None
    route, params = found
    expected = _starlette_match(front.app, method, path)
    assert expected is not None
    assert route is expected[0] and params == expected[1]


@pytest.mark.parametrize(
    ("method", "path", "root_path"),
    [
        ("GET", "/v2/models/echo/infer", ""),
        ("PUT", "/v1/embeddings", ""),
        ("POST", "/v1/embeddings/", ""),
        ("POST", "/v2/models//infer", ""),
        ("POST", "/v2/models/a/b/infer", ""),
        ("POST", "/v2/models/echo/infer/", ""),
        ("POST", "/v2/models/echo/infer\n", ""),
        ("POST", "/v2/models/echo", ""),
        ("POST", "/v1/models", ""),
        ("GET", "/metrics", ""),
        ("POST", "/v2/models/echo/infer", "/prefix"),
    ],
)
def test_everything_else_goes_to_the_starlette_app(method: str, path: str, root_path: str) -> None:
    front, _ = _apps(Pipeline())
    scope = {"type": "http", "method": method, "path": path, "root_path": root_path}
    assert front.match(scope) is None


def test_a_method_the_route_does_not_allow_is_answered_by_starlette() -> None:
    served = serve(OIP, fast=True, method="GET")
    assert served.status == 405
    assert json.loads(served.body) == {"error": "Method not allowed on this route."}
    assert "starlette.exception_handlers" in served.scope


def test_a_whole_answer_leaves_in_one_write() -> None:
    class Transport:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.writes.append(bytes(data))

        def is_closing(self) -> bool:
            return False

    transport = Transport()
    writes = HeldWrites(transport)  # type: ignore[arg-type]
    pipeline = Pipeline()
    front, _ = _apps(pipeline)
    raw = json.dumps(_tensor([1, 2, 3, 4])).encode()
    scope: dict[str, Any] = {
        "type": "http", "http_version": "1.1", "method": "POST", "path": OIP, "root_path": "",
        "query_string": b"", "server": ("127.0.0.1", 8000), "scheme": "http",
        "headers": [(b"authorization", KEY.encode()), (b"content-type", b"application/json")],
        "state": {WRITES: writes},
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        # What uvicorn's cycle does with each message: one write each.
        if message["type"] == "http.response.start":
            writes.write(b"HTTP/1.1 %d\r\n\r\n" % message["status"])
        else:
            writes.write(message["body"])

    asyncio.run(front(scope, receive, send))
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200\r\n\r\n{")


def test_a_route_before_an_inference_route_keeps_the_requests_it_takes() -> None:
    async def other(request: Any) -> Any:
        raise AssertionError("not called")

    pipeline = Pipeline()
    front, metrics = _apps(pipeline)
    app = front.app
    special = Route("/v2/models/special/infer", other, methods=["POST"])
    anything = Route("/v1/{rest:path}", other, methods=["POST"])
    app.router.routes[:0] = [special, anything]
    shadowed = FastPath(app, metrics)

    def match(path: str) -> Route | None:
        found = shadowed.match({"type": "http", "method": "POST", "path": path, "root_path": ""})
        return found[0] if found else None

    assert match("/v2/models/special/infer") is None
    found = match("/v2/models/echo/infer")
    assert found is not None and found.path == "/v2/models/{name}/infer"
    # A path convertor may take anything: the /v1 routes after it are left to the router.
    assert match("/v1/chat/completions") is None and match("/v1/embeddings") is None
    for path in ("/v2/models/special/infer", "/v2/models/echo/infer", "/v1/embeddings"):
        expected = _starlette_match(app, "POST", path)
        assert expected is not None
        assert (match(path) or expected[0]) is expected[0]


def test_the_fast_path_is_off_for_an_app_with_other_layers() -> None:
    front, metrics = _apps(Pipeline())
    app = front.app
    app.user_middleware.append(app.user_middleware[0])
    assert (
        FastPath(app, metrics).match(
            {"type": "http", "method": "POST", "path": OIP, "root_path": ""}
        )
        is None
    )
