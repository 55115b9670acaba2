"""Runs an ONNX model with ONNX Runtime on the CPU, for Open Inference Protocol requests.

The model file is read into memory and the session built from those bytes, so a later
layer can hand over weights it decrypted in memory without writing them to disk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from bastion.runtimes.base import (
    CancelToken,
    EmitDelta,
    ModelFiles,
    RuntimeInputError,
    UnsupportedOperation,
    as_model_files,
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

DEFAULT_MODEL_FILE = "model.onnx"

# ONNX element type (as ONNX Runtime names it) -> Open Inference Protocol datatype.
ONNX_TO_OIP: Mapping[str, str] = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint64)": "UINT64",
    "tensor(uint32)": "UINT32",
    "tensor(uint16)": "UINT16",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}

# Open Inference Protocol datatype -> little-endian numpy dtype (BYTES is handled apart).
OIP_TO_NUMPY: Mapping[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
    "INT16": np.dtype("<i2"),
    "INT8": np.dtype("i1"),
    "UINT64": np.dtype("<u8"),
    "UINT32": np.dtype("<u4"),
    "UINT16": np.dtype("<u2"),
    "UINT8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}


def _spec(node: Any) -> TensorSpec:
    datatype = ONNX_TO_OIP.get(node.type)
    if datatype is None:
        # Sequences and maps (e.g. scikit-learn's ZipMap) have no Open Inference Protocol form.
        raise ValueError(f"ONNX tensor {node.name!r} has unsupported type {node.type}")
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape]
    return TensorSpec(name=node.name, datatype=datatype, shape=shape)


def tensor_to_numpy(tensor: TensorData, spec: TensorSpec) -> np.ndarray[Any, Any]:
    """Check `tensor` against `spec` and convert it; raises RuntimeInputError on mismatch."""
    if tensor.datatype != spec.datatype:
        raise RuntimeInputError(
            f"Input {spec.name!r} must have datatype {spec.datatype}, not {tensor.datatype}."
        )
    check_shape(tensor.shape, spec)
    count = math.prod(tensor.shape)
    if spec.datatype == "BYTES":
        if tensor.raw or len(tensor.items) != count:
            raise RuntimeInputError(
                f"Input {spec.name!r} must carry {count} BYTES items for shape {tensor.shape}."
            )
        try:
            texts = [item.decode("utf-8") for item in tensor.items]
        except UnicodeDecodeError:
            raise RuntimeInputError(f"Input {spec.name!r} holds invalid UTF-8.") from None
        return np.array(texts, dtype=object).reshape(tensor.shape)
    dtype = OIP_TO_NUMPY[spec.datatype]
    if tensor.items or len(tensor.raw) != count * dtype.itemsize:
        raise RuntimeInputError(
            f"Input {spec.name!r} must carry {count * dtype.itemsize} bytes of raw data "
            f"for shape {tensor.shape}."
        )
    array = np.frombuffer(tensor.raw, dtype=dtype).reshape(tensor.shape)
    if spec.datatype == "BOOL":
        flags: np.ndarray[Any, Any] = array != 0
        return flags
    # Native byte order, and a writable copy: ONNX Runtime may not accept read-only buffers.
    return array.astype(dtype.newbyteorder("="))


def check_shape(shape: Sequence[int], spec: TensorSpec) -> None:
    """Raise RuntimeInputError unless `shape` fits `spec.shape` (-1 in the spec: any size)."""
    fits = len(shape) == len(spec.shape) and all(
        size >= 0 and (want == -1 or want == size)
        for size, want in zip(shape, spec.shape, strict=True)
    )
    if not fits:
        raise RuntimeInputError(
            f"Input {spec.name!r} must have shape {spec.shape} (-1: any), not {list(shape)}."
        )


def numpy_to_tensor(name: str, datatype: str, array: np.ndarray[Any, Any]) -> TensorData:
    """Encode `array` as a TensorData: raw little-endian row-major bytes, or BYTES items."""
    shape = [int(size) for size in array.shape]
    if datatype == "BYTES":
        items = [
            value if isinstance(value, bytes) else str(value).encode("utf-8")
            for value in array.reshape(-1).tolist()
        ]
        return TensorData(name=name, datatype=datatype, shape=shape, items=items)
    dtype = OIP_TO_NUMPY[datatype]
    raw = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return TensorData(name=name, datatype=datatype, shape=shape, raw=raw)


class OnnxRuntime:
    """An ONNX model behind the Runtime protocol; it only offers `infer`."""

    def __init__(self, model_bytes: bytes, threads: int) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {spec.name: spec for spec in map(_spec, self._session.get_inputs())}
        self._outputs = {spec.name: spec for spec in map(_spec, self._session.get_outputs())}
        # Requests can share a call only if every input and output has a free first
        # dimension, and the same one where the model names it: a batch dimension, not
        # a sequence length or a count of detections that happens to be free too.
        nodes = [*self._session.get_inputs(), *self._session.get_outputs()]
        firsts = [node.shape[0] if node.shape else 0 for node in nodes]
        named = {first for first in firsts if isinstance(first, str)}
        self._batchable = all(not isinstance(f, int) for f in firsts) and len(named) <= 1
        self._metadata = ModelMetadata(
            runtime="onnx",
            capabilities=["infer"],
            inputs=list(self._inputs.values()),
            outputs=list(self._outputs.values()),
            platform="onnxruntime_onnx",
        )

    def metadata(self) -> ModelMetadata:
        return self._metadata

    def generate(self, request: Generate, cancel: CancelToken, emit: EmitDelta) -> GenerateResult:
        raise UnsupportedOperation("text generation")

    def embed(self, request: Embed, cancel: CancelToken | None = None) -> EmbedResult:
        raise UnsupportedOperation("embeddings")

    def infer(self, request: Infer, cancel: CancelToken | None = None) -> InferResult:
        feeds, wanted = self._feeds(request)
        return InferResult(id=request.id, outputs=self._run(wanted, feeds))

    def infer_batch(
        self, requests: list[Infer], cancel: CancelToken | None = None
    ) -> list[InferResult | Exception]:
        """Run several requests in as few session calls as their shapes allow: requests
        whose inputs agree in names, datatypes and every dimension past the first, and
        that ask for the same outputs, are concatenated along the first (batch) dimension
        and their outputs split back by rows. A request whose inputs are invalid fails
        alone; if a combined call fails, its requests run one by one."""
        results: list[InferResult | Exception | None] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[tuple[int, dict[str, Any], list[str]]]] = {}
        for index, request in enumerate(requests):
            try:
                feeds, wanted = self._feeds(request)
            except RuntimeInputError as exc:
                results[index] = exc
                continue
            rows = {array.shape[0] if array.ndim else -1 for array in feeds.values()}
            if not self._batchable or len(rows) != 1 or -1 in rows:
                key: tuple[Any, ...] = ("alone", index)
            else:
                key = (
                    tuple(wanted),
                    tuple(
                        (name, array.dtype.str, array.shape[1:])
                        for name, array in sorted(feeds.items())
                    ),
                )
            groups.setdefault(key, []).append((index, feeds, wanted))
        for members in groups.values():
            for index, result in self._run_group(requests, members):
                results[index] = result
        return [r if r is not None else RuntimeInputError("not run") for r in results]

    def _run_group(
        self, requests: list[Infer], members: list[tuple[int, dict[str, Any], list[str]]]
    ) -> list[tuple[int, InferResult | Exception]]:
        if len(members) > 1:
            wanted = members[0][2]
            sizes = [next(iter(feeds.values())).shape[0] for _, feeds, _ in members]
            joined = {
                name: np.concatenate([feeds[name] for _, feeds, _ in members], axis=0)
                for name in members[0][1]
            }
            try:
                outputs = self._session.run(wanted, joined)
            except Exception:
                # Whatever the combined call raised, its requests run one by one below,
                # each with its own answer or error.
                outputs = None
            total = sum(sizes)
            if outputs is not None and all(
                np.asarray(out).ndim and np.asarray(out).shape[0] == total for out in outputs
            ):
                bounds = np.cumsum([0, *sizes])
                split: list[tuple[int, InferResult | Exception]] = []
                for position, (index, _, _) in enumerate(members):
                    lo, hi = int(bounds[position]), int(bounds[position + 1])
                    tensors = [
                        numpy_to_tensor(name, self._outputs[name].datatype, np.asarray(out)[lo:hi])
                        for name, out in zip(wanted, outputs, strict=True)
                    ]
                    split.append((index, InferResult(id=requests[index].id, outputs=tensors)))
                return split
        # Alone, or the combined call failed: each request by itself, its own error.
        done: list[tuple[int, InferResult | Exception]] = []
        for index, feeds, wanted in members:
            try:
                done.append(
                    (index, InferResult(id=requests[index].id, outputs=self._run(wanted, feeds)))
                )
            except RuntimeInputError as exc:
                done.append((index, exc))
        return done

    def _feeds(self, request: Infer) -> tuple[dict[str, np.ndarray[Any, Any]], list[str]]:
        """The request's inputs as arrays, checked against the model's, and the outputs
        it asks for; RuntimeInputError if they do not fit."""
        feeds: dict[str, np.ndarray[Any, Any]] = {}
        for tensor in request.inputs:
            spec = self._inputs.get(tensor.name)
            if spec is None:
                raise RuntimeInputError(f"The model has no input named {tensor.name!r}.")
            if tensor.name in feeds:
                raise RuntimeInputError(f"Input {tensor.name!r} is given more than once.")
            feeds[tensor.name] = tensor_to_numpy(tensor, spec)
        missing = [name for name in self._inputs if name not in feeds]
        if missing:
            raise RuntimeInputError(f"Missing model inputs: {', '.join(missing)}.")
        wanted = list(request.outputs) or list(self._outputs)
        for name in wanted:
            if name not in self._outputs:
                raise RuntimeInputError(f"The model has no output named {name!r}.")
        return feeds, wanted

    def _run(self, wanted: list[str], feeds: dict[str, np.ndarray[Any, Any]]) -> list[TensorData]:
        try:
            results = self._session.run(wanted, feeds)
        except InvalidArgument as exc:
            # ONNX Runtime's message may describe tensor contents; keep it out of the reply.
            raise RuntimeInputError("The model rejected the input tensors.") from exc
        return [
            numpy_to_tensor(name, self._outputs[name].datatype, np.asarray(result))
            for name, result in zip(wanted, results, strict=True)
        ]


def load(source: Path | ModelFiles, options: Mapping[str, Any]) -> OnnxRuntime:
    """Load `model.onnx` (or options["file"]) from the model's files."""
    file_name = str(options.get("file", DEFAULT_MODEL_FILE))
    model = as_model_files(source).read(file_name)
    return OnnxRuntime(model, threads=int(options.get("threads", 1)))
