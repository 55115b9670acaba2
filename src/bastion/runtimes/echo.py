"""A runtime that answers without computing: the benchmark's trivial model and a test fixture.

It echoes inputs back. With the option ``test_hooks: true`` (never set for real models) a
prompt can ask it to misbehave so tests can check the gateway copes: ``__crash__`` makes
the worker exit at once, ``__sleep__:S`` takes S seconds (noticing cancellation), and
``__fail__`` raises inside the runtime.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from bastion.runtimes.base import (
    CancelToken,
    EmitDelta,
    ModelFiles,
    RuntimeInputError,
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
    TensorData,
    TensorSpec,
)

_DEFAULT_INPUT = {"name": "input", "datatype": "FP32", "shape": [-1, -1]}


class EchoRuntime:
    def __init__(self, options: Mapping[str, Any]) -> None:
        self._test_hooks = bool(options.get("test_hooks", False))
        spec = msgspec.convert(options.get("input", _DEFAULT_INPUT), TensorSpec)
        self._dim = int(options.get("embedding_dim", 8))
        self._metadata = ModelMetadata(
            runtime="echo",
            capabilities=["chat", "completions", "embeddings", "infer"],
            inputs=[spec],
            outputs=[TensorSpec(name="output", datatype=spec.datatype, shape=spec.shape)],
            context_length=int(options.get("context_length", 2048)),
            embedding_dim=self._dim,
            platform="bastion_echo",
        )

    def metadata(self) -> ModelMetadata:
        return self._metadata

    def _hooks(self, text: str, cancel: CancelToken | None = None) -> None:
        if not self._test_hooks:
            return
        if text.startswith("__crash__"):
            os._exit(3)
        if text.startswith("__fail__"):
            raise RuntimeError("echo runtime asked to fail")
        if text.startswith("__sleep__:"):
            deadline = time.monotonic() + float(text.split(":", 1)[1].split()[0])
            while time.monotonic() < deadline:
                if cancel is not None and cancel.cancelled:
                    return
                time.sleep(0.01)

    def generate(self, request: Generate, cancel: CancelToken, emit: EmitDelta) -> GenerateResult:
        if request.messages is not None:
            text = request.messages[-1].content if request.messages else ""
        else:
            text = request.prompt or ""
        self._hooks(text, cancel)
        words = text.split()
        if len(words) > self._metadata.context_length:
            raise RuntimeInputError("The prompt is longer than the model's context.")
        out = words[: request.max_tokens]
        finish = "length" if len(words) > request.max_tokens else "stop"
        completion = " ".join(out)
        choices = []
        for index in range(request.n):
            if request.stream:
                for i, word in enumerate(out):
                    if cancel.cancelled:
                        break
                    emit(index, word if i == 0 else " " + word)
            choices.append(
                Choice(index=index, text="" if request.stream else completion, finish_reason=finish)
            )
        return GenerateResult(
            id=request.id,
            choices=choices,
            prompt_tokens=len(words),
            completion_tokens=len(out) * request.n,
        )

    def embed(self, request: Embed, cancel: CancelToken | None = None) -> EmbedResult:
        import numpy as np

        for text in request.texts:
            self._hooks(text)
        vectors = np.zeros((len(request.texts), self._dim), dtype="<f4")
        for row, text in enumerate(request.texts):
            vectors[row, len(text) % self._dim] = 1.0
        return EmbedResult(
            id=request.id,
            vectors=vectors.tobytes(),
            count=len(request.texts),
            dim=self._dim,
            prompt_tokens=sum(len(t.split()) for t in request.texts),
        )

    def infer(self, request: Infer, cancel: CancelToken | None = None) -> InferResult:
        outputs = [
            TensorData(name="output", datatype=t.datatype, shape=t.shape, raw=t.raw, items=t.items)
            for t in request.inputs[:1]
        ]
        return InferResult(id=request.id, outputs=outputs)


def load(path: Path | ModelFiles, options: Mapping[str, Any]) -> EchoRuntime:
    return EchoRuntime(options)
