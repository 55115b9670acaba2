"""Continuous batching in the text-generation runtime (start_engine), on tiny-chat and on
the small random Llama: the engine's answers equal generate()'s, sequence by sequence."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from bastion.protection.textmark import TextWatermark
from bastion.runtimes.base import Cancelled, CancelToken, RuntimeInputError
from bastion.runtimes.textgen import TextGenerationRuntime, choice_seed, load
from bastion.runtimes.textgen_engine import TextGenerationEngine
from bastion.wire.protocol import ChatMessage, Generate, GenerateResult

pytestmark = pytest.mark.unit

TINY_CHAT = Path(__file__).parents[3] / "src/bastion/models/demo_assets/tiny-chat"
WAIT_S = 60.0


@pytest.fixture(scope="module")
def runtime() -> TextGenerationRuntime:
    return load(TINY_CHAT, {"threads": 1})


@pytest.fixture
def engine(runtime: TextGenerationRuntime) -> Iterator[TextGenerationEngine]:
    started = runtime.start_engine(8)
    yield started
    started.close()


class Outcome:
    """The callbacks of one submitted request, and what they received."""

    def __init__(self, on_emit: Callable[[int, str], None] | None = None) -> None:
        self.streamed: dict[int, str] = defaultdict(str)
        self.deltas = 0
        self.calls = 0
        self.value: GenerateResult | BaseException | None = None
        self.threads: set[str] = set()
        self._event = threading.Event()
        self._on_emit = on_emit

    def emit(self, index: int, text: str) -> None:
        assert text, "empty deltas must not be emitted"
        self.streamed[index] += text
        self.deltas += 1
        if self._on_emit is not None:
            self._on_emit(index, text)

    def done(self, value: GenerateResult | BaseException) -> None:
        self.calls += 1
        self.value = value
        self.threads.add(threading.current_thread().name)
        self._event.set()

    def wait(self) -> GenerateResult | BaseException:
        assert self._event.wait(WAIT_S), "done was never called"
        assert self.value is not None
        return self.value

    def result(self) -> GenerateResult:
        value = self.wait()
        assert isinstance(value, GenerateResult), type(value)
        return value

    @property
    def finished(self) -> bool:
        return self._event.is_set()


def _submit(
    engine: TextGenerationEngine,
    request: Generate,
    cancel: CancelToken | None = None,
    on_emit: Callable[[int, str], None] | None = None,
) -> Outcome:
    outcome = Outcome(on_emit)
    engine.submit(request, cancel or CancelToken(), outcome.emit, outcome.done)
    return outcome


def _ignore(index: int, text: str) -> None:
    pass


def _alone(runtime: TextGenerationRuntime, request: Generate) -> GenerateResult:
    return runtime.generate(request, CancelToken(), _ignore)


def _chat(request_id: int, content: str, **fields: Any) -> Generate:
    return Generate(id=request_id, messages=[ChatMessage(role="user", content=content)], **fields)


@contextmanager
def _decode_batch_sizes(runtime: TextGenerationRuntime) -> Iterator[list[int]]:
    """The batch size of every decoding forward (one new token per row) while inside."""
    sizes: list[int] = []

    def record(module: object, args: object, kwargs: dict[str, Any]) -> None:
        ids = kwargs["input_ids"]
        if ids.shape[1] == 1:
            sizes.append(int(ids.shape[0]))

    handle = runtime._model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


@contextmanager
def _engine_held(runtime: TextGenerationRuntime) -> Iterator[threading.Event]:
    """Hold the engine thread in its next forward until the event is set (or the block
    ends): what is submitted meanwhile joins at a later step, deterministically."""
    reached, release = threading.Event(), threading.Event()

    def hold(module: object, args: object, kwargs: dict[str, Any]) -> None:
        reached.set()
        release.wait(WAIT_S)

    handle = runtime._model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        yield reached
    finally:
        release.set()
        handle.remove()


def _wait_until(condition: Callable[[], bool]) -> None:
    event = threading.Event()
    for _ in range(int(WAIT_S / 0.005)):
        if condition():
            return
        event.wait(0.005)
    raise AssertionError("timed out")


def _unmetered(result: GenerateResult) -> GenerateResult:
    """The result without the engine's metering (generate() leaves that to the worker)."""
    return msgspec.structs.replace(result, compute_s=0.0, queue_s=0.0)


def _same(engine_result: GenerateResult, alone: GenerateResult) -> None:
    assert [c.text for c in engine_result.choices] == [c.text for c in alone.choices]
    assert [c.finish_reason for c in engine_result.choices] == [
        c.finish_reason for c in alone.choices
    ]
    assert engine_result.completion_tokens == alone.completion_tokens
    assert engine_result.prompt_tokens == alone.prompt_tokens


def test_greedy_batched_equals_generate_as_requests_join(
    runtime: TextGenerationRuntime, engine: TextGenerationEngine
) -> None:
    first = Generate(id=1, prompt="Once upon a time", max_tokens=40, temperature=0, stream=True)
    later = [
        _chat(2, "Hello! How are you today?", max_tokens=24, temperature=0),
        Generate(id=3, prompt="A", max_tokens=30, temperature=0),
        _chat(4, "What is the meaning of life? Answer with reasons.", max_tokens=20, temperature=0),
        Generate(id=5, prompt="The weather today is", max_tokens=12, temperature=0),
    ]
    quiet_first = msgspec.structs.replace(first, stream=False)
    expected = {r.id: _alone(runtime, r) for r in [quiet_first, *later]}
    assert expected[1].completion_tokens > 20
    proceed = threading.Event()

    def pause(index: int, text: str) -> None:
        if leader.deltas == 3:
            proceed.wait(WAIT_S)  # the engine thread waits here, mid-decoding

    with _decode_batch_sizes(runtime) as sizes:
        leader = _submit(engine, first, on_emit=pause)
        # The others arrive while the first is decoding: they join between two steps.
        _wait_until(lambda: leader.deltas >= 3)
        assert not leader.finished
        outcomes = {r.id: _submit(engine, r) for r in later}
        proceed.set()
        lead = leader.result()
        results = {rid: outcome.result() for rid, outcome in outcomes.items()}
    assert lead.choices[0].text == ""
    assert leader.streamed[0] == expected[1].choices[0].text
    assert lead.completion_tokens == expected[1].completion_tokens
    for rid, result in results.items():
        _same(result, expected[rid])
        assert result.id == rid
    # One forward decoded several requests' tokens: it ran batched, alone at first.
    assert sizes[0] == 1
    assert max(sizes) >= 4
    # Fewer forwards than the tokens decoded: one step served many sequences.
    assert len(sizes) < sum(r.completion_tokens for r in expected.values()) - len(expected)
    assert engine.active == 0


def test_seeded_sampling_does_not_depend_on_batch_mates(
    runtime: TextGenerationRuntime, engine: TextGenerationEngine
) -> None:
    request = Generate(id=9, prompt="Computers are", max_tokens=24, temperature=1.0, seed=7)
    alone = _submit(engine, request).result()
    _same(alone, _alone(runtime, request))
    texts = []
    for mates in (
        [Generate(id=1, prompt="In the beginning there was a long road", max_tokens=30, seed=1)],
        [
            _chat(2, "Tell me a joke.", max_tokens=30, temperature=0.7, seed=2),
            Generate(id=3, prompt="A", max_tokens=30, temperature=0),
            Generate(id=4, prompt="Write a poem about the sea", max_tokens=30, n=2, seed=4),
        ],
    ):
        with _decode_batch_sizes(runtime) as sizes:
            with _engine_held(runtime) as reading_prompt:
                others = [_submit(engine, mate) for mate in mates]
                assert reading_prompt.wait(WAIT_S)
                # Joins the mates after their first step (different widths: padded).
                mine = _submit(engine, request)
            texts.append(mine.result().choices[0].text)
            for other in others:
                other.result()
        assert max(sizes) > 1
    assert texts == [alone.choices[0].text] * 2
    different = _submit(engine, Generate(id=9, prompt="Computers are", max_tokens=24, seed=8))
    assert different.result().choices[0].text != alone.choices[0].text


def test_n_choices_decode_together_and_count_the_prompt_once(
    runtime: TextGenerationRuntime, engine: TextGenerationEngine
) -> None:
    request = Generate(
        id=3, prompt="My favourite food", max_tokens=16, temperature=1.0, seed=5, n=3
    )
    with _decode_batch_sizes(runtime) as sizes:
        result = _submit(engine, request).result()
    assert [c.index for c in result.choices] == [0, 1, 2]
    texts = [c.text for c in result.choices]
    assert len(set(texts)) == 3  # each choice has its own generator
    single = _alone(runtime, Generate(id=3, prompt="My favourite food", max_tokens=16, seed=5))
    assert result.prompt_tokens == single.prompt_tokens  # once, not three times
    assert texts[0] == single.choices[0].text  # choice 0 samples with the seed itself
    # The usage sums the choices; each is the one generate() gives for the same request.
    _same(result, _alone(runtime, request))
    assert sizes[0] == 3
    assert choice_seed(5, 0) == 5
    assert choice_seed(5, 1) != choice_seed(5, 2)


def test_stop_strings_cut_the_text_and_streams_match(
    runtime: TextGenerationRuntime, engine: TextGenerationEngine
) -> None:
    fields: dict[str, Any] = {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0}
    full = _submit(engine, Generate(id=1, **fields)).result().choices[0].text
    assert len(full) > 12
    stop = full[6:9]
    expected = full[: full.find(stop)]
    mate = Generate(id=4, prompt="The weather today is", max_tokens=30, temperature=0)
    mate_outcome = _submit(engine, mate)
    plain = _submit(engine, Generate(id=2, stop=[stop, "never"], **fields))
    streamed = _submit(engine, Generate(id=3, stop=[stop, "never"], stream=True, **fields))
    cut = plain.result()
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    assert cut.completion_tokens < 30
    streamed_result = streamed.result()
    assert streamed_result.choices[0].text == ""
    assert streamed.streamed[0] == expected
    assert streamed_result.choices[0].finish_reason == "stop"
    assert streamed_result.completion_tokens == cut.completion_tokens
    _same(mate_outcome.result(), _alone(runtime, mate))


def test_cancelling_one_request_leaves_the_others_exact(
    runtime: TextGenerationRuntime, engine: TextGenerationEngine
) -> None:
    victim = Generate(id=1, prompt="Once upon a time", max_tokens=40, temperature=0, stream=True)
    others = [
        Generate(id=2, prompt="The weather today is", max_tokens=30, temperature=0),
        _chat(3, "Hello! How are you today?", max_tokens=30, temperature=0),
    ]

    def cancel_after(cancel: CancelToken, deltas: int) -> Callable[[int, str], None]:
        seen = [0]

        def on_emit(index: int, text: str) -> None:
            seen[0] += 1
            if seen[0] == deltas:
                cancel.cancel()

        return on_emit

    # What generate() returns when cancelled at the same point.
    reference_cancel = CancelToken()
    hook = cancel_after(reference_cancel, 3)
    reference = runtime.generate(victim, reference_cancel, lambda index, text: hook(index, text))
    assert reference.completion_tokens < 40
    expected = {r.id: _alone(runtime, r) for r in others}

    cancel = CancelToken()
    outcomes = [_submit(engine, r) for r in others]
    cancelled = _submit(engine, victim, cancel, cancel_after(cancel, 3))
    result = cancelled.result()
    assert cancelled.calls == 1
    assert _unmetered(result) == reference
    assert result.choices[0].finish_reason == "stop"
    assert cancelled.deltas == 3  # nothing streamed after the cancellation
    for request, outcome in zip(others, outcomes, strict=True):
        _same(outcome.result(), expected[request.id])

    # Cancelled before it starts: no token, as generate() answers.
    early = CancelToken()
    early.cancel()
    quiet = _submit(engine, Generate(id=7, prompt="hi", max_tokens=5, n=2), early).result()
    again = runtime.generate(Generate(id=7, prompt="hi", max_tokens=5, n=2), early, _ignore)
    assert _unmetered(quiet) == again
    assert quiet.completion_tokens == 0
    assert engine.active == 0


def test_bad_requests_fail_alone(
    runtime: TextGenerationRuntime, engine: TextGenerationEngine
) -> None:
    good = [
        Generate(id=1, prompt="Once upon a time", max_tokens=20, temperature=0),
        _chat(2, "Tell me a joke.", max_tokens=20, temperature=0),
    ]
    bad = [
        Generate(id=3, prompt="zebra quartz " * 200, max_tokens=10),
        Generate(id=4, prompt="hi", max_tokens=600),
        Generate(id=5, prompt="hi", temperature=-1.0),
        Generate(id=6, prompt="hi", n=0),
        Generate(id=7),
    ]
    outcomes = [_submit(engine, r) for r in [good[0], *bad, good[1]]]
    failures = [outcome.wait() for outcome in outcomes[1:-1]]
    assert all(isinstance(failure, RuntimeInputError) for failure in failures)
    assert [getattr(failure, "code", None) for failure in failures[:2]] == [
        "context_length_exceeded"
    ] * 2
    assert "zebra" not in str(failures[0])
    _same(outcomes[0].result(), _alone(runtime, good[0]))
    _same(outcomes[-1].result(), _alone(runtime, good[1]))
    assert all(outcome.calls == 1 for outcome in outcomes)
    assert all(outcome.threads == {"textgen-engine"} for outcome in outcomes)
    assert engine.active == 0


def test_close_answers_everything_and_stops_the_thread(tiny_llama_dir: Path) -> None:
    # The random Llama does not end early: the requests are long, and only one decodes.
    runtime = load(tiny_llama_dir, {"threads": 1})
    engine = runtime.start_engine(1)
    counts: list[int] = []

    def close_midway(index: int, text: str) -> None:
        if not counts:
            counts.append(engine.active)
            engine.close()  # from the engine thread: it ends after this step

    fields: dict[str, Any] = {"prompt": "The quick brown", "max_tokens": 50, "temperature": 0}
    outcomes = [_submit(engine, Generate(id=0, stream=True, **fields), on_emit=close_midway)]
    outcomes += [_submit(engine, Generate(id=i, **fields)) for i in range(1, 4)]
    values = [outcome.wait() for outcome in outcomes]
    engine.close()
    assert not engine._thread.is_alive()
    assert counts == [4]  # one decoding, three waiting for room
    assert all(isinstance(value, Cancelled) for value in values)
    assert isinstance(values[0], Cancelled) and values[0].prompt_tokens > 0
    assert all(outcome.calls == 1 for outcome in outcomes)
    assert engine.active == 0
    with pytest.raises(RuntimeError):
        _submit(engine, Generate(id=9, prompt="hi"))

    # Closed from another thread while busy: every request is answered once.
    other = runtime.start_engine(2)
    busy = [_submit(other, Generate(id=i, **fields)) for i in range(5)]
    other.close()
    assert not other._thread.is_alive()
    assert all(outcome.calls == 1 for outcome in busy)
    assert other.active == 0
    other.close()  # twice is harmless


def test_logits_bias_applies_per_sequence(runtime: TextGenerationRuntime) -> None:
    requests = [
        _chat(1, "Tell me something.", max_tokens=20, temperature=0),
        _chat(2, "Say something wise.", max_tokens=24, temperature=0),
        Generate(id=3, prompt="Once upon a time", max_tokens=16, temperature=0.8, seed=3),
    ]
    plain = [_alone(runtime, r) for r in requests]
    mark = TextWatermark(bytes(range(32)), runtime.vocab_size)
    previous: set[int] = set()

    def bias(token: int, logits: torch.Tensor) -> torch.Tensor:
        previous.add(token)
        return mark.bias(token, logits)

    runtime.set_logits_bias(bias)
    try:
        expected = [_alone(runtime, r) for r in requests]
        engine = runtime.start_engine(8)
        try:
            with _decode_batch_sizes(runtime) as sizes:
                with _engine_held(runtime) as reading_prompt:
                    outcomes = [_submit(engine, requests[0])]
                    assert reading_prompt.wait(WAIT_S)
                    outcomes += [_submit(engine, r) for r in requests[1:]]
                results = [outcome.result() for outcome in outcomes]
        finally:
            engine.close()
    finally:
        runtime.set_logits_bias(None)
    assert max(sizes) == 3
    for result, alone in zip(results, expected, strict=True):
        _same(result, alone)
    # The bias changed the texts (greedy ones included): it was applied, row by row.
    assert [r.choices[0].text for r in results] != [p.choices[0].text for p in plain]
    assert len(previous) > 10


def test_a_failing_forward_or_emit_fails_only_its_requests(
    runtime: TextGenerationRuntime, engine: TextGenerationEngine
) -> None:
    broken = threading.Event()

    def explode(module: object, args: object, kwargs: dict[str, Any]) -> None:
        if kwargs["input_ids"].shape[0] > 1 and not broken.is_set():
            broken.set()
            raise RuntimeError("the forward failed")

    handle = runtime._model.register_forward_pre_hook(explode, with_kwargs=True)
    try:
        first = [
            _submit(engine, Generate(id=i, prompt="Once upon a time", max_tokens=20))
            for i in range(2)
        ]
        failures = [outcome.wait() for outcome in first]
    finally:
        handle.remove()
    assert all(isinstance(failure, RuntimeError) for failure in failures)

    def bad_emit(index: int, text: str) -> None:
        raise ValueError("the client is gone")

    request = Generate(id=5, prompt="Once upon a time", max_tokens=20, temperature=0)
    faulty = Outcome()
    engine.submit(
        Generate(id=6, prompt="A", max_tokens=20, stream=True), CancelToken(), bad_emit, faulty.done
    )
    healthy = _submit(engine, request)
    assert isinstance(faulty.wait(), ValueError)
    _same(healthy.result(), _alone(runtime, request))
    assert engine.active == 0


def test_requests_wait_for_room(runtime: TextGenerationRuntime) -> None:
    requests = [
        Generate(id=1, prompt="Once upon a time", max_tokens=12, temperature=0),
        Generate(id=2, prompt="The weather today is", max_tokens=20, temperature=0),
        Generate(id=3, prompt="A", max_tokens=8, temperature=0),
        # More choices than the engine decodes at once: it runs alone once there is room.
        Generate(id=4, prompt="My favourite food", max_tokens=6, temperature=1.0, seed=2, n=3),
    ]
    expected = [_alone(runtime, r) for r in requests]
    engine = runtime.start_engine(2)
    try:
        with _decode_batch_sizes(runtime) as sizes:
            with _engine_held(runtime) as reading_prompt:
                outcomes = [_submit(engine, requests[0])]
                assert reading_prompt.wait(WAIT_S)
                outcomes += [_submit(engine, r) for r in requests[1:]]
                assert engine.active == 6  # sequences decoding or waiting
            results = [outcome.result() for outcome in outcomes]
    finally:
        engine.close()
    for result, alone in zip(results, expected, strict=True):
        _same(result, alone)
    assert max(sizes[: sizes.index(3)]) == 2  # never more than two, until the n=3 one
    assert sizes.count(3) == 5  # 6 tokens each: the first comes from the prompt's forward
    # Those that waited for room say so; the first started at once.
    assert results[0].queue_s < results[2].queue_s
    assert results[0].queue_s < results[3].queue_s


def test_each_request_is_charged_its_share_of_the_batch(
    runtime: TextGenerationRuntime, engine: TextGenerationEngine
) -> None:
    short = Generate(id=1, prompt="Once upon a time", max_tokens=4, temperature=0)
    long = Generate(id=2, prompt="Once upon a time", max_tokens=48, temperature=0)
    others = [Generate(id=i, prompt="The weather today is", max_tokens=24) for i in range(3, 8)]
    begun = time.perf_counter()
    outcomes = [_submit(engine, request) for request in (short, long, *others)]
    results = [outcome.result() for outcome in outcomes]
    elapsed = time.perf_counter() - begun
    assert all(result.compute_s > 0 for result in results)
    # One engine thread decoded them all: the shares add up to no more than its time (the
    # time each spent beside the others is not charged to each of them).
    assert sum(result.compute_s for result in results) <= elapsed
    # The long one was in many more steps than the short one, and paid for them.
    assert results[1].completion_tokens >= results[0].completion_tokens + 20
    assert results[1].compute_s > results[0].compute_s


@pytest.fixture(scope="module")
def sliding_qwen_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2 whose second layer attends through a sliding window of 8 tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("sliding-qwen")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tiny_llama_dir / name).read_bytes())
    config = Qwen2Config(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[0].zero_()  # no early end (see conftest._quiet_eos)
    model.save_pretrained(directory)
    return directory


def test_sliding_window_caches_decode_apart_but_exact(sliding_qwen_dir: Path) -> None:
    runtime = load(sliding_qwen_dir, {"threads": 1})
    requests = [
        Generate(id=1, prompt="The quick brown fox", max_tokens=20, temperature=0),
        Generate(id=2, prompt="Hello", max_tokens=24, temperature=1.0, seed=4, n=2),
        Generate(id=3, prompt="Numbers like 1234 and 56789 appear", max_tokens=16, temperature=0),
    ]
    expected = [_alone(runtime, r) for r in requests]
    assert expected[0].completion_tokens == 20  # past the window
    engine = runtime.start_engine(8)
    try:
        with _decode_batch_sizes(runtime) as sizes:
            results = [outcome.result() for outcome in [_submit(engine, r) for r in requests]]
    finally:
        engine.close()
    for result, alone in zip(results, expected, strict=True):
        _same(result, alone)
    # Left padding cannot describe a sliding window: each sequence is its own batch.
    assert set(sizes) == {1}
