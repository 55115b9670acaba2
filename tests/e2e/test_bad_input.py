"""Bad input gets a clear 4xx in the API's own error shape: never a 500 or a traceback."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from bastion_testing import BastionServer

MSG = [{"role": "user", "content": "hi"}]


def _openai_error(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    error: dict[str, str] = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    return error


def test_invalid_json_is_400(server: BastionServer) -> None:
    with server.client() as client:
        response = client.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert _openai_error(response, 400)["code"] == "invalid_json"


def test_wrong_content_type_is_415(server: BastionServer) -> None:
    with server.client() as client:
        response = client.post(
            "/v1/chat/completions", content=b"model=x", headers={"content-type": "text/plain"}
        )
        _openai_error(response, 415)


def test_body_over_limit_is_413(server: BastionServer) -> None:
    big = b'{"model": "echo", "input": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    with server.client() as client:
        response = client.post(
            "/v1/embeddings", content=big, headers={"content-type": "application/json"}
        )
        _openai_error(response, 413)

        def chunks() -> Iterator[bytes]:
            # No Content-Length: the limit is enforced while streaming the body in.
            for start in range(0, len(big), 65536):
                yield big[start : start + 65536]

        streamed = client.post(
            "/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}
        )
        _openai_error(streamed, 413)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "tiny-chat", "messages": MSG, "max_tokens": -1},
        {"model": "tiny-chat", "messages": MSG, "max_tokens": "ten"},
        {"model": "tiny-chat", "messages": MSG, "temperature": 2.5},
        {"model": "tiny-chat", "messages": MSG, "top_p": 1.5},
        {"model": "tiny-chat", "messages": MSG, "n": 99},
        {"model": "tiny-chat", "messages": MSG, "max_tokens": 10**9},
        {"model": "tiny-chat", "messages": []},
        {"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": "tiny-chat"},
        {"model": 5, "messages": MSG},
        [1, 2, 3],
        {"model": "tiny-chat", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]},
    ],
)
def test_out_of_range_and_wrong_types_are_400(server: BastionServer, body: object) -> None:
    with server.client() as client:
        _openai_error(client.post("/v1/chat/completions", json=body), 400)


def test_prompt_longer_than_context_is_400(server: BastionServer) -> None:
    long_prompt = "word " * 5000
    with server.client() as client:
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "tiny-chat", "messages": [{"role": "user", "content": long_prompt}]},
        )
        assert _openai_error(chat, 400)["code"] == "context_length_exceeded"
        emb = client.post("/v1/embeddings", json={"model": "minilm-l6", "input": long_prompt})
        _openai_error(emb, 400)


def test_embeddings_wrong_dimensions_is_400(server: BastionServer) -> None:
    with server.client() as client:
        response = client.post(
            "/v1/embeddings", json={"model": "minilm-l6", "input": "x", "dimensions": 3}
        )
        _openai_error(response, 400)


def test_oip_errors_use_the_oip_shape(server: BastionServer) -> None:
    with server.client() as client:
        bad_shape = client.post(
            "/v2/models/digits/infer",
            json={
                "inputs": [
                    {"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
                ]
            },
        )
        assert bad_shape.status_code == 400
        assert isinstance(bad_shape.json()["error"], str)
        count = client.post(
            "/v2/models/digits/infer",
            json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1]}]},
        )
        assert count.status_code == 400
        strings = client.post(
            "/v2/models/digits/infer",
            json={
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["x"] * 64}
                ]
            },
        )
        assert strings.status_code == 400
        wrong_name = client.post(
            "/v2/models/digits/infer",
            json={
                "inputs": [
                    {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}
                ]
            },
        )
        assert wrong_name.status_code == 400
        missing = client.post("/v2/models/nope/infer", json={"inputs": []})
        assert missing.status_code == 404 and isinstance(missing.json()["error"], str)


def test_unknown_route_and_method(server: BastionServer) -> None:
    with server.client() as client:
        assert _openai_error(client.get("/v1/nothing-here"), 404)["code"] == "route_not_found"
        assert client.get("/v1/chat/completions").status_code == 405
        assert isinstance(client.get("/v2/nothing").json()["error"], str)


def test_a_model_without_the_capability_is_400(server: BastionServer) -> None:
    with server.client() as client:
        response = client.post("/v1/chat/completions", json={"model": "digits", "messages": MSG})
        assert _openai_error(response, 400)["code"] == "unsupported_operation"


# ---------------------------------------------------------------- issue 10's 500s, now 4xx

_JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b'{"model":"echo","messages":[{"role":"user","content":"\xff"}]}'),
        ("/v1/completions", b'{"model":"echo","prompt":"\xc3"}'),
        ("/v1/embeddings", b'{"model":"echo","input":["\xed\xa0\x80"]}'),
        ("/admin/v1/tenants", b'{"name":"\xff"}'),
        ("/admin/v1/keys", b'{"tenant":"\xfe"}'),
    ],
)
def test_invalid_utf8_inside_json_strings_is_400(
    server: BastionServer, path: str, body: bytes
) -> None:
    with server.client() as client:
        response = client.post(path, content=body, headers=_JSON)
    assert _openai_error(response, 400)["code"] == "invalid_json"


def test_invalid_utf8_and_deep_nesting_in_oip_are_400(server: BastionServer) -> None:
    bodies = [
        b'{"inputs":[{"name":"input","shape":[1],"datatype":"BYTES","data":["\xff"]}]}',
        b'{"inputs":[{"name":"\xff","shape":[1],"datatype":"BYTES","data":["a"]}]}',
        b'{"inputs":[{"name":"input","shape":[1,1],"datatype":"FP32","data":'
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}]}",
    ]
    with server.client() as client:
        for body in bodies:
            response = client.post("/v2/models/echo/infer", content=body, headers=_JSON)
            assert response.status_code == 400, response.text
            assert set(response.json()) == {"error"}


def test_json_nested_fifty_thousand_deep_is_400(server: BastionServer) -> None:
    deep = b"[" * 50_000 + b"]" * 50_000
    with server.client() as client:
        for path, body in (
            ("/v1/chat/completions", b'{"model":"echo","messages":' + deep + b"}"),
            ("/v1/completions", b'{"model":"echo","prompt":"x","stop":' + deep + b"}"),
            ("/admin/v1/tenants", b'{"name":' + deep + b"}"),
            ("/v1/embeddings", b'{"model":"echo","input":' + deep + b"}"),
        ):
            response = client.post(path, content=body, headers=_JSON)
            _openai_error(response, 400)


def test_vanishing_temperature_and_top_p_are_greedy_not_500(server: BastionServer) -> None:
    with server.client() as client:
        for sampling in ({"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 5e-324}):
            response = client.post(
                "/v1/completions",
                json={"model": "tiny-chat", "prompt": "The", "max_tokens": 4, **sampling},
            )
            assert response.status_code == 200, (sampling, response.text)


@pytest.mark.parametrize(
    "query", ["since=99999999999d", "since=1e309h", "since=inf", "until=-1e309s",
              "since=0001-01-01T00:00:00+01:00", "since=9999-12-31T23:59:59-01:00"],
)  # fmt: skip
def test_usage_periods_out_of_any_range_are_400(server: BastionServer, query: str) -> None:
    with server.client() as client:
        response = client.get(f"/admin/v1/usage?{query}")
    error = _openai_error(response, 400)
    assert error["param"] == "since"


@pytest.mark.parametrize(
    "expires_at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "1969-07-20T20:17Z"]
)
def test_expiry_out_of_range_is_400(server: BastionServer, tenant: str, expires_at: str) -> None:
    with server.client() as client:
        response = client.post("/admin/v1/keys", json={"tenant": tenant, "expires_at": expires_at})
    assert _openai_error(response, 400)["param"] == "expires_at"
