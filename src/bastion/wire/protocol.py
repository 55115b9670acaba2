"""Typed messages between the gateway and its workers.

Messages are msgspec structs encoded with MessagePack. The decoder only builds the types
listed here, so a hostile worker can send nothing but these shapes; nothing is ever pickled.
Every message carries a tag (its class name) so one decoder reads the whole union.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

# The exit status of a worker that gave up on a job which ignored its cancellation.
EXIT_STUCK = 5
# The exit status of a worker whose runtime raised what no Python code should (a Rust
# panic, SystemExit...): the request failed, and the worker leaves so that a fresh one
# replaces a runtime that may be left in a corrupt state.
EXIT_RUNTIME_FAULT = 6

# A token count a worker reports: never negative (the gateway adds it to counters).
Tokens = Annotated[int, msgspec.Meta(ge=0)]
# Seconds the worker spent running a request's model code (metered per tenant and model).
Seconds = Annotated[float, msgspec.Meta(ge=0.0)]
# Requests in one batch (bastion.wire.batching.MAX_BATCH_SIZE at most).
BatchSize = Annotated[int, msgspec.Meta(ge=1, le=1024)]


class Message(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """Base of every IPC message."""


# ---------------------------------------------------------------- shared payload types


class TensorData(msgspec.Struct, frozen=True, kw_only=True):
    """One named tensor: numeric data as raw little-endian bytes, or a list of byte strings.

    `datatype` uses the Open Inference Protocol names (FP32, INT64, BYTES, ...).
    """

    name: str
    datatype: str
    shape: list[int]
    raw: bytes = b""
    items: list[bytes] = []


class TensorSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A model input or output as Open Inference Protocol metadata describes it (-1: any)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """What a loaded model tells the gateway about itself."""

    runtime: str
    # Subset of {"chat", "completions", "embeddings", "infer"}.
    capabilities: list[str]
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    # Longest prompt + completion, in tokens, for text models; 0 when not a text model.
    context_length: int = 0
    embedding_dim: int = 0
    platform: str = ""
    versions: list[str] = msgspec.field(default_factory=lambda: ["1"])
    # What its answers reveal of the scores it computes (bastion.protection.output), e.g.
    # {"policy": "label_only", "scores": ["probabilities"], ...}; None: no scores.
    output_policy: dict[str, Any] | None = None
    # How its worker batches requests (bastion.wire.batching.BatchPolicy.describe, with
    # "continuous": true for text generation decoding sequences together); None: it does not.
    batching: dict[str, Any] | None = None


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    content: str


# ---------------------------------------------------------------- gateway -> worker


class LoadModel(Message, frozen=True, kw_only=True):
    """First message on a new worker's channel: which model to load, from where."""

    model: str
    runtime: str
    path: str
    options: dict[str, Any] = {}
    # The module of a runtime that is not built in (the operator's BASTION_EXTRA_RUNTIMES).
    runtime_module: str | None = None
    heartbeat_interval_s: float = 1.0
    # For a bundle (scanned, signed, encrypted model): its data key, unsealed by the
    # gateway, and the public keys its signature may come from. The worker decrypts and
    # verifies the files in memory; no plaintext weight touches a disk.
    bundle_key: bytes | None = None
    # The model's watermark key (derived from the home's sealed master secret), for the
    # text watermark; None: no watermark.
    watermark_key: bytes | None = None
    # The public key the worker seals its records of watermarked answers to (the private
    # one stays sealed by the home's key ring; `bastion protect verify` opens them).
    marks_public_key: bytes | None = None
    trusted_keys: list[bytes] = []
    # The trust policy's publishers: the bundle must also be signed by one of them.
    publisher_keys: list[bytes] = []

    def __repr__(self) -> str:
        return f"LoadModel(model={self.model!r}, runtime={self.runtime!r})"


class Generate(Message, frozen=True, kw_only=True):
    """Text generation for chat (messages) or completion (prompt)."""

    id: int
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = []
    seed: int | None = None
    n: int = 1
    stream: bool = False
    # No end token before this many tokens (vLLM's `min_tokens`); stop strings still apply.
    min_tokens: int = 0


class Embed(Message, frozen=True, kw_only=True):
    id: int
    texts: list[str]


class Caller(msgspec.Struct, frozen=True, kw_only=True):
    """Who sent a request: the worker's extraction monitor keeps one history per key."""

    tenant: str
    key: str
    # The protect.* settings of this tenant or key that override the model's own.
    protect: dict[str, str] = {}


class Infer(Message, frozen=True, kw_only=True):
    id: int
    inputs: list[TensorData]
    # Names of the outputs wanted; empty means all.
    outputs: list[str] = []
    # Set by the gateway (or, for an encrypted request, the worker from the outer one).
    caller: Caller | None = None


class OhttpSuite(msgspec.Struct, frozen=True, kw_only=True):
    kdf_id: int
    aead_id: int


class OhttpKey(msgspec.Struct, frozen=True, kw_only=True):
    """One OHTTP private key a worker may decapsulate with, until `not_after` (Unix time)."""

    key_id: int
    kem_id: int
    private_key: bytes
    suites: list[OhttpSuite]
    not_after: float | None = None

    def __repr__(self) -> str:
        return f"OhttpKey(key_id={self.key_id}, kem_id={self.kem_id})"


class RequestLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What the inference routes check before a request goes anywhere."""

    max_body_bytes: int
    max_tokens_limit: int
    max_choices: int


# The model options that tighten or widen one model's size limits.
LIMIT_OPTIONS = ("max_batch", "max_input_elements", "max_answer_bytes")


class SizeLimits(msgspec.Struct, frozen=True, kw_only=True):
    """How big one model's requests and answers may be (settings, or the model's options)."""

    max_batch: int
    max_input_elements: int
    max_answer_bytes: int

    def with_options(self, options: Mapping[str, Any]) -> SizeLimits:
        """These limits, with those a model's options set (positive integers) instead."""

        def pick(option: str, default: int) -> int:
            value = options.get(option)
            valid = isinstance(value, int) and not isinstance(value, bool) and value > 0
            return value if valid else default  # type: ignore[return-value]

        return SizeLimits(
            max_batch=pick("max_batch", self.max_batch),
            max_input_elements=pick("max_input_elements", self.max_input_elements),
            max_answer_bytes=pick("max_answer_bytes", self.max_answer_bytes),
        )


class SealingKeys(Message, frozen=True, kw_only=True):
    """The OHTTP keys and request limits for sealed requests; sent at start and on rotation.

    A worker keeps the message with the highest `version` it has seen.
    """

    version: int
    keys: list[OhttpKey]
    # The inner request's Date may differ from the worker's clock by this much.
    date_window_s: float
    # What the inference routes check, and the size limits of a model without options
    # (the gateway's settings; the worker applies its model's options to them).
    request_limits: RequestLimits
    size_limits: SizeLimits

    def __repr__(self) -> str:
        return f"SealingKeys(version={self.version}, keys={len(self.keys)})"


# An encapsulated request may exceed the inner body limit by this much (OHTTP and Binary
# HTTP framing, headers); both the gateway and the worker allow it.
SEALED_FRAMING_ALLOWANCE = 64 * 1024


class SealedRequest(Message, frozen=True, kw_only=True):
    """An encapsulated OHTTP request, forwarded unopened; only the worker decapsulates it.

    `actions` are what the caller's API key may do (the gateway cannot see which one the
    inner request needs). `chunked` selects chunked OHTTP (streamed answer).
    """

    id: int
    data: bytes
    chunked: bool = False
    actions: list[str] = []
    # The tokens reserved for it when the caller's tokens are limited: the inner request
    # may not be estimated at more (None: no limit).
    allowance: int | None = None
    # The outer request's API key, for the extraction monitor.
    caller: Caller | None = None


# What the gateway sends a worker to do.
WorkRequest = Generate | Embed | Infer | SealedRequest


class Cancel(Message, frozen=True, kw_only=True):
    """Stop working on request `id`; the worker answers nothing more for it."""

    id: int


class Shutdown(Message, frozen=True, kw_only=True):
    """Finish in-flight work, then exit."""


class ClearRisk(Message, frozen=True, kw_only=True):
    """An admin cleared API key `key`: forget its history with this model."""

    key: str


# ---------------------------------------------------------------- worker -> gateway


class Ready(Message, frozen=True, kw_only=True):
    model: str
    metadata: ModelMetadata
    pid: int


class LoadFailed(Message, frozen=True, kw_only=True):
    """The model could not be loaded; `reason` is safe to show an operator."""

    model: str
    reason: str
    # The model's files failed their integrity check: retrying cannot help.
    integrity: bool = False


class Heartbeat(Message, frozen=True, kw_only=True):
    in_flight: int = 0


class ExtractionRisk(Message, frozen=True, kw_only=True):
    """The extraction monitor's latest score of one key's queries (never an input):
    sent when its level changes, and every few dozen queries."""

    caller: Caller
    risk: float
    level: str
    queries: int
    signals: dict[str, float] = {}


class WatermarkRecord(Message, frozen=True, kw_only=True):
    """Inputs a classifier answered with its watermark ("marks"), or a keyed sample of
    those it answered plainly ("controls"), sealed in the worker to the owner's key: the
    gateway stores the blob and cannot read it."""

    caller: Caller | None = None
    kind: str
    classes: int
    count: int
    blob: bytes


class TextDelta(Message, frozen=True, kw_only=True):
    """A piece of streamed text for choice `index` of request `id`."""

    id: int
    index: int
    text: str


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    text: str
    # "stop" (stop sequence or end of text) or "length" (max_tokens reached).
    finish_reason: str


class GenerateResult(Message, frozen=True, kw_only=True):
    """Final message of a Generate; with stream=True its choices carry no text."""

    id: int
    choices: list[Choice]
    prompt_tokens: Tokens
    completion_tokens: Tokens
    # Seconds the worker spent on the model's code for this request (set by the worker;
    # a batch's time is shared among its requests by their rows).
    compute_s: Seconds = 0.0
    # Seconds it waited in the worker's queue, and how many requests its batch held.
    queue_s: Seconds = 0.0
    batch_size: BatchSize = 1


class EmbedResult(Message, frozen=True, kw_only=True):
    id: int
    # count x dim float32 values, little-endian, row-major.
    vectors: bytes
    count: int
    dim: int
    prompt_tokens: Tokens
    # Seconds the worker spent on the model's code for this request (set by the worker;
    # a batch's time is shared among its requests by their rows).
    compute_s: Seconds = 0.0
    # Seconds it waited in the worker's queue, and how many requests its batch held.
    queue_s: Seconds = 0.0
    batch_size: BatchSize = 1


class InferResult(Message, frozen=True, kw_only=True):
    id: int
    outputs: list[TensorData]
    # Tokens read, for a model whose inputs are text (a sentence encoder); 0 otherwise.
    prompt_tokens: Tokens = 0
    # Seconds the worker spent on the model's code for this request (set by the worker;
    # a batch's time is shared among its requests by their rows).
    compute_s: Seconds = 0.0
    # Seconds it waited in the worker's queue, and how many requests its batch held.
    queue_s: Seconds = 0.0
    batch_size: BatchSize = 1


class SealedChunk(Message, frozen=True, kw_only=True):
    """A piece of a chunked OHTTP answer, already encrypted for the client."""

    id: int
    data: bytes


class SealedResponse(Message, frozen=True, kw_only=True):
    """The (last piece of the) encrypted answer, with the usage to account beside it."""

    id: int
    data: bytes
    prompt_tokens: Tokens = 0
    completion_tokens: Tokens = 0
    # Seconds the worker spent on the model's code for this request (set by the worker;
    # a batch's time is shared among its requests by their rows).
    compute_s: Seconds = 0.0
    # Seconds it waited in the worker's queue, and how many requests its batch held.
    queue_s: Seconds = 0.0
    batch_size: BatchSize = 1


class RequestFailed(Message, frozen=True, kw_only=True):
    """The worker refused or failed request `id`.

    `status` is 400 for input the model cannot take (prompt too long, wrong tensor) and 500
    for a fault inside the runtime. `message` must not quote the input.
    """

    id: int
    status: int
    code: str
    message: str
    # The work done before it failed or was cancelled, which is charged all the same.
    prompt_tokens: Tokens = 0
    completion_tokens: Tokens = 0
    # Seconds the worker spent on the model's code for this request (set by the worker;
    # a batch's time is shared among its requests by their rows).
    compute_s: Seconds = 0.0
    # Seconds it waited in the worker's queue, and how many requests its batch held.
    queue_s: Seconds = 0.0
    batch_size: BatchSize = 1


def cancelled(
    request_id: int, prompt_tokens: int = 0, completion_tokens: int = 0, compute_s: float = 0.0
) -> RequestFailed:
    """The worker's last word on a request the gateway cancelled before it ran to the end,
    with the tokens and compute time of the work done until then."""
    return RequestFailed(
        id=request_id,
        status=499,
        code="cancelled",
        message="The request was cancelled.",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        compute_s=compute_s,
    )


def usage_of(reply: Message) -> tuple[int, int]:
    """(prompt tokens, completion tokens) a final reply reports; (0, 0) for the others."""
    if isinstance(reply, GenerateResult | SealedResponse | RequestFailed):
        return reply.prompt_tokens, reply.completion_tokens
    if isinstance(reply, EmbedResult | InferResult):
        return reply.prompt_tokens, 0
    return 0, 0


_METERED = (GenerateResult, EmbedResult, InferResult, SealedResponse, RequestFailed)


def compute_of(reply: Message) -> float:
    """Seconds of model compute a final reply reports; 0 for the others."""
    return reply.compute_s if isinstance(reply, _METERED) else 0.0


def queued_of(reply: Message) -> float:
    """Seconds a final reply's request waited in the worker's queue; 0 for the others."""
    return reply.queue_s if isinstance(reply, _METERED) else 0.0


def batch_size_of(reply: Message) -> int:
    """How many requests ran in the batch of a final reply's request (1: alone)."""
    return reply.batch_size if isinstance(reply, _METERED) else 1


# What a worker tells the gateway about its model's protection, outside any request.
Notice = ExtractionRisk | WatermarkRecord

ToWorker = (
    LoadModel
    | Generate
    | Embed
    | Infer
    | SealingKeys
    | SealedRequest
    | Cancel
    | Shutdown
    | ClearRisk
)
FromWorker = (
    Ready
    | LoadFailed
    | Heartbeat
    | ExtractionRisk
    | WatermarkRecord
    | TextDelta
    | GenerateResult
    | EmbedResult
    | InferResult
    | SealedChunk
    | SealedResponse
    | RequestFailed
)

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode_to_worker(data: bytes) -> ToWorker:
    """Decode a gateway message; raises msgspec.DecodeError/ValidationError on bad input."""
    try:
        message: ToWorker = _to_worker.decode(data)
    except (UnicodeDecodeError, RecursionError):
        raise msgspec.DecodeError("a message that does not decode") from None
    return message


def decode_from_worker(data: bytes) -> FromWorker:
    """Decode a worker message; raises msgspec.DecodeError/ValidationError on bad input
    (a string that is not UTF-8, or nesting too deep, included)."""
    try:
        message: FromWorker = _from_worker.decode(data)
    except (UnicodeDecodeError, RecursionError):
        raise msgspec.DecodeError("a message that does not decode") from None
    return message
