"""Request and response schemas of the HTTP API, as msgspec structs.

These are the validation code for every request, whichever process runs it: the gateway
today, a worker opening an end-to-end encrypted request later. Unknown fields are ignored,
as OpenAI's API does, so current SDKs keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# Most prompts in one completion request.
MAX_PROMPTS = 16
StopList = Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=4)]


class ContentPart(msgspec.Struct, frozen=True):
    type: Literal["text"]
    text: str


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class ChatMessageIn(msgspec.Struct, frozen=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(msgspec.Struct, frozen=True):
    model: NonEmptyStr
    messages: Annotated[list[ChatMessageIn], msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: PositiveInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, msgspec.Meta(min_length=1)] | StopList | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    # vLLM's extension: no end of text before this many tokens (at most max_tokens).
    min_tokens: NonNegativeInt | None = None
    # Refused by the output policy (api/openai.py): they let a caller copy the model.
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(msgspec.Struct, frozen=True):
    model: NonEmptyStr
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: PositiveInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, msgspec.Meta(min_length=1)] | StopList | None = None
    seed: Seed | None = None
    echo: bool = False
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    min_tokens: NonNegativeInt | None = None
    # Refused by the output policy (api/openai.py), as for chat.
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    logit_bias: dict[str, float] | None = None


class EmbeddingRequest(msgspec.Struct, frozen=True):
    model: NonEmptyStr
    input: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


# ---------------------------------------------------------------- Open Inference Protocol

OipDatatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


class OipInputTensor(msgspec.Struct, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]
    datatype: OipDatatype
    # Absent when the tensor travels in the binary part (parameters.binary_data_size).
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class OipRequestedOutput(msgspec.Struct, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    parameters: dict[str, Any] | None = None


class OipInferRequest(msgspec.Struct, frozen=True):
    inputs: Annotated[list[OipInputTensor], msgspec.Meta(min_length=1)]
    id: str | None = None
    outputs: list[OipRequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


# ---------------------------------------------------------------- admin API


class TenantCreate(msgspec.Struct, frozen=True):
    name: NonEmptyStr


class KeyCreate(msgspec.Struct, frozen=True):
    tenant: NonEmptyStr
    role: Literal["admin", "tenant-admin", "consumer"] = "consumer"
    models: list[NonEmptyStr] | None = None
    actions: list[NonEmptyStr] | None = None
    expires_at: str | None = None
    name: Annotated[str, msgspec.Meta(max_length=128)] | None = None


Limit = Annotated[int, msgspec.Meta(ge=0, le=2**62)] | None


class QuotaUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The limits to change (a value sets, null clears); fields left out are kept."""

    requests_per_minute: Limit | msgspec.UnsetType = msgspec.UNSET
    tokens_per_minute: Limit | msgspec.UnsetType = msgspec.UNSET
    concurrent_requests: Limit | msgspec.UnsetType = msgspec.UNSET
    tokens_per_day: Limit | msgspec.UnsetType = msgspec.UNSET
    max_request_bytes: Limit | msgspec.UnsetType = msgspec.UNSET
    # Share in the fair queues (tenants only).
    weight: Annotated[float, msgspec.Meta(gt=0, le=1000)] | msgspec.UnsetType | None = msgspec.UNSET

    def changes(self) -> dict[str, int | float | None]:
        return {
            name: value
            for name in self.__struct_fields__
            if (value := getattr(self, name)) is not msgspec.UNSET
        }


class ProtectionUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Protection settings to change, by their `bastion protect set` names (a string
    sets, null goes back to the default); those left out are kept."""

    output: str | msgspec.UnsetType | None = msgspec.UNSET
    scores: str | msgspec.UnsetType | None = msgspec.UNSET
    monitor: str | msgspec.UnsetType | None = msgspec.UNSET
    alert_at: str | msgspec.UnsetType | None = msgspec.UNSET
    throttle_at: str | msgspec.UnsetType | None = msgspec.UNSET
    block_at: str | msgspec.UnsetType | None = msgspec.UNSET
    throttle_rps: str | msgspec.UnsetType | None = msgspec.UNSET
    squeeze: str | msgspec.UnsetType | None = msgspec.UNSET
    squeeze_range: str | msgspec.UnsetType | None = msgspec.UNSET
    squeeze_bits: str | msgspec.UnsetType | None = msgspec.UNSET
    squeeze_image: str | msgspec.UnsetType | None = msgspec.UNSET
    squeeze_threshold: str | msgspec.UnsetType | None = msgspec.UNSET
    watermark: str | msgspec.UnsetType | None = msgspec.UNSET
    guards: str | msgspec.UnsetType | None = msgspec.UNSET

    def changes(self) -> dict[str, str | None]:
        return {
            f"protect.{name}": value
            for name in self.__struct_fields__
            if (value := getattr(self, name)) is not msgspec.UNSET
        }
