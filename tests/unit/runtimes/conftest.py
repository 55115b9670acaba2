"""Small real models built on the fly for the runtime tests: a random Llama with a BPE tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model can still say hello to the world.",
    "Bastion serves models to many tenants and keeps their data safe.",
    "Café, naïve, façade: words with accents and an emoji 🙂 too.",
    "Stop here, or go on until the end of the story.",
    "Numbers like 1234 and 56789 appear in text as well.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message.role) }}"
    "{% endif %}"
    "<|{{ message.role }}|>{{ message.content }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SPECIAL_TOKENS = ["<|eos|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|system|>"]
EOS_ID = 0  # the trainer numbers special tokens first, in order


def _write_llama(directory: Path, tweak: Callable[[object], None]) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    bos_id = tokenizer.token_to_id("<|bos|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos_id)]
    )
    assert tokenizer.token_to_id("<|eos|>") == EOS_ID
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=bos_id,
        eos_token_id=EOS_ID,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        tweak(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|bos|>",
                "eos_token": {"content": "<|eos|>", "special": True},
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    return directory


def _quiet_eos(model: object) -> None:
    # The tied embedding row of the end token is zero, so its logit is always 0 while the
    # others are random: a greedy run then almost never ends early and tests stay stable.
    model.model.embed_tokens.weight[EOS_ID].zero_()  # type: ignore[attr-defined]


def _always_eos(model: object) -> None:
    # All logits are 0; argmax picks the first index, which is the end token.
    model.model.embed_tokens.weight.zero_()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (context 64) with a trained byte-level BPE and chat template."""
    return _write_llama(tmp_path_factory.mktemp("tiny-llama"), _quiet_eos)


@pytest.fixture(scope="session")
def eos_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model shape, but it ends every text at once under greedy decoding."""
    return _write_llama(tmp_path_factory.mktemp("eos-llama"), _always_eos)
