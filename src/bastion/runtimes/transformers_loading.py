"""Builds transformers models from the bytes of their files, with no code from the model.

Configs, weights and tokenizers are read from bytes (``safetensors.torch.load``,
``Tokenizer.from_str``) rather than handed to ``from_pretrained`` as paths, so a later layer
can pass in files it decrypted in memory. A config that asks for custom code (``auto_map``)
is refused: model files are untrusted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from tokenizers import Tokenizer
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


def read_json_object(data: bytes | None) -> dict[str, Any]:
    """Parse a JSON object; None (a missing optional file) gives {}."""
    if data is None:
        return {}
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def config_from_bytes(data: bytes) -> PreTrainedConfig:
    """A transformers config from the bytes of config.json, for built-in architectures only."""
    values = read_json_object(data)
    if "auto_map" in values:
        raise ValueError("models that need their own Python code are not supported")
    model_type = values.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ValueError("config.json names no model_type that transformers knows")
    config: PreTrainedConfig = CONFIG_MAPPING[model_type].from_dict(values)
    return config


def tokenizer_from_bytes(data: bytes) -> Tokenizer:
    """A `tokenizers` Tokenizer from tokenizer.json bytes, without truncation or padding."""
    tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


# safetensors dtype names and the torch dtypes they map to.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def tensors_from_buffer(view: memoryview) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in memory, sharing that memory (no copy).

    safetensors' own loader wants `bytes`, which would copy a decrypted model once more.
    The format is simple (an 8-byte header length, a JSON header of dtypes, shapes and
    offsets, then the data); every offset is checked against the buffer here, and the
    file was already validated at import and verified against its signed digest.
    """
    if len(view) < 8:
        raise ValueError("the weights file is too short for safetensors")
    header_length = int.from_bytes(view[:8], "little")
    base = 8 + header_length
    if base > len(view):
        raise ValueError("the safetensors header runs past the end of the file")
    header = json.loads(bytes(view[8:base]))
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        start, end = info.get("data_offsets", (None, None))
        shape = info.get("shape")
        if dtype is None or not isinstance(start, int) or not isinstance(end, int):
            raise ValueError("a tensor in the safetensors header is malformed")
        count = 1
        for dimension in shape:
            count *= int(dimension)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= end <= len(view) - base or end - start != count * itemsize:
            raise ValueError("a tensor's offsets do not match its shape")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(view, dtype=dtype, count=count, offset=base + start)
        tensors[name] = flat.reshape(shape)
    return tensors


def model_from_bytes(
    build: Callable[..., PreTrainedModel],
    config: PreTrainedConfig,
    weights: bytes | memoryview,
) -> PreTrainedModel:
    """Build a float32 model with `build(config)` and load the safetensors `weights` into it.

    Weights the file lacks are an error, except tied ones (saved once under another name).
    Extra tensors in the file (e.g. an old checkpoint's position_ids buffer) are ignored.
    """
    model = build(config, dtype=torch.float32)
    state = (
        load_safetensors(weights) if isinstance(weights, bytes) else tensors_from_buffer(weights)
    )
    prefix = f"{model.base_model_prefix}."
    expected = model.state_dict()
    if not any(name in expected for name in state) and any(k.startswith(prefix) for k in state):
        # A base model saved from a model with a head keeps its prefix ("bert.").
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    current = model.state_dict()
    loaded = {current[name].data_ptr() for name in state if name in current}
    missing = [name for name in result.missing_keys if current[name].data_ptr() not in loaded]
    if missing:
        raise ValueError(f"the weights file lacks {len(missing)} tensors, e.g. {missing[0]}")
    torch.nn.Module.eval(model)
    return model
