#!/usr/bin/env python3
"""Train the ``tiny-chat`` demo language model shipped with Bastion.

The model is a very small Llama-architecture causal LM trained from scratch on the
Debian ``fortunes`` package (``/usr/share/games/fortunes``).  Everything is built
locally and offline:

1. the fortune cookies are read (``%``-separated entries; ``.dat``/``.u8`` files,
   the offensive ``off/`` subdirectory and the ``ascii-art`` file are skipped);
2. a byte-level BPE tokenizer is trained with the ``tokenizers`` library;
3. training documents are rendered through the model's own Jinja chat template
   (user asks for a fortune, assistant answers with it) mixed with raw fortune text;
4. a small ``LlamaForCausalLM`` is trained for a fixed number of steps on CPU;
5. the result is written in Hugging Face format (``config.json``,
   ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
   ``tokenizer_config.json`` with the chat template) plus a ``README.md``;
6. the saved directory is reloaded with the ``Auto*`` classes and a few samples are
   printed, together with the share of generated words that occur in the corpus.

Seeds are fixed and training runs single-threaded by default, so a rerun on the same
software versions reproduces the same weights.  With the defaults the whole run takes
five to seven minutes on one CPU core; ``--max-train-seconds`` cuts training short on a
much slower machine so that the run stays under eight minutes.

Usage::

    python scripts/train_tiny_chat.py
    python scripts/train_tiny_chat.py --steps 50 --out /tmp/tiny-chat   # quick smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS_DIR = Path("/usr/share/games/fortunes")
DEFAULT_OUT = REPO_ROOT / "src" / "bastion" / "models" / "demo_assets" / "tiny-chat"
CORPUS_PACKAGE = "Debian `fortunes` package, version 1:1.99.1-7.3"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]

# Deliberately plain Jinja: a loop, an `if`, string concatenation and item access only,
# so that it renders in a sandboxed Jinja environment without custom globals/filters.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

USER_PROMPTS = [
    "Tell me something.",
    "Tell me something interesting.",
    "Tell me a fortune.",
    "Give me a fortune.",
    "What is my fortune?",
    "Say something wise.",
    "Any words of wisdom?",
    "Tell me a joke.",
    "Share a quote.",
    "Give me a quote.",
    "Cheer me up.",
    "Say something.",
    "What do you think?",
    "Hello!",
    "Hi.",
    "Hello, who are you?",
    "Tell me about life.",
    "Tell me about computers.",
    "I need some advice.",
    "Surprise me.",
]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a fortune cookie.",
    "You are tiny-chat, a small demo model served by Bastion.",
    "Answer briefly.",
]

# Files of the corpus that are not prose.
SKIP_FILES = {"ascii-art"}
# Longer entries (mostly song lyrics and long stories) are dropped to keep documents short.
MAX_ENTRY_CHARS = 800
# Shares of the three document formats.
P_CHAT_GENERIC = 0.45
P_CHAT_FIRST_LINE = 0.15
P_SYSTEM = 0.25

# Files written by this script, removed before a rerun; pickles must never be shipped.
OUTPUT_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle"}

WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


# --------------------------------------------------------------------------- corpus


def clean_entry(text: str) -> str:
    """Remove terminal overstriking (``_\\bX``) and normalise whitespace of one fortune."""
    while "\x08" in text:
        new = re.sub(r"[^\x08]\x08", "", text)
        if new == text:
            text = text.replace("\x08", "")
            break
        text = new
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    out = "\n".join(lines)
    out = re.sub(r"\n{3,}", "\n\n", out)
    return out.strip()


def looks_like_prose(text: str) -> bool:
    """Drop ASCII art and other entries that are mostly punctuation."""
    visible = [c for c in text if not c.isspace()]
    if len(visible) < 8:
        return False
    letters = sum(c.isalpha() for c in visible)
    return letters / len(visible) >= 0.6


def load_fortunes(corpus_dir: Path) -> list[str]:
    if not corpus_dir.is_dir():
        sys.exit(f"corpus directory {corpus_dir} not found (apt-get install fortunes)")
    entries: list[str] = []
    seen: set[str] = set()
    for path in sorted(corpus_dir.iterdir()):
        # Only plain files at the top level: this skips off/ and the .u8 symlinks.
        if path.is_symlink() or not path.is_file():
            continue
        if path.suffix in {".dat", ".u8"} or path.name in SKIP_FILES:
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        for chunk in re.split(r"(?m)^%[ \t]*$", raw):
            entry = clean_entry(chunk)
            if not entry or len(entry) > MAX_ENTRY_CHARS or not looks_like_prose(entry):
                continue
            if entry in seen:
                continue
            seen.add(entry)
            entries.append(entry)
    if not entries:
        sys.exit(f"no fortunes found in {corpus_dir}")
    return entries


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(entries: Sequence[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterator[str]:
        yield from entries
        yield from USER_PROMPTS
        yield from SYSTEM_PROMPTS

    tok.train_from_iterator(texts(), trainer=trainer, length=len(entries))
    bos_id = tok.token_to_id(BOS)
    # Plain `tokenizer(text)` prepends <s> (as raw documents were trained);
    # apply_chat_template adds it through the template instead.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return tok


def wrap_tokenizer(tok: Tokenizer, max_len: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_len,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- data


def render_document(entry: str, rng: random.Random, hf_tok: PreTrainedTokenizerFast) -> str:
    """Render one fortune either as a chat conversation or as raw text."""
    roll = rng.random()
    lines = entry.split("\n")
    if roll < P_CHAT_GENERIC + P_CHAT_FIRST_LINE:
        messages: list[dict[str, str]] = []
        if rng.random() < P_SYSTEM:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if roll >= P_CHAT_GENERIC and len(lines) >= 2 and lines[0].strip():
            messages.append({"role": "user", "content": lines[0]})
            messages.append({"role": "assistant", "content": "\n".join(lines[1:]).strip()})
        else:
            messages.append({"role": "user", "content": rng.choice(USER_PROMPTS)})
            messages.append({"role": "assistant", "content": entry})
        rendered = hf_tok.apply_chat_template(messages, tokenize=False)
        assert isinstance(rendered, str)
        return rendered
    return BOS + entry + EOS


def build_blocks(
    entries: Sequence[str],
    rng: random.Random,
    hf_tok: PreTrainedTokenizerFast,
    tok: Tokenizer,
    block_size: int,
) -> torch.Tensor:
    """One epoch: shuffle, render, tokenize and pack documents into fixed-size blocks.

    Returns a ``(n_blocks, 2, block_size)`` tensor of input ids and labels.  In chat
    documents the system/user turns and the ``<|assistant|>\\n`` header are masked out
    of the labels (-100): the model only learns to write the answers, not the prompts.
    """
    order = list(entries)
    rng.shuffle(order)
    docs = [render_document(e, rng, hf_tok) for e in order]
    encodings = tok.encode_batch(docs, add_special_tokens=False)
    assistant_id = tok.token_to_id("<|assistant|>")
    newline_ids = tok.encode("\n", add_special_tokens=False).ids
    ids: list[int] = []
    labels: list[int] = []
    for enc in encodings:
        doc_ids = list(enc.ids)
        doc_labels = list(doc_ids)
        if assistant_id in doc_ids:
            start = doc_ids.index(assistant_id) + 1
            if doc_ids[start : start + len(newline_ids)] == newline_ids:
                start += len(newline_ids)
            doc_labels[:start] = [-100] * start
        ids.extend(doc_ids)
        labels.extend(doc_labels)
    n = len(ids) // block_size * block_size
    return torch.stack(
        [
            torch.tensor(ids[:n], dtype=torch.long).view(-1, block_size),
            torch.tensor(labels[:n], dtype=torch.long).view(-1, block_size),
        ],
        dim=1,
    )


class BlockSampler:
    """Yields batches of blocks, re-rendering the corpus (new formats) every epoch."""

    def __init__(
        self,
        entries: Sequence[str],
        seed: int,
        hf_tok: PreTrainedTokenizerFast,
        tok: Tokenizer,
        block_size: int,
        batch_size: int,
    ) -> None:
        self.entries = entries
        self.rng = random.Random(seed)
        self.hf_tok = hf_tok
        self.tok = tok
        self.block_size = block_size
        self.batch_size = batch_size
        self.epoch = 0
        self.tokens_per_epoch = 0
        self._blocks = torch.empty(0, 2, block_size, dtype=torch.long)
        self._pos = 0

    def _refill(self) -> None:
        self._blocks = build_blocks(self.entries, self.rng, self.hf_tok, self.tok, self.block_size)
        self.tokens_per_epoch = self._blocks[:, 0].numel()
        self._pos = 0
        self.epoch += 1

    def next_batch(self) -> torch.Tensor:
        if self._pos + self.batch_size > self._blocks.shape[0]:
            self._refill()
        batch = self._blocks[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return batch


# --------------------------------------------------------------------------- training


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()  # type: ignore[no-untyped-call]
    losses: list[float] = []
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size]
        out = model(input_ids=batch[:, 0], labels=batch[:, 1])
        losses.append(out.loss.item())
    model.train()
    return sum(losses) / max(1, len(losses))


# --------------------------------------------------------------------------- output


def clear_output_dir(out: Path) -> None:
    """Remove the files a previous run wrote (and any pickle files); nothing else."""
    out.mkdir(parents=True, exist_ok=True)
    for child in out.iterdir():
        if child.is_file() and (child.name in OUTPUT_FILES or child.suffix in PICKLE_SUFFIXES):
            child.unlink()


def write_readme(out: Path, stats: dict[str, Any], samples: Sequence[Sample]) -> None:
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "README.md")
    file_list = ", ".join(f"`{f}`" for f in [*files, "README.md"])
    sample_text = ""
    if samples:
        blocks = [f"{s.label}:\n\n```\n{s.prompt}{s.text.rstrip()}\n```" for s in samples]
        sample_text = (
            "\n## Samples\n\nGenerated by the training script right after training (60 new "
            "tokens at most;\nthe chat prompt is shown as rendered by the chat template, "
            "with special tokens):\n\n" + "\n\n".join(blocks) + "\n\n"
            f"{stats['known_words']} of the {stats['total_words']} words in these samples "
            "occur in the training corpus.\n"
        )
    text = f"""# tiny-chat

A deliberately tiny chat language model, Bastion's demo text-generation model. It writes
fortune-cookie-like English (quips, quotations, aphorisms, fake attributions), knows
nothing and follows no instructions: use it only to demonstrate and test the server.

- architecture: Llama-style causal LM (`LlamaForCausalLM`) with **{stats["n_params"]:,}
  parameters**: {stats["layers"]} layers, hidden size {stats["hidden"]}, {stats["heads"]} heads,
  tied input/output embeddings; trained on {stats["context"]}-token windows,
  `max_position_embeddings` {stats["max_pos"]}
- tokenizer: byte-level BPE with {stats["vocab"]} tokens, trained on the same corpus
- weights: float32 in `model.safetensors` (no pickle files)
- files: {file_list}

## Corpus

The {CORPUS_PACKAGE} (`/usr/share/games/fortunes`):
{stats["n_entries"]:,} entries of the plain-text files. Skipped: the `.dat`/`.u8` files,
the offensive `off/` collection, the `ascii-art` file, other ASCII-art-like entries and
entries longer than {MAX_ENTRY_CHARS} characters. Terminal overstriking was removed and
whitespace normalised. Every epoch renders each fortune either through the chat template
(a short user request such as "Tell me something." or the fortune's first line; the
assistant answers with the fortune, or its rest; sometimes a system message comes first)
or as raw text between `<s>` and `</s>`. In chat documents only the assistant's answer is
trained on (the prompt tokens are masked).

## Format and usage

Loadable fully offline with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`. Special tokens: `<s>` (bos), `</s>` (eos; also ends
every chat turn), `<pad>` (pad) and the role markers `<|system|>`, `<|user|>`,
`<|assistant|>`. The chat template, stored in `tokenizer_config.json`, uses only a `for`
loop, an `if`, item access and string concatenation; a conversation renders as

```
<s><|system|>
You are a helpful assistant.</s><|user|>
Tell me something.</s><|assistant|>
```

(the last line is the generation prompt). Plain `tokenizer(text)` prepends `<s>`.
`generation_config.json` defaults to sampling (temperature 0.8, top-p 0.95, at most 128
new tokens) and stops at `</s>`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
messages = [{{"role": "user", "content": "Tell me something."}}]
inputs = tok.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
out = model.generate(**inputs, max_new_tokens=60)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Training

Retrain with `python scripts/train_tiny_chat.py` (options: `--help`).

- seed {stats["seed"]}, {stats["threads"]} CPU thread(s)
- {stats["steps"]} steps{stats["early_stop_note"]} of {stats["batch"]} x {stats["context"]} tokens
  ({stats["tokens_seen"]:,} tokens, about {stats["epochs"]:.1f} epochs)
- AdamW, peak learning rate {stats["lr"]}, cosine decay to 10%, gradient clipping at 1.0
- training time: {stats["train_minutes"]:.1f} minutes (shared 2-core AMD EPYC machine)
- final training loss (cross-entropy in nats per token, mean of the last 20 steps):
  **{stats["final_loss"]:.3f}**
- held-out loss ({stats["n_val"]} fortunes not used for training): {stats["val_loss"]:.3f}
- software: torch {torch.__version__}, transformers {stats["transformers"]},
  tokenizers {stats["tokenizers"]}
{sample_text}"""
    (out / "README.md").write_text(text, encoding="utf-8")


def word_check(texts: Sequence[str], vocabulary: set[str]) -> tuple[int, int]:
    words = [w.lower() for t in texts for w in WORD_RE.findall(t)]
    known = sum(1 for w in words if w in vocabulary)
    return known, len(words)


@dataclass(frozen=True)
class Sample:
    label: str
    prompt: str
    text: str


def generate_samples(out: Path, seed: int) -> list[Sample]:
    """Reload the saved model as a user would and generate a few samples."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()  # type: ignore[no-untyped-call]
    chat = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me something."},
    ]
    encoded = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    chat_ids = cast(torch.Tensor, cast(Any, encoded)["input_ids"])
    raw_prompt = "The meaning of life is"
    raw_ids = cast(torch.Tensor, tokenizer(raw_prompt, return_tensors="pt")["input_ids"])
    chat_prompt = str(tokenizer.decode(chat_ids[0]))
    samples: list[Sample] = []
    for kind, ids, prompt in (("chat", chat_ids, chat_prompt), ("raw", raw_ids, raw_prompt)):
        for mode in ("greedy", "sampled", "sampled"):
            torch.manual_seed(seed + len(samples))
            kwargs: dict[str, Any] = {"max_new_tokens": 60, "pad_token_id": tokenizer.pad_token_id}
            if mode == "greedy":
                label = f"{kind} prompt, greedy (repetition penalty 1.2)"
                kwargs.update(do_sample=False, repetition_penalty=1.2)
            else:
                label = f"{kind} prompt, sampled (temperature 0.8, top-p 0.95)"
                kwargs.update(do_sample=True, temperature=0.8, top_p=0.95, top_k=0)
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            text = str(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
            samples.append(Sample(label, prompt, text))
    return samples


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256, help="training sequence length")
    p.add_argument("--context", type=int, default=512, help="max_position_embeddings")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2.5e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument(
        "--max-train-seconds",
        type=float,
        default=420.0,
        help="safety net for slow machines: stop training early after this many seconds "
        "(the result is then not bit-reproducible); 0 disables it",
    )
    p.add_argument("--no-samples", action="store_true", help="skip the sample generations")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    import tokenizers
    import transformers

    entries = load_fortunes(args.corpus_dir)
    split_rng = random.Random(args.seed)
    shuffled = list(entries)
    split_rng.shuffle(shuffled)
    n_val = max(1, int(len(shuffled) * args.val_fraction))
    val_entries, train_entries = shuffled[:n_val], shuffled[n_val:]
    print(f"corpus: {len(entries)} fortunes ({len(train_entries)} train, {n_val} held out)")

    tok = train_tokenizer(train_entries, args.vocab_size)
    hf_tok = wrap_tokenizer(tok, args.context)
    print(f"tokenizer: {tok.get_vocab_size()} tokens ({time.monotonic() - t_start:.1f}s)")

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.context,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        initializer_range=0.02,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    sampler = BlockSampler(train_entries, args.seed, hf_tok, tok, args.block_size, args.batch_size)
    val_blocks = build_blocks(
        val_entries, random.Random(args.seed + 1), hf_tok, tok, args.block_size
    )[:32]
    optimizer = make_optimizer(model, args.lr, args.weight_decay)

    t_train = time.monotonic()
    recent: list[float] = []
    steps_done = 0
    for step in range(args.steps):
        if args.max_train_seconds > 0 and time.monotonic() - t_train > args.max_train_seconds:
            print(
                f"WARNING: time budget of {args.max_train_seconds:.0f}s exhausted, "
                f"stopping after {steps_done} of {args.steps} steps",
                flush=True,
            )
            break
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sampler.next_batch()
        out = model(input_ids=batch[:, 0], labels=batch[:, 1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-19:], out.loss.item()]
        steps_done = step + 1
        if step % 20 == 0 or step == args.steps - 1:
            elapsed = time.monotonic() - t_train
            print(
                f"step {step:4d}/{args.steps} loss {recent[-1]:.3f} "
                f"(avg20 {sum(recent) / len(recent):.3f}) lr {lr:.2e} "
                f"epoch {sampler.epoch} {elapsed:6.1f}s",
                flush=True,
            )
    train_seconds = time.monotonic() - t_train
    final_loss = sum(recent) / max(1, len(recent))
    val_loss = evaluate(model, val_blocks, args.batch_size)
    tokens_seen = steps_done * args.batch_size * args.block_size
    print(f"final training loss (avg of last {len(recent)} steps): {final_loss:.4f}")
    print(f"held-out loss: {val_loss:.4f}")
    print(f"training time: {train_seconds:.1f}s, tokens seen: {tokens_seen:,}")

    out_dir: Path = args.out
    clear_output_dir(out_dir)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=128,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    # Keep the chat template inside tokenizer_config.json (not chat_template.jinja).
    hf_tok.save_pretrained(out_dir, save_jinja_files=False)
    for stray in out_dir.iterdir():
        if stray.suffix in PICKLE_SUFFIXES:
            stray.unlink()

    stats: dict[str, Any] = {
        "n_params": n_params,
        "layers": args.layers,
        "hidden": args.hidden_size,
        "heads": args.heads,
        "context": args.block_size,
        "max_pos": args.context,
        "vocab": tok.get_vocab_size(),
        "train_minutes": train_seconds / 60,
        "n_entries": len(entries),
        "n_val": n_val,
        "seed": args.seed,
        "steps": steps_done,
        "early_stop_note": ""
        if steps_done == args.steps
        else f" (of {args.steps} planned; stopped by the time budget)",
        "batch": args.batch_size,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / max(1, sampler.tokens_per_epoch),
        "lr": args.lr,
        "threads": args.threads,
        "final_loss": final_loss,
        "val_loss": val_loss,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    for path in out_dir.iterdir():
        path.chmod(0o644)

    samples: list[Sample] = []
    if not args.no_samples:
        samples = generate_samples(out_dir, args.seed)
        counts = Counter(w.lower() for e in entries for w in WORD_RE.findall(e))
        vocabulary = {w for w, c in counts.items() if c >= 2}
        known, total = word_check([smp.text for smp in samples], vocabulary)
        stats.update(known_words=known, total_words=total)
        print("\n=== samples (model reloaded from disk) ===")
        for smp in samples:
            print(f"--- {smp.label}:\n{smp.prompt}{smp.text.rstrip()}\n")
        print(
            f"words found in the corpus vocabulary: {known}/{total} ({known / max(1, total):.0%})"
        )
    write_readme(out_dir, stats, samples)

    print(f"\nwrote {out_dir}:")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path.name:28s} {path.stat().st_size:>10,d} B  sha256 {sha256(path)}")
    summary = {k: stats[k] for k in ("n_params", "steps", "final_loss", "val_loss")}
    print(json.dumps({**summary, "train_seconds": round(train_seconds, 1)}))
    print(f"total wall time: {time.monotonic() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
