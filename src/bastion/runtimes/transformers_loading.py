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


def model_from_bytes(
    build: Callable[..., PreTrainedModel], config: PreTrainedConfig, weights: bytes
) -> PreTrainedModel:
    """Build a float32 model with `build(config)` and load the safetensors `weights` into it.

    Weights the file lacks are an error, except tied ones (saved once under another name).
    Extra tensors in the file (e.g. an old checkpoint's position_ids buffer) are ignored.
    """
    model = build(config, dtype=torch.float32)
    state = load_safetensors(weights)
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
