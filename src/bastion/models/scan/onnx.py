"""ONNX models: allowed op domains only (graphs, subgraphs and model-local functions), and
external data only inside the bundle."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

import onnx

from bastion.models.scan.files import Found
from bastion.models.scan.report import ScanLimits, UnsafeModel, printable
from bastion.models.scan.structured import read_all


def _onnx_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """Every graph of a model: the main one, training graphs, and all nested subgraphs."""
    stack = [model.graph]
    for info in model.training_info:
        stack.extend([info.initialization, info.algorithm])
    nodes_of_functions = [node for function in model.functions for node in function.node]
    stack.extend(_subgraphs(nodes_of_functions))
    while stack:
        graph = stack.pop()
        yield graph
        stack.extend(_subgraphs(graph.node))


def _subgraphs(nodes: Any) -> Iterator[onnx.GraphProto]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield attribute.g
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                yield from attribute.graphs


def _onnx_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    def from_nodes(nodes: Any) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attribute in node.attribute:
                yield attribute.t
                yield from attribute.tensors
                for sparse in [attribute.sparse_tensor, *attribute.sparse_tensors]:
                    yield from (sparse.values, sparse.indices)

    for function in model.functions:
        yield from from_nodes(function.node)
    for graph in _onnx_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from from_nodes(graph.node)


def check_onnx(
    rel: str,
    handle: BinaryIO,
    size: int,
    limits: ScanLimits,
    files: dict[str, Found],
    single_file: bool,
) -> dict[str, int]:
    """Validate an ONNX model; returns external data files it needs and the extent each needs."""
    data = read_all(rel, handle, size, limits.max_onnx_model_bytes, "ONNX model")
    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # protobuf's DecodeError and onnx's errors share no narrower base
        raise UnsafeModel(rel, "not a valid ONNX model") from None
    local_functions = {(f.domain, f.name) for f in model.functions}
    node_lists = [graph.node for graph in _onnx_graphs(model)]
    node_lists += [function.node for function in model.functions]
    for nodes in node_lists:
        for node in nodes:
            domain = node.domain
            if domain in limits.onnx_allowed_domains or (domain, node.op_type) in local_functions:
                continue
            raise UnsafeModel(
                rel,
                f"ONNX operator domain `{printable(domain)[:80]}` is not allowed (custom ops "
                f"load native code); allowed: {sorted(limits.onnx_allowed_domains)}",
            )
    needed: dict[str, int] = {}
    base = posixpath.dirname(rel)
    for tensor in _onnx_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if single_file:
            raise UnsafeModel(rel, "ONNX model with external data: import its directory")
        target, end = _external_extent(rel, base, tensor, files)
        needed[target] = max(needed.get(target, 0), end)
    return needed


def _external_extent(
    rel: str, base: str, tensor: onnx.TensorProto, files: dict[str, Found]
) -> tuple[str, int]:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    if not location or "\x00" in location:
        raise UnsafeModel(rel, "ONNX external data without a location")
    if location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location):
        raise UnsafeModel(rel, "ONNX external data with an absolute path")
    if "\\" in location or ".." in location.split("/"):
        raise UnsafeModel(rel, "ONNX external data path escapes the model directory (`..`)")
    target = posixpath.normpath(posixpath.join(base, location))
    if target not in files:
        raise UnsafeModel(rel, "ONNX external data file is missing from the model directory")
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries.get("length", "-1"))
    except ValueError:
        raise UnsafeModel(rel, "ONNX external data offset/length is not a number") from None
    size = files[target].st.st_size
    end = size if length < 0 else offset + length
    if offset < 0 or end > size:
        raise UnsafeModel(rel, "ONNX external data lies outside its data file")
    return target, end
