"""Sentence embeddings from a sentence-transformers style model directory, on the CPU.

The transformer is built from config.json and loaded from the bytes of model.safetensors;
token vectors are mean-pooled over the attention mask and L2-normalised, which is what
sentence-transformers' Transformer -> Pooling(mean) -> Normalize pipeline computes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel

from bastion.runtimes.base import (
    CancelToken,
    EmitDelta,
    ModelFiles,
    RuntimeInputError,
    UnsupportedOperation,
    as_model_files,
)
from bastion.runtimes.transformers_loading import (
    config_from_bytes,
    model_from_bytes,
    read_json_object,
    tokenizer_from_bytes,
)
from bastion.wire.protocol import (
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

DEFAULT_MAX_SEQ_LENGTH = 256
BATCH_SIZE = 32
TEXT_INPUT = "text"
EMBEDDING_OUTPUT = "embedding"
POOLING_CONFIG = "1_Pooling/config.json"


class SentenceEmbeddingRuntime:
    """A sentence encoder serving embeddings and Open Inference Protocol `infer`."""

    def __init__(self, source: Path | ModelFiles, threads: int) -> None:
        torch.set_num_threads(threads)
        files = as_model_files(source)
        config = config_from_bytes(files.read("config.json"))
        self._model = model_from_bytes(
            AutoModel.from_config, config, files.read_buffer("model.safetensors")
        )
        self._tokenizer = tokenizer_from_bytes(files.read("tokenizer.json"))
        pooling = read_json_object(files.read_optional(POOLING_CONFIG))
        if pooling and not pooling.get("pooling_mode_mean_tokens", False):
            raise ValueError("only mean pooling is supported for sentence embeddings")
        sbert = read_json_object(files.read_optional("sentence_bert_config.json"))
        self._max_tokens = int(sbert.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH)
        self._dim = int(config.hidden_size)
        self._pad_id = int(getattr(config, "pad_token_id", None) or 0)
        # BERT-like encoders take segment ids; others (e.g. RoBERTa-free ones) do not.
        parameters = inspect.signature(self._model.forward).parameters
        self._takes_type_ids = "token_type_ids" in parameters
        self._metadata = ModelMetadata(
            runtime="sentence-embedding",
            capabilities=["embeddings", "infer"],
            inputs=[TensorSpec(name=TEXT_INPUT, datatype="BYTES", shape=[-1])],
            outputs=[TensorSpec(name=EMBEDDING_OUTPUT, datatype="FP32", shape=[-1, self._dim])],
            context_length=self._max_tokens,
            embedding_dim=self._dim,
            platform="transformers",
        )

    def metadata(self) -> ModelMetadata:
        return self._metadata

    def generate(self, request: Generate, cancel: CancelToken, emit: EmitDelta) -> GenerateResult:
        raise UnsupportedOperation("text generation")

    def encode(
        self, texts: Sequence[str], cancel: CancelToken | None = None
    ) -> tuple[np.ndarray[Any, Any], int]:
        """Unit-length float32 embeddings of `texts` (rows) and the number of tokens read;
        Cancelled between batches once `cancel` is set."""
        encodings = self._tokenize(texts)
        return self._encode(encodings, cancel), sum(len(e.ids) for e in encodings)

    def _tokenize(self, texts: Sequence[str]) -> list[Any]:
        """The texts' encodings; RuntimeInputError if one is longer than the model reads."""
        encodings: list[Any] = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        longest = max((len(e.ids) for e in encodings), default=0)
        if longest > self._max_tokens:
            raise RuntimeInputError(
                f"An input has {longest} tokens, more than the model's limit of "
                f"{self._max_tokens}.",
                code="context_length_exceeded",
            )
        return encodings

    def _encode(
        self, encodings: Sequence[Any], cancel: CancelToken | None = None
    ) -> np.ndarray[Any, Any]:
        tokens = sum(len(e.ids) for e in encodings)
        vectors = np.zeros((len(encodings), self._dim), dtype="<f4")
        # Texts of similar length share a batch, so little padding is computed.
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        with torch.inference_mode():
            for start in range(0, len(order), BATCH_SIZE):
                if cancel is not None:
                    # Nobody waits for the rest: stop, charging what was read.
                    cancel.check(tokens)
                rows = order[start : start + BATCH_SIZE]
                pooled = self._encode_batch([encodings[i] for i in rows])
                vectors[rows] = pooled.numpy()
        return vectors

    def _encode_many(
        self, texts_of: list[list[str]], cancel: CancelToken | None = None
    ) -> list[tuple[np.ndarray[Any, Any], int] | Exception]:
        """The embeddings of several requests' texts through shared forward passes (texts
        of similar length batched together, whoever sent them); a request whose texts are
        too long fails alone."""
        encoded: list[list[Any] | Exception] = []
        for texts in texts_of:
            try:
                encoded.append(self._tokenize(texts))
            except RuntimeInputError as exc:
                encoded.append(exc)
        every = [e for encodings in encoded if isinstance(encodings, list) for e in encodings]
        vectors = self._encode(every, cancel) if every else np.zeros((0, self._dim), dtype="<f4")
        results: list[tuple[np.ndarray[Any, Any], int] | Exception] = []
        start = 0
        for encodings in encoded:
            if isinstance(encodings, Exception):
                results.append(encodings)
                continue
            rows = vectors[start : start + len(encodings)]
            start += len(encodings)
            results.append((rows, sum(len(e.ids) for e in encodings)))
        return results

    def embed_batch(
        self, requests: list[Embed], cancel: CancelToken | None = None
    ) -> list[EmbedResult | Exception]:
        """Several requests' texts in shared forward passes; each gets its own vectors and
        token count (mean pooling is per text, so batch-mates never mix)."""
        answers: list[EmbedResult | Exception] = []
        for request, result in zip(
            requests, self._encode_many([r.texts for r in requests], cancel), strict=True
        ):
            if isinstance(result, Exception):
                answers.append(result)
                continue
            vectors, tokens = result
            answers.append(
                EmbedResult(
                    id=request.id,
                    vectors=vectors.tobytes(),
                    count=len(request.texts),
                    dim=self._dim,
                    prompt_tokens=tokens,
                )
            )
        return answers

    def infer_batch(
        self, requests: list[Infer], cancel: CancelToken | None = None
    ) -> list[InferResult | Exception]:
        """Open Inference Protocol requests of texts, batched as embed_batch does."""
        texts_of: list[list[str] | Exception] = []
        for request in requests:
            try:
                texts_of.append(self._texts_of(request))
            except RuntimeInputError as exc:
                texts_of.append(exc)
        valid = [texts for texts in texts_of if isinstance(texts, list)]
        encoded = iter(self._encode_many(valid, cancel))
        answers: list[InferResult | Exception] = []
        for request, texts in zip(requests, texts_of, strict=True):
            if isinstance(texts, Exception):
                answers.append(texts)
                continue
            result = next(encoded)
            if isinstance(result, Exception):
                answers.append(result)
                continue
            answers.append(self._infer_result(request, texts, *result))
        return answers

    def _encode_batch(self, encodings: Sequence[Any]) -> torch.Tensor:
        width = max(len(e.ids) for e in encodings)
        ids = torch.full((len(encodings), width), self._pad_id, dtype=torch.long)
        type_ids = torch.zeros((len(encodings), width), dtype=torch.long)
        mask = torch.zeros((len(encodings), width), dtype=torch.long)
        for row, encoding in enumerate(encodings):
            size = len(encoding.ids)
            ids[row, :size] = torch.tensor(encoding.ids, dtype=torch.long)
            type_ids[row, :size] = torch.tensor(encoding.type_ids, dtype=torch.long)
            mask[row, :size] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self._takes_type_ids:
            inputs["token_type_ids"] = type_ids
        hidden = self._model(**inputs).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1)
        mean = summed / torch.clamp(weights.sum(dim=1), min=1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=1).float()

    def embed(self, request: Embed, cancel: CancelToken | None = None) -> EmbedResult:
        vectors, tokens = self.encode(request.texts, cancel)
        return EmbedResult(
            id=request.id,
            vectors=vectors.tobytes(),
            count=len(request.texts),
            dim=self._dim,
            prompt_tokens=tokens,
        )

    def infer(self, request: Infer, cancel: CancelToken | None = None) -> InferResult:
        texts = self._texts_of(request)
        vectors, tokens = self.encode(texts, cancel)
        return self._infer_result(request, texts, vectors, tokens)

    def _infer_result(
        self, request: Infer, texts: list[str], vectors: np.ndarray[Any, Any], tokens: int
    ) -> InferResult:
        output = TensorData(
            name=EMBEDDING_OUTPUT,
            datatype="FP32",
            shape=[len(texts), self._dim],
            raw=vectors.tobytes(),
        )
        # Texts are tokens: they count against token quotas as /v1/embeddings' do.
        return InferResult(id=request.id, outputs=[output], prompt_tokens=tokens)

    def _texts_of(self, request: Infer) -> list[str]:
        """The texts of an Open Inference Protocol request; RuntimeInputError if malformed."""
        if any(name != EMBEDDING_OUTPUT for name in request.outputs):
            raise RuntimeInputError(f"The model's only output is {EMBEDDING_OUTPUT!r}.")
        if len(request.inputs) != 1 or request.inputs[0].name != TEXT_INPUT:
            raise RuntimeInputError(f"The model takes exactly one input, {TEXT_INPUT!r}.")
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES":
            raise RuntimeInputError(f"Input {TEXT_INPUT!r} must have datatype BYTES.")
        if len(tensor.shape) != 1 or tensor.shape[0] != len(tensor.items) or tensor.raw:
            raise RuntimeInputError(
                f"Input {TEXT_INPUT!r} must have shape [N] with N BYTES items; "
                f"got shape {tensor.shape} with {len(tensor.items)} items."
            )
        try:
            return [item.decode("utf-8") for item in tensor.items]
        except UnicodeDecodeError:
            raise RuntimeInputError(f"Input {TEXT_INPUT!r} holds invalid UTF-8.") from None


def load(source: Path | ModelFiles, options: Mapping[str, Any]) -> SentenceEmbeddingRuntime:
    """Load the sentence encoder from its files."""
    return SentenceEmbeddingRuntime(source, threads=int(options.get("threads", 1)))
