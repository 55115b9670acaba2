"""Continuous batching of text generation against a real server, with the openai SDK:
concurrent requests decode together, and each one's text is what it gets alone."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import openai
import pytest

from bastion_testing import BastionServer, batched_requests

pytestmark = pytest.mark.e2e

PROMPTS = [
    "Tell me about the sea.",
    "What is a cat?",
    "Say something kind to a friend who is sad today.",
    "Why?",
    "Count to five.",
    "Write about the sun and the moon.",
]


def _client(server: BastionServer, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


async def _chat(client: openai.AsyncOpenAI, prompt: str, **extra: Any) -> tuple[str, int]:
    """A streamed chat answer's text and its completion tokens."""
    stream = await client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    text, used = "", 0
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    return text, used


def _batched_requests(server: BastionServer) -> tuple[float, float]:
    return batched_requests(server, "tiny-chat")


def _compute_seconds(server: BastionServer) -> float:
    """The compute seconds metered for tiny-chat so far, all tenants."""
    with server.client() as admin:
        text = admin.get("/metrics").text
    pattern = r'^bastion_worker_compute_seconds_total\{model="tiny-chat",[^}]*\} (\S+)$'
    return sum(map(float, re.findall(pattern, text, re.MULTILINE)))


def test_metadata_declares_continuous_batching(server: BastionServer, consumer_key: str) -> None:
    with server.client(consumer_key) as client:
        model = client.get("/v1/models/tiny-chat").json()
    assert model["batching"] == {"continuous": True, "max_sequences": 8}


def test_concurrent_greedy_streams_equal_their_answers_alone(
    server: BastionServer, consumer_key: str
) -> None:
    async def scenario() -> None:
        client = _client(server, consumer_key)
        alone = [
            await _chat(client, p, max_tokens=12 + 4 * i, temperature=0)
            for i, p in enumerate(PROMPTS)
        ]
        before, charged = _batched_requests(server), _compute_seconds(server)
        begun = time.perf_counter()
        together = await asyncio.gather(
            *(_chat(client, p, max_tokens=12 + 4 * i, temperature=0) for i, p in enumerate(PROMPTS))
        )
        elapsed = time.perf_counter() - begun
        after = _batched_requests(server)
        assert together == alone
        # They were decoded together (each reports the sequences it joined).
        assert after[0] - before[0] >= 3
        # Each was charged its share of the steps it was in, not the time it spent
        # decoding beside the others: together, no more than the time they all took.
        assert 0 < _compute_seconds(server) - charged <= elapsed

    asyncio.run(scenario())


def test_seeds_reproduce_and_a_cancelled_stream_leaves_the_others_exact(
    server: BastionServer, consumer_key: str
) -> None:
    async def scenario() -> None:
        client = _client(server, consumer_key)
        seeded = {"max_tokens": 20, "temperature": 0.9, "seed": 7}
        alone = await _chat(client, PROMPTS[0], **seeded)
        stopped = await _chat(client, PROMPTS[2], max_tokens=30, temperature=0, stop=["e"])
        assert "e" not in stopped[0]

        async def abandon() -> None:
            stream = await client.chat.completions.create(
                model="tiny-chat",
                messages=[{"role": "user", "content": PROMPTS[1]}],
                max_tokens=60,
                stream=True,
                temperature=0,
            )
            async for _ in stream:
                break
            await stream.close()

        results = await asyncio.gather(
            abandon(),
            _chat(client, PROMPTS[0], **seeded),
            _chat(client, PROMPTS[2], max_tokens=30, temperature=0, stop=["e"]),
        )
        assert results[1] == alone
        assert results[2] == stopped

    asyncio.run(scenario())
