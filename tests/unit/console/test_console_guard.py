"""The console's checks of forms and origins, its cookies' names, and its charts."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response

from bastion.console.charts import short, stacked_by_day
from bastion.console.guard import (
    SESSION_COOKIE,
    PreSession,
    check_same_origin,
    check_token,
    cookie_name,
    read_form,
    set_cookie,
)
from bastion.errors import PayloadTooLarge, PermissionDenied, UnsupportedMediaType


def request(
    headers: dict[str, str] | None = None, *, scheme: str = "http", body: bytes = b""
) -> Request:
    raw = [
        (k.encode(), v.encode()) for k, v in {"host": "127.0.0.1:9000", **(headers or {})}.items()
    ]
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "scheme": scheme,
        "path": "/console/tenants",
        "query_string": b"",
        "headers": raw,
        "server": ("127.0.0.1", 9000),
        "app": SimpleNamespace(state=SimpleNamespace()),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def test_a_post_must_name_this_origin() -> None:
    check_same_origin(request({"origin": "http://127.0.0.1:9000"}))
    check_same_origin(request({"referer": "http://127.0.0.1:9000/console/keys"}))
    for headers in (
        {},
        {"origin": "null"},
        {"origin": "http://127.0.0.1:9001"},
        {"origin": "https://127.0.0.1:9000"},
        {"origin": "http://evil.example", "referer": "http://127.0.0.1:9000/console"},
        {"referer": "http://evil.example/console"},
    ):
        with pytest.raises(PermissionDenied):
            check_same_origin(request(headers))


def test_tokens_are_compared_whole() -> None:
    check_token("abc", "abc")
    for given in (None, "", "ab", "abcd", "abd"):
        with pytest.raises(PermissionDenied):
            check_token("abc", given)
    pre = PreSession()
    value = pre.new_value()
    pre.check(value, pre.token(value))
    with pytest.raises(PermissionDenied):
        pre.check(value, PreSession().token(value))  # another process's key
    with pytest.raises(PermissionDenied):
        pre.check(None, pre.token(value))


def test_cookies_are_host_only_and_secure_over_tls_strict_and_http_only_always() -> None:
    plain, tls = request(), request(scheme="https")
    assert cookie_name(plain, SESSION_COOKIE) == "bastion_console"
    assert cookie_name(tls, SESSION_COOKIE) == "__Host-bastion_console"
    response = Response()
    set_cookie(response, tls, SESSION_COOKIE, "v", max_age=60, strict=True)
    header = response.headers["set-cookie"]
    assert header.startswith("__Host-bastion_console=v;")
    assert {"HttpOnly", "Secure", "Path=/", "SameSite=strict", "Max-Age=60"} <= set(
        header.split("; ")
    )
    assert "Domain" not in header
    response = Response()
    set_cookie(response, plain, SESSION_COOKIE, "v", max_age=60, strict=False)
    assert "Secure" not in response.headers["set-cookie"]
    assert "SameSite=lax" in response.headers["set-cookie"]


def test_forms_are_url_encoded_and_small() -> None:
    form = asyncio.run(
        read_form(
            request(
                {"content-type": "application/x-www-form-urlencoded"},
                body=b"a=1&b=&actions=chat&actions=infer",
            )
        )
    )
    assert form.get("a") == "1" and form.get("b") == "" and form.get("c", "-") == "-"
    assert form.all("actions") == ["chat", "infer"]
    with pytest.raises(UnsupportedMediaType):
        asyncio.run(read_form(request({"content-type": "application/json"}, body=b"{}")))
    with pytest.raises(PayloadTooLarge):
        big = b"a=" + b"x" * (64 * 1024)
        asyncio.run(
            read_form(
                request(
                    {
                        "content-type": "application/x-www-form-urlencoded",
                        "content-length": str(len(big)),
                    },
                    body=big,
                )
            )
        )


def test_a_chart_stacks_each_day_and_folds_the_smallest_series() -> None:
    days = ["2026-12-01", "2026-12-02"]
    values = {f"m{n}": {"2026-12-02": float(n + 1)} for n in range(10)}
    values["m9"]["2026-12-01"] = 4.0
    chart = stacked_by_day("t", days, values, "tokens")
    names = [name for _, name, _ in chart.legend]
    assert names[:2] == ["m9", "m8"] and names[-1] == "other (3)" and len(names) == 8
    second = [b for b in chart.bars if b.x > chart.width / 2]
    # Stacked: each bar starts where the one below it ends, from the baseline up.
    bottom = chart.plot_bottom
    for bar in second:
        assert abs(bar.y + bar.height - bottom) < 0.05
        bottom = bar.y
    # The day's total (55) under a round top (100), with grid lines at round steps.
    assert [label for _, label in chart.ticks] == ["0", "20", "40", "60", "80", "100"]
    assert short(1234) == "1.23k" and short(12) == "12" and short(2.5e6) == "2.5M"
