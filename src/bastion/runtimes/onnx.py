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
        try:
            results = self._session.run(wanted, feeds)
        except InvalidArgument as exc:
            # ONNX Runtime's message may describe tensor contents; keep it out of the reply.
            raise RuntimeInputError("The model rejected the input tensors.") from exc
        outputs = [
            numpy_to_tensor(name, self._outputs[name].datatype, np.asarray(result))
            for name, result in zip(wanted, results, strict=True)
        ]
        return InferResult(id=request.id, outputs=outputs)


def load(source: Path | ModelFiles, options: Mapping[str, Any]) -> OnnxRuntime:
    """Load `model.onnx` (or options["file"]) from the model's files."""
    file_name = str(options.get("file", DEFAULT_MODEL_FILE))
    model = as_model_files(source).read(file_name)
    return OnnxRuntime(model, threads=int(options.get("threads", 1)))
