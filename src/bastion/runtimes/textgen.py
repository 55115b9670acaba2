"""Text generation with a Hugging Face causal language model, on the CPU.

The model is built from its config and its weights are loaded from the bytes of
``model.safetensors`` (``safetensors.torch.load``), and the tokenizer from the text of
``tokenizer.json``, so nothing reads weights from a path a library chooses. The token loop
is our own: it keeps a KV cache, samples with a seeded generator, stops on the end-of-text
token, on ``max_tokens`` or on a stop string, and streams only text that is final.

An optional logits bias (:meth:`TextGenerationRuntime.set_logits_bias`) rewrites the
logits of each step before sampling, given the token before it: a text watermark plugs in
there without this package knowing of it.

Each choice is decoded by a :class:`SequenceState` (its tokens, text, streamed length, finish
and generator); :meth:`TextGenerationRuntime.generate` runs one at a time, and the engine of
:meth:`TextGenerationRuntime.start_engine` (:mod:`bastion.runtimes.textgen_engine`) decodes
the sequences of many requests together, one forward pass per step (continuous batching).
Both use the same per-sequence code, so a sequence's output does not depend on the path.

Seeds: choice 0 of a request with a seed samples with a generator seeded with that seed;
choice ``i > 0`` with one seeded with :func:`choice_seed` (the first 8 bytes of SHA-256 over
the seed and the choice index), so each choice is reproducible on its own, whatever else is
decoded with it. Without a seed each choice's generator is seeded from the OS.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from bastion.runtimes.base import (
    CancelToken,
    EmitDelta,
    ModelFiles,
    RuntimeInputError,
    UnsupportedOperation,
    as_model_files,
)
from bastion.runtimes.chat_template import (
    CHAT_TEMPLATE_FILE,
    TOKENIZER_CONFIG_FILE,
    ChatTemplate,
    find_template_source,
    special_token_text,
)
from bastion.runtimes.transformers_loading import (
    config_from_bytes,
    model_from_bytes,
    read_json_object,
    tokenizer_from_bytes,
)
from bastion.wire.protocol import (
    Choice,
    Embed,
    EmbedResult,
    Generate,
    GenerateResult,
    Infer,
    InferResult,
    ModelMetadata,
)

if TYPE_CHECKING:
    from bastion.runtimes.textgen_engine import TextGenerationEngine

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Below this temperature, sampling is greedy (as in vLLM: 1e-5).
MIN_SAMPLING_TEMPERATURE = 1e-5
# A logits bias: (the previous token, the last position's 1-D logits) -> new logits.
LogitsBias = Callable[[int, torch.Tensor], torch.Tensor]
# Byte-level decoders put this in place of bytes that do not yet form a whole character.
_INCOMPLETE_CHAR = "\ufffd"


def _token_ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def holdback_length(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` must wait before they are streamed.

    They are a trailing run of incomplete-character markers (a multi-byte character cut
    between tokens) and, before it, the longest suffix that could still grow into a stop
    string.
    """
    complete = text.rstrip(_INCOMPLETE_CHAR)
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(complete)), hold, -1):
            if complete.endswith(stop[:size]):
                hold = size
                break
    return len(text) - len(complete) + hold


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string in `text` begins, or -1."""
    found = [index for index in (text.find(stop) for stop in stops if stop) if index >= 0]
    return min(found, default=-1)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded with `seed`: the seed itself for
    choice 0, else the first 8 bytes of SHA-256 over ``"{seed}:{index}"`` (big-endian)."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def choice_generator(seed: int | None, index: int) -> torch.Generator:
    """The sampling generator of one choice (see :func:`choice_seed`)."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(choice_seed(seed, index))
    else:
        generator.seed()
    return generator


class SequenceState:
    """One choice being decoded: its tokens, text, what was streamed and how it ended.

    The caller runs the model and hands :meth:`advance` the last position's logits; the
    state applies the logits bias, samples, checks the end token, the stop strings and
    ``max_tokens``, and streams the text that is final. :attr:`finish` is None while the
    sequence goes on, and :attr:`next_input` is the token to feed the model next.
    """

    def __init__(
        self,
        runtime: TextGenerationRuntime,
        request: Generate,
        stops: Sequence[str],
        generator: torch.Generator,
        bias: LogitsBias | None,
        previous: int,
        emit: Callable[[str], None],
    ) -> None:
        self._runtime = runtime
        self._request = request
        self._stops = stops
        self._generator = generator
        self._bias = bias
        self._emit = emit
        self.previous = previous
        self.generated: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def next_input(self) -> int:
        """The token the model reads next (the one chosen last)."""
        return self.previous

    def advance(self, logits: torch.Tensor) -> None:
        """Choose the next token from `logits` (1-D, the last position's)."""
        runtime, request = self._runtime, self._request
        if self._bias is not None:
            logits = self._bias(self.previous, logits)
        if len(self.generated) < request.min_tokens:
            # Not the end yet: the end tokens (those the row holds) cannot be chosen; on a
            # copy, the batch's logits stay as they are.
            ends = runtime._eos_tensor
            ends = ends[ends < logits.shape[-1]]
            if len(ends):
                logits = logits.index_fill(0, ends, float("-inf"))
        token = runtime._next_token(logits, request, self._generator)
        self.generated.append(token)
        self.previous = token
        if token in runtime._eos_ids:
            self.finish = "stop"
            return
        text = runtime._tokenizer.decode(self.generated, skip_special_tokens=True)
        stop_at = find_stop(text, self._stops)
        if stop_at >= 0:
            self.text, self.finish = text[:stop_at], "stop"
            return
        self.text = text
        final = len(text) - holdback_length(text, self._stops)
        if request.stream and final > self.emitted:
            self._emit(text[self.emitted : final])
            self.emitted = final
        if len(self.generated) >= request.max_tokens:
            self.finish = "length"

    def conclude(self, cancelled: bool) -> tuple[str, str]:
        """(text, finish reason) once decoding ends; streams what is left unless the
        request was cancelled (nobody reads its output any more, and an unfinished
        sequence then ends with "stop")."""
        if cancelled:
            return self.text, "stop" if self.finish in (None, "length") else str(self.finish)
        if self._request.stream and len(self.text) > self.emitted:
            self._emit(self.text[self.emitted :])
            self.emitted = len(self.text)
        return self.text, self.finish or "length"


class TextGenerationRuntime:
    """A causal language model serving chat and completions."""

    def __init__(self, source: Path | ModelFiles, threads: int) -> None:
        torch.set_num_threads(threads)
        files = as_model_files(source)
        config = config_from_bytes(files.read(CONFIG_FILE))
        self._model = model_from_bytes(
            AutoModelForCausalLM.from_config, config, files.read_buffer(WEIGHTS_FILE)
        )
        self._tokenizer = tokenizer_from_bytes(files.read(TOKENIZER_FILE))
        tokenizer_config = read_json_object(files.read_optional(TOKENIZER_CONFIG_FILE))
        bos = special_token_text(tokenizer_config.get("bos_token"))
        eos = special_token_text(tokenizer_config.get("eos_token"))
        template = find_template_source(files.read_optional(CHAT_TEMPLATE_FILE), tokenizer_config)
        self._template = ChatTemplate(template, bos, eos) if template is not None else None
        generation_config = read_json_object(files.read_optional(GENERATION_CONFIG_FILE))
        self._eos_ids = _token_ids(generation_config.get("eos_token_id")) or _token_ids(
            getattr(config, "eos_token_id", None)
        )
        if not self._eos_ids and eos is not None:
            eos_id = self._tokenizer.token_to_id(eos)
            self._eos_ids = {eos_id} if eos_id is not None else set()
        # The end tokens, masked while a request's min_tokens is unmet.
        ends = sorted(i for i in self._eos_ids if i >= 0)
        self._eos_tensor = torch.tensor(ends, dtype=torch.long)
        self._context_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
        parameters = inspect.signature(self._model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; accept either spelling.
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._keep_last_logits = "logits_to_keep" in parameters
        self._config = config
        self._vocab_size = int(getattr(config, "vocab_size", 0) or self._tokenizer.get_vocab_size())
        self._logits_bias: LogitsBias | None = None
        capabilities = ["chat", "completions"] if self._template else ["completions"]
        self._metadata = ModelMetadata(
            runtime="text-generation",
            capabilities=capabilities,
            context_length=self._context_length,
            platform="transformers",
        )

    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def vocab_size(self) -> int:
        """The size of the model's vocabulary (its config's ``vocab_size``)."""
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        """The token ids of `text`, without special tokens (to score it for a watermark)."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def set_logits_bias(self, bias: LogitsBias | None) -> None:
        """Rewrite each step's logits with `bias` before sampling; None removes it.

        `bias` gets the token before the one being chosen (the last prompt token for the
        first) and the last position's 1-D logits, and returns the logits to sample from
        at every temperature, greedy included. A request uses the bias set when it starts.
        """
        self._logits_bias = bias

    def embed(self, request: Embed, cancel: CancelToken | None = None) -> EmbedResult:
        raise UnsupportedOperation("embeddings")

    def infer(self, request: Infer, cancel: CancelToken | None = None) -> InferResult:
        raise UnsupportedOperation("tensor inference")

    def _prompt_ids(self, request: Generate) -> list[int]:
        if request.messages is not None:
            if self._template is None:
                raise UnsupportedOperation("chat")
            text = self._template.render(request.messages)
            # The template writes the special tokens itself (as apply_chat_template does).
            ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
            return ids
        if request.prompt is None:
            raise RuntimeInputError("A prompt or messages are required.")
        ids = self._tokenizer.encode(request.prompt, add_special_tokens=True).ids
        return ids

    def generate(self, request: Generate, cancel: CancelToken, emit: EmitDelta) -> GenerateResult:
        """Generate `request.n` choices in turn; stream final text through `emit`."""
        prompt_ids = self._checked_prompt(request)
        stops = self._stops(request)
        bias = self._logits_bias
        choices: list[Choice] = []
        completion_tokens = 0
        for index in range(request.n):
            sequence = self._sequence(request, prompt_ids, stops, index, bias, partial(emit, index))
            self._decode_alone(sequence, prompt_ids, cancel)
            text, finish = sequence.conclude(cancel.cancelled)
            completion_tokens += len(sequence.generated)
            choices.append(
                Choice(index=index, text="" if request.stream else text, finish_reason=finish)
            )
        return GenerateResult(
            id=request.id,
            choices=choices,
            prompt_tokens=len(prompt_ids),
            completion_tokens=completion_tokens,
        )

    def start_engine(self, max_sequences: int) -> TextGenerationEngine:
        """Start continuous batching: a thread that decodes up to `max_sequences`
        sequences of many requests together (see :mod:`bastion.runtimes.textgen_engine`)."""
        from bastion.runtimes.textgen_engine import TextGenerationEngine

        return TextGenerationEngine(self, max_sequences)

    def _checked_prompt(self, request: Generate) -> list[int]:
        """The prompt's token ids, once the request's parameters are checked
        (RuntimeInputError, code context_length_exceeded when it cannot fit)."""
        if request.max_tokens < 1 or request.n < 1:
            raise RuntimeInputError("max_tokens and n must be at least 1.")
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise RuntimeInputError("temperature must be >= 0 and top_p in (0, 1].")
        prompt_ids = self._prompt_ids(request)
        if not prompt_ids:
            raise RuntimeInputError("The prompt is empty.")
        if len(prompt_ids) + request.max_tokens > self._context_length:
            raise RuntimeInputError(
                f"The prompt has {len(prompt_ids)} tokens and max_tokens is "
                f"{request.max_tokens}, more than the model's context of "
                f"{self._context_length} tokens.",
                code="context_length_exceeded",
            )
        return prompt_ids

    @staticmethod
    def _stops(request: Generate) -> list[str]:
        return [stop for stop in request.stop if stop]

    def _sequence(
        self,
        request: Generate,
        prompt_ids: list[int],
        stops: Sequence[str],
        index: int,
        bias: LogitsBias | None,
        emit: Callable[[str], None],
    ) -> SequenceState:
        """The state of choice `index`, with its own generator (see :func:`choice_seed`)."""
        generator = choice_generator(request.seed, index)
        return SequenceState(self, request, stops, generator, bias, prompt_ids[-1], emit)

    def _forward(self, input_ids: torch.Tensor, cache: DynamicCache, **inputs: Any) -> torch.Tensor:
        """Run the model on `input_ids` ([batch, length]) with `cache`; the last
        position's logits, [batch, vocab]. Call it under ``torch.inference_mode()``."""
        extra: dict[str, Any] = {"logits_to_keep": 1} if self._keep_last_logits else {}
        output = self._model(
            input_ids=input_ids, use_cache=True, **{self._cache_argument: cache}, **extra, **inputs
        )
        logits: torch.Tensor = output.logits[:, -1]
        return logits

    def _prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, DynamicCache]:
        """Read the prompt into a new cache: (the last position's 1-D logits, the cache)."""
        cache = DynamicCache(config=self._config)
        logits = self._forward(torch.tensor([prompt_ids], dtype=torch.long), cache)
        return logits[0], cache

    def _decode_alone(
        self, sequence: SequenceState, prompt_ids: list[int], cancel: CancelToken
    ) -> None:
        """Decode one sequence by itself until it finishes or `cancel` is set."""
        if cancel.cancelled:
            return
        with torch.inference_mode():
            logits, cache = self._prefill(prompt_ids)
            sequence.advance(logits)
            while not sequence.finished and not cancel.cancelled:
                inputs = torch.tensor([[sequence.next_input]], dtype=torch.long)
                sequence.advance(self._forward(inputs, cache)[0])

    def _next_token(
        self, logits: torch.Tensor, request: Generate, generator: torch.Generator
    ) -> int:
        # A temperature this close to 0 is greedy decoding: dividing by it would overflow
        # the logits to infinities (and the probabilities to NaN).
        if request.temperature < MIN_SAMPLING_TEMPERATURE:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float() / request.temperature, dim=-1)
        if request.top_p < 1:
            sorted_probs, sorted_ids = torch.sort(probs, descending=True)
            # Keep the smallest set of most likely tokens whose mass reaches top_p, and
            # always the most likely one (a top_p of 1e-300 is 0 in float32).
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            dropped = before >= request.top_p
            dropped[0] = False
            sorted_probs[dropped] = 0
            choice = torch.multinomial(sorted_probs, 1, generator=generator)
            return int(sorted_ids[choice].item())
        return int(torch.multinomial(probs, 1, generator=generator).item())


def load(source: Path | ModelFiles, options: Mapping[str, Any]) -> TextGenerationRuntime:
    """Load the causal language model from its files."""
    return TextGenerationRuntime(source, threads=int(options.get("threads", 1)))
