"""The text-generation runtime's logits bias, with the KGW watermark on tiny-chat."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bastion.protection.textmark import TextWatermark
from bastion.runtimes.base import CancelToken
from bastion.runtimes.textgen import TextGenerationRuntime, load
from bastion.wire.protocol import ChatMessage, Generate

pytestmark = pytest.mark.unit

TINY_CHAT = Path(__file__).parents[3] / "src/bastion/models/demo_assets/tiny-chat"
KEY = bytes(range(32))
PROMPTS = [
    "Tell me something.",
    "Say something wise.",
    "What is the meaning of life?",
    "Tell me a joke.",
    "Give me some advice.",
    "What do you think about computers?",
]
SCORED = 200
MAX_ANSWERS = 30


@pytest.fixture(scope="module")
def runtime() -> TextGenerationRuntime:
    return load(TINY_CHAT, {"threads": 1})


@pytest.fixture(scope="module")
def watermark(runtime: TextGenerationRuntime) -> TextWatermark:
    return TextWatermark(KEY, runtime.vocab_size)


def _answer(
    runtime: TextGenerationRuntime,
    prompt: str,
    temperature: float,
    seed: int,
    top_p: float = 1.0,
    max_tokens: int = 200,
) -> str:
    request = Generate(
        id=1,
        messages=[ChatMessage(role="user", content=prompt)],
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    return runtime.generate(request, CancelToken(), lambda index, text: None).choices[0].text


def _answers_tokens(
    runtime: TextGenerationRuntime,
    watermark: TextWatermark,
    temperature: float,
    seed: int,
    top_p: float = 1.0,
) -> list[int]:
    """Answers to several prompts, re-tokenized from their text, until 200 bigrams score.

    Detection works from text, as it would on text found elsewhere: the ids a tokenizer
    gives back are not always those the model generated, which costs a little z.
    """
    tokens: list[int] = []
    for index in range(MAX_ANSWERS):
        prompt = PROMPTS[index % len(PROMPTS)]
        text = _answer(runtime, prompt, temperature, 1000 * seed + index, top_p)
        tokens += runtime.tokenize(text)
        if watermark.score(tokens).tokens_scored >= SCORED:
            return tokens
    raise AssertionError("the answers were too short or too repetitive to score")


def test_vocab_size_and_tokenize(runtime: TextGenerationRuntime) -> None:
    assert runtime.vocab_size == 4096
    ids = runtime.tokenize("Hello world")
    assert ids
    assert 1 not in ids  # no <s>: special tokens are left out
    assert all(0 <= i < runtime.vocab_size for i in ids)


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 1.0), (0.8, 0.95), (1.0, 1.0)])
def test_watermarked_answers_are_detected(
    runtime: TextGenerationRuntime, watermark: TextWatermark, temperature: float, top_p: float
) -> None:
    runtime.set_logits_bias(watermark.bias)
    try:
        for seed in range(2):
            tokens = _answers_tokens(runtime, watermark, temperature, seed, top_p)
            detection = watermark.score(tokens)
            assert detection.tokens_scored >= SCORED
            # Measured on re-tokenized text: z from 9.6 to 17.7 (mean 13 to 16), delta 2.
            assert detection.z > 6, detection
            assert detection.watermarked
            # Another model's key does not detect it.
            assert TextWatermark(KEY[::-1], runtime.vocab_size).score(tokens).z < 4
    finally:
        runtime.set_logits_bias(None)


def test_unwatermarked_answers_are_not_detected(
    runtime: TextGenerationRuntime, watermark: TextWatermark
) -> None:
    # Without the bias the z-score is about standard normal. Measured on 3,000 samples
    # (300 texts at temperature 0.8, 10 keys): 2.3% at 2 or more, 0.07% at 3 or more,
    # none above 4; z < 2 in 99% of samples is more than any calibrated score can give.
    runtime.set_logits_bias(None)
    zs = []
    for seed in range(6):
        detection = watermark.score(_answers_tokens(runtime, watermark, 0.8, seed))
        assert detection.tokens_scored >= SCORED
        assert not detection.watermarked, detection
        zs.append(detection.z)
    # Measured: 0.63, 2.29, 0.08, -1.38, -1.25, 0.04.
    assert max(zs) < 3
    assert sum(z < 2 for z in zs) >= 5
    assert abs(sum(zs) / len(zs)) < 1


def test_no_bias_leaves_generation_unchanged(runtime: TextGenerationRuntime) -> None:
    runtime.set_logits_bias(None)
    cases = [(0.0, 1.0), (0.8, 1.0), (0.8, 0.9)]
    before = [_answer(runtime, "Tell me something.", t, 5, top_p=p) for t, p in cases]
    seen: list[int] = []

    def identity(previous: int, logits: torch.Tensor) -> torch.Tensor:
        seen.append(previous)
        return logits

    runtime.set_logits_bias(identity)
    try:
        assert [_answer(runtime, "Tell me something.", t, 5, top_p=p) for t, p in cases] == before
    finally:
        runtime.set_logits_bias(None)
    assert seen
    assert [_answer(runtime, "Tell me something.", t, 5, top_p=p) for t, p in cases] == before


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_bias_gets_the_previous_token(runtime: TextGenerationRuntime, temperature: float) -> None:
    # A bias that allows only one token, chosen from the previous one, fixes the whole
    # output; it is right only if each call gets the token generated just before.
    def successor(previous: int) -> int:
        return 1000 + (previous + 1 - 1000) % 100

    seen: list[int] = []

    def force(previous: int, logits: torch.Tensor) -> torch.Tensor:
        seen.append(previous)
        forced = torch.full_like(logits, -torch.inf)
        forced[successor(previous)] = 0
        return forced

    runtime.set_logits_bias(force)
    try:
        text = _answer(runtime, "Tell me something.", temperature, 3, max_tokens=12)
    finally:
        runtime.set_logits_bias(None)
    assert seen[0] == runtime.tokenize("<|assistant|>\n")[-1]  # the prompt's last token
    expected = [successor(seen[0])]
    while len(expected) < 12:
        expected.append(successor(expected[-1]))
    assert seen[1:] == expected[:-1]
    assert text == runtime._tokenizer.decode(expected, skip_special_tokens=True)
