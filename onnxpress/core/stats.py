"""Model statistics: op histogram, parameters, MACs per op type and serialized bytes.

MACs are counted from shapes given by ONNX shape inference; a symbolic dimension counts as 1
(batch size 1). Parameters are the elements of all initializers and Constant nodes' values,
counted once each.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.core.sizing import serialized_size, tensor_size

logger = logging.getLogger(__name__)


@dataclass
class ModelStats:
    nodes: int
    params: int
    macs: int
    bytes: int
    op_histogram: dict[str, int] = field(default_factory=dict)
    macs_by_op: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "params": self.params,
            "macs": self.macs,
            "bytes": self.bytes,
            "op_histogram": dict(self.op_histogram),
            "macs_by_op": dict(self.macs_by_op),
        }


def _dims(vi: onnx.ValueInfoProto) -> list[int] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in t.shape.dim]


def _constant_dims(model: onnx.ModelProto) -> Iterator[tuple[str, Sequence[int]]]:
    """(name, dims) of every initializer and Constant node value; a later one wins."""
    for t in model.graph.initializer:
        yield t.name, t.dims
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.type == onnx.AttributeProto.TENSOR:
                yield node.output[0], attr.t.dims


def count_params(model: onnx.ModelProto) -> int:
    sizes = {name: math.prod(dims) for name, dims in _constant_dims(model)}
    return sum(sizes.values())


SKELETON_BYTES = 1 << 16  # initializers this large become typed graph inputs for inference


def shape_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large initializers' values: each becomes a graph input of its
    type and shape, which is all shape inference reads of a weight (the values it folds,
    such as Reshape shapes, are small and stay). Inferring a 90 MB encoder's shapes then
    does not copy its weights twice."""
    graph = model.graph
    large = [t for t in graph.initializer if tensor_size(t) >= SKELETON_BYTES]
    if not large:
        return model
    names = {t.name for t in large}
    declared = {i.name for i in graph.input}
    inputs = list(graph.input) + [
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in large
        if t.name not in declared
    ]
    skeleton = onnx.helper.make_graph(
        list(graph.node),
        graph.name,
        inputs,
        list(graph.output),
        [t for t in graph.initializer if t.name not in names],
        value_info=list(graph.value_info),
    )
    out = onnx.helper.make_model(skeleton, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    return out


def infer_shapes(
    model: onnx.ModelProto, names: Collection[str] | None = None
) -> dict[str, list[int]]:
    """Tensor name -> shape (symbolic dims as 1) for every tensor shape inference can type,
    or only for ``names`` (reading every inferred shape costs seconds at 80k nodes)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(
            shape_skeleton(model), check_type=False, strict_mode=False
        )
    except Exception as exc:  # shape inference is best effort for statistics
        logger.debug("shape inference failed for stats: %s", exc)
        inferred = model
    shapes: dict[str, list[int]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if names is not None and vi.name not in names:
            continue
        inferred_dims = _dims(vi)
        if inferred_dims is not None:
            shapes[vi.name] = inferred_dims
    for name, dims in _constant_dims(model):
        if names is None or name in names:
            shapes[name] = list(dims)
    return shapes


def _prod(values: list[int]) -> int:
    return int(np.prod(values, dtype=np.int64)) if values else 1


# The op types node_macs counts; every other node has 0 MACs.
MAC_OPS = frozenset(
    {"Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "MatMul", "MatMulInteger"}
    | {"QLinearMatMul", "Gemm", "GRU", "LSTM", "RNN"}
    | {"Attention", "MultiHeadAttention"}  # opset 23, com.microsoft
)


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Multiply-accumulates of one node, 0 when unknown or not a contraction."""
    op = node.op_type
    if op not in MAC_OPS:
        return 0
    ins = [shapes.get(name) if name else None for name in node.input]
    outs = [shapes.get(name) for name in node.output]
    try:
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w = ins[3] if op == "QLinearConv" else ins[1]
            y = outs[0]
            if w is None or y is None:
                return 0
            # y: N, M, spatial...; w: M, C/group, k...
            return _prod(y) * _prod(w[1:])
        if op == "ConvTranspose":
            x, w = ins[0], ins[1]
            if x is None or w is None:
                return 0
            # every input element is scattered through a C/group x (M/group) x k kernel
            return _prod(x) * _prod(w[1:])
        if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
            y = outs[0]
            a = ins[3] if op == "QLinearMatMul" else ins[0]
            if y is None or a is None or not a:
                return 0
            return _prod(y) * a[-1]
        if op == "Gemm":
            a, y = ins[0], outs[0]
            if a is None or y is None or len(a) != 2:
                return 0
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            return _prod(y) * k
        if op in ("Attention", "MultiHeadAttention"):
            return _attention_macs(node, ins)
        if op in ("GRU", "LSTM", "RNN"):
            x, w = ins[0], ins[1]
            if x is None or w is None:
                return 0
            gates = {"GRU": 3, "LSTM": 4, "RNN": 1}[op]
            directions, gh, inp = w
            hidden = gh // gates
            layout = next((at.i for at in node.attribute if at.name == "layout"), 0)
            seq, batch = (x[1], x[0]) if layout else (x[0], x[1])
            return seq * batch * directions * gates * hidden * (inp + hidden)
    except (IndexError, TypeError, ValueError):
        return 0
    return 0


def _attention_macs(node: onnx.NodeProto, ins: list[list[int] | None]) -> int:
    """q·kᵀ and scores·v: B·S·L·(Dq + Dv) over all heads; com.microsoft Attention also
    projects its input [B, S, D] by its weight [D, N]."""
    if node.domain == "com.microsoft" and node.op_type == "Attention":
        x, w = ins[0], ins[1]
        if x is None or w is None or len(x) != 3:
            return 0
        sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), [])
        q, v = (sizes[0], sizes[2]) if sizes else (w[1] // 3, w[1] // 3)
        return _prod(x[:2]) * (x[2] * w[1] + x[1] * (q + v))
    q, k, v = (ins + [None] * 3)[:3]
    if q is None or k is None or v is None or len(q) not in (3, 4) or len(k) != len(q):
        return 0
    length = k[1] if len(k) == 3 else k[2]
    return _prod(q[:-1]) * length * (q[-1] + v[-1])


def model_stats(model: onnx.ModelProto, with_macs: bool = True) -> ModelStats:
    histogram = Counter(node.op_type for node in model.graph.node)
    macs_by_op: Counter[str] = Counter()
    counted = [node for node in model.graph.node if node.op_type in MAC_OPS]
    if with_macs and counted:
        names = {name for node in counted for name in (*node.input, *node.output)}
        shapes = infer_shapes(model, names)
        for node in counted:
            macs = node_macs(node, shapes)
            if macs:
                macs_by_op[node.op_type] += macs
    return ModelStats(
        nodes=len(model.graph.node),
        params=count_params(model),
        macs=int(sum(macs_by_op.values())),
        bytes=serialized_size(model),
        op_histogram=dict(histogram.most_common()),
        macs_by_op=dict(macs_by_op.most_common()),
    )


def describe_io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs with dtype and shape (symbolic dims by name)."""
    initializers = {t.name for t in model.graph.initializer}

    def entry(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
        shape: list[Any] | None = None
        if t.HasField("shape"):
            shape = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in t.shape.dim
            ]
        return {"name": vi.name, "dtype": dtype, "shape": shape}

    return {
        "inputs": [entry(vi) for vi in model.graph.input if vi.name not in initializers],
        "outputs": [entry(vi) for vi in model.graph.output],
    }


def constant_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
