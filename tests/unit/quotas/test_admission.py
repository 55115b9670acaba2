"""Tickets settle their reservation once, charge late usage, and report OpenAI's headers."""

from __future__ import annotations

from bastion.api.pipeline import estimate_tokens
from bastion.identity.principal import OPERATOR
from bastion.quotas.admission import Ticket, limit_headers, reset_text
from bastion.quotas.limiter import InMemoryLimiter, QuotaLimits, Subject

TENANT = Subject("tenant", "acme")
KEY = Subject("key", "bk_1")
NOON = 1_795_780_800.0


def test_a_ticket_settles_what_was_used_and_charges_what_comes_later() -> None:
    limiter = InMemoryLimiter(clock=lambda: NOON)
    limits = QuotaLimits(tokens_per_minute=1000, concurrent_requests=1)
    subjects = [(TENANT, limits)]
    ticket = Ticket(
        OPERATOR, "echo", limiter=limiter, reservation=limiter.reserve(subjects, tokens=300)
    )
    assert limiter.state(TENANT, limits).remaining_tokens == 700
    ticket.report(40)
    ticket.close()
    ticket.close()  # idempotent
    assert limiter.state(TENANT, limits).remaining_tokens == 960
    # The concurrency slot is free again.
    limiter.settle(limiter.reserve(subjects, tokens=0), 0)
    # A report after the end (a client that left mid-stream) is charged all the same.
    ticket.report(60)
    assert limiter.state(TENANT, limits).remaining_tokens == 900
    assert ticket.used == 40


def test_headers_report_the_tightest_subject() -> None:
    limiter = InMemoryLimiter(clock=lambda: NOON)
    tenant = QuotaLimits(requests_per_minute=100, tokens_per_minute=10_000)
    key = QuotaLimits(requests_per_minute=10)
    limiter.reserve([(TENANT, tenant), (KEY, key)], tokens=500)
    headers = dict(limit_headers([limiter.state(TENANT, tenant), limiter.state(KEY, key)]))
    assert headers == {
        b"x-ratelimit-limit-requests": b"10",
        b"x-ratelimit-remaining-requests": b"9",
        b"x-ratelimit-reset-requests": b"6s",
        b"x-ratelimit-limit-tokens": b"10000",
        b"x-ratelimit-remaining-tokens": b"9500",
        b"x-ratelimit-reset-tokens": b"3s",
    }
    assert limit_headers([limiter.state(TENANT, QuotaLimits(concurrent_requests=2))]) == []


def test_reset_text_and_estimates() -> None:
    assert reset_text(0.0) == "0ms"
    assert reset_text(0.0201) == "21ms"
    assert reset_text(1.5) == "1.5s"
    assert reset_text(360) == "6m0s"
    assert reset_text(3723) == "1h2m3s"
    assert estimate_tokens("abcd", "abcde", "") == 3
    assert estimate_tokens("é" * 4) == 2
