"""The text-generation runtime on a small random Llama, and on tiny-chat when it is present."""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from bastion.runtimes.base import CancelToken, RuntimeInputError, UnsupportedOperation
from bastion.runtimes.textgen import TextGenerationRuntime, find_stop, holdback_length, load
from bastion.wire.protocol import ChatMessage, Embed, Generate, GenerateResult, Infer

TINY_CHAT = Path(__file__).parents[3] / "src/bastion/models/demo_assets/tiny-chat"


@pytest.fixture(scope="module")
def runtime(tiny_llama_dir: Path) -> TextGenerationRuntime:
    return load(tiny_llama_dir, {"threads": 1})


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))


def _run(runtime: TextGenerationRuntime, **fields: object) -> tuple[GenerateResult, dict[int, str]]:
    streamed: dict[int, str] = defaultdict(str)

    def emit(index: int, text: str) -> None:
        assert text, "empty deltas must not be emitted"
        streamed[index] += text

    request = Generate(id=7, **fields)  # type: ignore[arg-type]
    return runtime.generate(request, CancelToken(), emit), streamed


def test_metadata(runtime: TextGenerationRuntime) -> None:
    metadata = runtime.metadata()
    assert metadata.runtime == "text-generation"
    assert metadata.capabilities == ["chat", "completions"]
    assert metadata.context_length == 64
    assert metadata.platform == "transformers"
    assert torch.get_num_threads() == 1  # options["threads"]


def test_other_operations_are_unsupported(runtime: TextGenerationRuntime) -> None:
    with pytest.raises(UnsupportedOperation):
        runtime.embed(Embed(id=1, texts=["x"]))
    with pytest.raises(UnsupportedOperation):
        runtime.infer(Infer(id=1, inputs=[]))


def test_greedy_completion_runs_to_max_tokens(
    runtime: TextGenerationRuntime, tokenizer: Tokenizer
) -> None:
    result, streamed = _run(runtime, prompt="The quick brown", max_tokens=12, temperature=0)
    assert result.id == 7
    assert [c.finish_reason for c in result.choices] == ["length"]
    assert result.choices[0].text
    assert result.completion_tokens == 12
    # A plain prompt is encoded with the tokenizer's special tokens (here a leading <|bos|>).
    assert result.prompt_tokens == len(tokenizer.encode("The quick brown").ids)
    assert not streamed
    again, _ = _run(runtime, prompt="The quick brown", max_tokens=12, temperature=0)
    assert again.choices[0].text == result.choices[0].text


def test_n_choices_count_prompt_once(runtime: TextGenerationRuntime, tokenizer: Tokenizer) -> None:
    result, _ = _run(runtime, prompt="Hello", max_tokens=5, temperature=0, n=3)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert len({c.text for c in result.choices}) == 1  # greedy: the same text each time
    assert result.prompt_tokens == len(tokenizer.encode("Hello").ids)
    assert result.completion_tokens == 15


def test_chat_uses_the_template(runtime: TextGenerationRuntime, tokenizer: Tokenizer) -> None:
    messages = [ChatMessage(role="user", content="hi")]
    result, _ = _run(runtime, messages=messages, max_tokens=4, temperature=0)
    # The template writes the special tokens itself; none are added on top.
    rendered = tokenizer.encode("<|user|>hi<|eos|><|assistant|>", add_special_tokens=False)
    assert rendered.tokens[0] == "<|user|>"
    assert result.prompt_tokens == len(rendered.ids)


def test_template_exception_is_an_input_error(runtime: TextGenerationRuntime) -> None:
    secret = "tool-role-secret-content"
    with pytest.raises(RuntimeInputError) as caught:
        _run(runtime, messages=[ChatMessage(role=secret, content="x")], max_tokens=2)
    assert secret not in caught.value.message


def test_streaming_deltas_equal_the_whole_text(runtime: TextGenerationRuntime) -> None:
    plain, _ = _run(runtime, prompt="Café 🙂", max_tokens=20, temperature=0, n=2)
    streamed_result, streamed = _run(
        runtime, prompt="Café 🙂", max_tokens=20, temperature=0, n=2, stream=True
    )
    assert [c.text for c in streamed_result.choices] == ["", ""]
    assert streamed == {0: plain.choices[0].text, 1: plain.choices[1].text}


def test_sampling_is_reproducible_with_a_seed(runtime: TextGenerationRuntime) -> None:
    first, _ = _run(runtime, prompt="A small", max_tokens=15, temperature=1.0, seed=11, n=2)
    second, _ = _run(runtime, prompt="A small", max_tokens=15, temperature=1.0, seed=11, n=2)
    other, _ = _run(runtime, prompt="A small", max_tokens=15, temperature=1.0, seed=12, n=2)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices]
    assert texts != [c.text for c in other.choices]
    # Each choice has a generator of its own, seeded from the seed and its index: they differ.
    assert texts[0] != texts[1]


def test_tiny_top_p_is_greedy(runtime: TextGenerationRuntime) -> None:
    greedy, _ = _run(runtime, prompt="Numbers", max_tokens=10, temperature=0)
    nucleus, _ = _run(runtime, prompt="Numbers", max_tokens=10, temperature=0.7, top_p=1e-6)
    assert nucleus.choices[0].text == greedy.choices[0].text


def test_vanishing_temperature_or_top_p_is_greedy_not_an_error(
    runtime: TextGenerationRuntime,
) -> None:
    # 1e-300 overflowed the logits to infinities (temperature) or was 0 in float32 and
    # dropped every token (top_p): torch refused to sample, a 500.
    greedy, _ = _run(runtime, prompt="Numbers", max_tokens=10, temperature=0)
    for sampling in ({"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 5e-324}):
        result, _ = _run(runtime, prompt="Numbers", max_tokens=10, seed=3, **sampling)
        assert result.choices[0].text == greedy.choices[0].text, sampling


def test_stop_string_ends_the_text(runtime: TextGenerationRuntime) -> None:
    full, _ = _run(runtime, prompt="Stop here", max_tokens=20, temperature=0)
    text = full.choices[0].text
    assert len(text) > 8
    stop = text[4:7]
    expected = text[: text.find(stop)]
    stopped, _ = _run(runtime, prompt="Stop here", max_tokens=20, temperature=0, stop=[stop])
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.completion_tokens < 20
    streamed_result, streamed = _run(
        runtime, prompt="Stop here", max_tokens=20, temperature=0, stop=[stop], stream=True
    )
    assert streamed[0] == expected
    assert streamed_result.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("seed", range(4))
def test_sampled_streams_with_stop_strings_match(runtime: TextGenerationRuntime, seed: int) -> None:
    # Sampling from a random model gives odd byte sequences (cut multi-byte characters),
    # the hard case for streaming; the stream must still equal the whole text exactly.
    fields: dict[str, object] = {"prompt": "Café", "max_tokens": 20, "temperature": 1.0}
    full, _ = _run(runtime, seed=seed, **fields)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    plain, _ = _run(runtime, seed=seed, stop=[stop, "never"], **fields)
    streamed_result, streamed = _run(
        runtime, seed=seed, stop=[stop, "never"], stream=True, **fields
    )
    assert plain.choices[0].text == text[: text.find(stop)]
    assert streamed[0] == plain.choices[0].text
    assert streamed_result.choices[0].finish_reason == plain.choices[0].finish_reason == "stop"


def test_holdback_keeps_possible_stop_prefixes() -> None:
    assert holdback_length("hello wor", ["world"]) == 3
    assert holdback_length("hello", ["xyz"]) == 0
    assert holdback_length("aa", ["aab"]) == 2
    assert holdback_length("abc\ufffd", ["zz"]) == 1
    # "c" may begin the stop string "c€" whose last character is still incomplete.
    assert holdback_length("abc\ufffd\ufffd", ["c€"]) == 3
    assert holdback_length("abc", []) == 0
    assert find_stop("one two three", ["three", "two"]) == 4
    assert find_stop("one", ["two"]) == -1


def test_end_token_stops_with_finish_reason_stop(eos_llama_dir: Path) -> None:
    runtime = load(eos_llama_dir, {"threads": 1})
    result, _ = _run(runtime, prompt="hello", max_tokens=10, temperature=0)
    assert result.choices[0].text == ""
    assert result.choices[0].finish_reason == "stop"
    assert result.completion_tokens == 1


def test_min_tokens_holds_the_end_token_back(eos_llama_dir: Path) -> None:
    runtime = load(eos_llama_dir, {"threads": 1})
    result, _ = _run(runtime, prompt="hello", max_tokens=10, temperature=0, min_tokens=6)
    # Without it the model ends at once (see above); with it, at its seventh token.
    assert result.completion_tokens == 7
    assert result.choices[0].finish_reason == "stop"
    # The engine (continuous batching) decodes the same tokens.
    engine = runtime.start_engine(2)
    try:
        done: list[object] = []
        finished = threading.Event()
        request = Generate(id=1, prompt="hello", max_tokens=10, temperature=0, min_tokens=6)

        def record(result: object) -> None:
            done.append(result)
            finished.set()

        engine.submit(request, CancelToken(), lambda i, t: None, record)
        assert finished.wait(60)
    finally:
        engine.close()
    batched = done[0]
    assert isinstance(batched, GenerateResult)
    assert batched.choices[0].text == result.choices[0].text
    assert batched.completion_tokens == result.completion_tokens


def test_context_length_exceeded(runtime: TextGenerationRuntime) -> None:
    prompt = "zebra quartz " * 20
    with pytest.raises(RuntimeInputError) as caught:
        _run(runtime, prompt=prompt, max_tokens=10)
    assert caught.value.code == "context_length_exceeded"
    assert "zebra" not in caught.value.message
    assert "64" in caught.value.message
    # A short prompt with too large a budget also exceeds the context.
    with pytest.raises(RuntimeInputError, match="context"):
        _run(runtime, prompt="hi", max_tokens=64)


def test_invalid_parameters(runtime: TextGenerationRuntime) -> None:
    for fields in ({"max_tokens": 0}, {"n": 0}, {"temperature": -1.0}, {"top_p": 0.0}):
        with pytest.raises(RuntimeInputError):
            _run(runtime, prompt="hi", **fields)
    with pytest.raises(RuntimeInputError):
        _run(runtime)  # neither prompt nor messages


def test_cancel_stops_generation(runtime: TextGenerationRuntime) -> None:
    cancel = CancelToken()
    deltas: list[str] = []

    def emit(index: int, text: str) -> None:
        deltas.append(text)
        cancel.cancel()

    request = Generate(id=1, prompt="The", max_tokens=40, temperature=0, stream=True, n=2)
    result = runtime.generate(request, cancel, emit)
    assert result.completion_tokens < 10
    assert len(deltas) == 1  # nothing is streamed after the cancellation

    cancelled = CancelToken()
    cancelled.cancel()
    quiet = runtime.generate(Generate(id=2, prompt="The", max_tokens=40), cancelled, emit)
    assert quiet.completion_tokens == 0


def test_tiny_chat_answers_in_english() -> None:
    runtime = load(TINY_CHAT, {"threads": 1})
    assert "chat" in runtime.metadata().capabilities
    result, _ = _run(
        runtime,
        messages=[ChatMessage(role="user", content="Hello! How are you today?")],
        max_tokens=40,
        temperature=0,
    )
    words = set(re.findall(r"[a-z']+", result.choices[0].text.lower()))
    common = {"i", "you", "the", "a", "is", "am", "are", "to", "and", "it", "of", "hello", "hi"}
    assert words & common, "expected some common English words"
