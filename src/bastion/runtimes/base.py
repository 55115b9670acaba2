"""The small protocol every model runtime implements, and the table of known runtimes.

A runtime runs inside a worker process. It is loaded from a model directory, answers
typed requests from :mod:`bastion.workers.protocol`, and never sees HTTP. Runtimes are
looked up by name in :data:`RUNTIMES`, never imported from a path a user supplies.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from bastion.workers.protocol import (
    Embed,
    EmbedResult,
    Generate,
    GenerateResult,
    Infer,
    InferResult,
    ModelMetadata,
)

# Runtime name -> module that defines `load(path, options) -> Runtime`.
RUNTIMES: Mapping[str, str] = {
    "onnx": "bastion.runtimes.onnx",
    "text-generation": "bastion.runtimes.textgen",
    "sentence-embedding": "bastion.runtimes.embeddings",
    "echo": "bastion.runtimes.echo",
}

# Called with (choice index, text) for each piece of a streamed generation.
EmitDelta = Callable[[int, str], None]


class RuntimeInputError(Exception):
    """The input cannot be served by this model (too long, wrong shape...): a 400.

    The message must describe the problem without quoting the input.
    """

    def __init__(self, message: str, code: str = "invalid_input") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class UnsupportedOperation(RuntimeInputError):
    """The model does not offer this operation (e.g. embeddings from a classifier)."""

    def __init__(self, operation: str) -> None:
        super().__init__(f"This model does not support {operation}.", "unsupported_operation")


class CancelToken:
    """Set by the worker when the gateway cancels a request; runtimes poll it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Runtime(Protocol):
    """A loaded model. Methods run in a worker thread, one request at a time."""

    def metadata(self) -> ModelMetadata: ...

    def generate(self, request: Generate, cancel: CancelToken, emit: EmitDelta) -> GenerateResult:
        """Generate text; with request.stream, call `emit` for each new piece of text."""
        ...

    def embed(self, request: Embed) -> EmbedResult: ...

    def infer(self, request: Infer) -> InferResult: ...


class RuntimeLoader(Protocol):
    def __call__(self, path: Path, options: Mapping[str, Any]) -> Runtime: ...


def load_runtime(name: str, path: Path, options: Mapping[str, Any]) -> Runtime:
    """Load the model at `path` with the runtime called `name`."""
    try:
        module_name = RUNTIMES[name]
    except KeyError:
        raise ValueError(f"unknown runtime {name!r}") from None
    module = importlib.import_module(module_name)
    loader: RuntimeLoader = module.load
    return loader(path, options)
