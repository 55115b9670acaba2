"""The small protocol every model runtime implements, and the table of known runtimes.

A runtime runs inside a worker process. It is loaded from a model directory, answers
typed requests from :mod:`bastion.wire.protocol`, and never sees HTTP. Runtimes are
looked up by name in :data:`RUNTIMES`, never imported from a path a user supplies.
"""

from __future__ import annotations

import importlib
import mmap
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from bastion.wire.protocol import (
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


class Cancelled(Exception):
    """The request was cancelled while the runtime worked on it (its deadline passed, its
    client left); `prompt_tokens` is what the runtime had read by then, which is charged."""

    def __init__(self, prompt_tokens: int = 0) -> None:
        super().__init__("cancelled")
        self.prompt_tokens = prompt_tokens


class CancelToken:
    """Set by the worker when the gateway cancels a request; runtimes poll it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self, prompt_tokens: int = 0) -> None:
        """Raise Cancelled if the request was cancelled (call it between units of work)."""
        if self._event.is_set():
            raise Cancelled(prompt_tokens)


class Runtime(Protocol):
    """A loaded model. Methods run in a worker thread, one request at a time."""

    def metadata(self) -> ModelMetadata: ...

    def generate(self, request: Generate, cancel: CancelToken, emit: EmitDelta) -> GenerateResult:
        """Generate text; with request.stream, call `emit` for each new piece of text."""
        ...

    def embed(self, request: Embed, cancel: CancelToken | None = None) -> EmbedResult:
        """Embed texts; a long job checks `cancel` between batches (Cancelled)."""
        ...

    def infer(self, request: Infer, cancel: CancelToken | None = None) -> InferResult:
        """Run the model on tensors; a long job checks `cancel` between batches."""
        ...


# Called once with a request's outcome: its result, or the exception that ended it
# (RuntimeInputError, Cancelled, anything else: the worker maps it as for a direct call).
Done = Callable[[GenerateResult | BaseException], None]


class GenerationEngine(Protocol):
    """Continuous batching: a text runtime's engine decodes the sequences of several
    requests together, in its own thread; requests join between decoding steps, finished
    or cancelled ones leave.

    The worker hands it each Generate request with :meth:`submit` and goes on with other
    work; the engine calls `emit` for streamed text and `done` exactly once, from its own
    thread. A GPU engine (vLLM's ``AsyncLLMEngine``: ``add_request`` then read its output
    stream; ``abort`` on cancel) implements the same three methods.

    The ``GenerateResult`` given to `done` carries the request's metering: ``compute_s``,
    its share of the engine's work (its prefill, and each step's time divided among the
    sequences in it), and ``queue_s``, its wait for a place in the batch.
    """

    def submit(self, request: Generate, cancel: CancelToken, emit: EmitDelta, done: Done) -> None:
        """Queue `request`; it joins the running batch at the next decoding step."""
        ...

    @property
    def active(self) -> int:
        """Sequences being decoded or waiting to join (for the worker's heartbeat)."""
        ...

    def close(self) -> None:
        """Finish: cancel what is left (each gets its `done`) and stop the thread."""
        ...


class BatchingRuntime(Protocol):
    """A runtime that can run several requests' work in one call (dynamic batching).

    ``infer_batch`` and ``embed_batch`` get requests the worker collected and return one
    entry per request, in order: its result, or the exception that request alone raised
    (one bad request never fails its batch-mates). ``start_engine`` starts continuous
    batching for text generation, with at most `max_sequences` sequences decoded at once.
    A runtime offers any subset; the worker looks each method up with ``getattr``.
    """

    def infer_batch(
        self, requests: list[Infer], cancel: CancelToken | None = None
    ) -> list[InferResult | Exception]: ...

    def embed_batch(
        self, requests: list[Embed], cancel: CancelToken | None = None
    ) -> list[EmbedResult | Exception]: ...

    def start_engine(self, max_sequences: int) -> GenerationEngine: ...


# A file's bytes held in memory: anything with the buffer protocol.
Buffer = bytes | bytearray | memoryview | mmap.mmap


class ModelFiles:
    """The files of one model: read from its directory, or already in memory (the files of
    a bundle, decrypted and verified inside the worker: they never touch a disk)."""

    def __init__(
        self,
        *,
        directory: Path | None = None,
        memory: Mapping[str, Buffer] | None = None,
    ) -> None:
        if (directory is None) == (memory is None):
            raise ValueError("give a directory or files in memory")
        self._directory = directory.resolve() if directory is not None else None
        self._memory = dict(memory or {})

    def read(self, name: str) -> bytes:
        """The bytes of the file `name` (a relative POSIX path); ValueError if absent."""
        data = self.read_optional(name)
        if data is None:
            raise ValueError(f"the model has no file {name}")
        return data

    def read_buffer(self, name: str) -> bytes | memoryview:
        """Like :meth:`read`, without copying files held in memory (for big weights)."""
        if self._directory is None:
            found = self._memory.get(name)
            if found is None:
                raise ValueError(f"the model has no file {name}")
            return memoryview(found)
        return self.read(name)

    def read_optional(self, name: str) -> bytes | None:
        if self._directory is None:
            found = self._memory.get(name)
            return bytes(found) if found is not None else None
        target = (self._directory / name).resolve()
        if not target.is_relative_to(self._directory):
            raise ValueError("a model file must lie inside the model directory")
        return target.read_bytes() if target.is_file() else None


def as_model_files(source: Path | ModelFiles) -> ModelFiles:
    return source if isinstance(source, ModelFiles) else ModelFiles(directory=source)


class RuntimeLoader(Protocol):
    def __call__(self, source: Path | ModelFiles, options: Mapping[str, Any]) -> Runtime: ...


def load_runtime(
    name: str, path: Path | ModelFiles, options: Mapping[str, Any], module: str | None = None
) -> Runtime:
    """Load the model at `path` (a directory, or files in memory) with the runtime `name`:
    a built-in one, or else the operator's `module` (BASTION_EXTRA_RUNTIMES)."""
    module_name = RUNTIMES.get(name, module)
    if module_name is None:
        raise ValueError(f"unknown runtime {name!r}")
    loader: RuntimeLoader = importlib.import_module(module_name).load
    return loader(path, options)
