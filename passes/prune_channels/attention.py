"""Slicing for pruned attention heads: the head Reshapes and the fused attention ops.

With the query/key and value channels of a site kept head by head (K heads, the same count
of dimensions in each: ``heads.py``), the projections, biases and the output projection
are sliced by the ordinary handlers (``rewrite.py``). Here:

* a Reshape that splits heads gets [.., K, Dk] as its trailing shape entries, one that
  merges them [.., K·Dk] (a computed shape, Concat of Shape slices and constants, gets a
  copy of its Concat with new constants);
* com.microsoft ``Attention``: W[kept inputs][:, kept q|k|v columns], the bias,
  ``qkv_hidden_sizes`` and ``num_heads``; ``MultiHeadAttention``: the packed bias and
  ``num_heads``; the opset-23 ``Attention``: ``q_num_heads`` / ``kv_num_heads`` (3-D);
* every fused op whose query/key dimensions shrink gets its ``scale`` written out
  (1/√Dh of the original head size), since the default follows the new head size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.analysis.channels.attention import shape_tail
from onnxpress.analysis.channels.groups import ChannelGroups
from onnxpress.analysis.channels.layout import Layout, node_key
from onnxpress.analysis.channels.trace import constant_array
from onnxpress.core.ir import unique_name


class Slicer(Protocol):
    """What the handlers use of ``rewrite.Pruner``."""

    graph: gs.Graph
    groups: ChannelGroups
    kept: Mapping[int, np.ndarray]
    taken: set[str]

    def indices(self, tensor: gs.Tensor | None) -> np.ndarray | None: ...

    def own_indices(self, node: gs.Node) -> np.ndarray | None: ...

    def constant(self, node: gs.Node, index: int, values: np.ndarray) -> None: ...


def _kept(p: Slicer, layout: Layout) -> np.ndarray | None:
    return p.groups.kept_indices(layout, p.kept)


def kept_heads(kept: np.ndarray, dim: int) -> int:
    """How many heads keep channels (each keeps the same count)."""
    return len(np.unique(kept // dim)) if len(kept) else 0


def _set_tail(p: Slicer, node: gs.Node, tail: list[int]) -> None:
    """Replace the trailing entries of a Reshape's shape input (constant or Concat)."""
    shape = node.inputs[1]
    values = constant_array(shape)
    if values is not None:
        values = values.reshape(-1).copy()
        values[len(values) - len(tail) :] = tail
        p.constant(node, 1, values.astype(np.int64))
        return
    concat: gs.Node = shape.inputs[0]
    operands, remaining = list(concat.inputs), list(tail)
    for index in range(len(operands) - 1, -1, -1):
        part = np.asarray(constant_array(operands[index])).reshape(-1).copy()
        take = min(len(part), len(remaining))
        part[len(part) - take :] = remaining[len(remaining) - take :]
        remaining = remaining[: len(remaining) - take]
        name = unique_name(p.graph, f"{operands[index].name}_pruned", p.taken)
        operands[index] = gs.Constant(name, part.astype(np.int64))
        if not remaining:
            break
    out = gs.Variable(unique_name(p.graph, f"{shape.name}_pruned", p.taken), dtype=np.int64)
    name = unique_name(p.graph, f"{concat.name or 'shape'}_pruned", p.taken)
    p.graph.nodes.append(gs.Node("Concat", name, dict(concat.attrs), operands, [out]))
    node.inputs[1] = out


def head_shape(p: Slicer, node: gs.Node) -> bool:
    """A Reshape that splits ([.., H, Dh]) or merges ([.., H·Dh]) pruned heads."""
    record = p.groups.head_shapes[node_key(node)]
    kept = _kept(p, record.layout)
    if kept is None:
        return False
    heads = kept_heads(kept, record.dim)
    if record.split:
        tail = [heads, len(kept) // max(heads, 1)]
        given = shape_tail(node.inputs[1], 2) or tail
        _set_tail(p, node, [-1 if old == -1 else new for old, new in zip(given, tail, strict=True)])
        return True
    values = constant_array(node.inputs[1])
    if values is not None and int(values.reshape(-1)[-1]) == -1:
        return False
    _set_tail(p, node, [len(kept)])
    return True


def _scale(node: gs.Node, head_dim: int, kept_dim: int) -> None:
    if kept_dim != head_dim and "scale" not in node.attrs:
        node.attrs["scale"] = float(1.0 / math.sqrt(head_dim))


def _head_size(p: Slicer, query: Layout) -> int | None:
    """The query/key head size of the site whose query channels are ``query``."""
    group = p.groups.group_of[query.segments[0].space] if query.segments else -1
    site = next((s for s in p.groups.sites if s.query == group), None)
    return None if site is None else site.qk_dim


def fused_attention(p: Slicer, node: gs.Node) -> bool:
    """com.microsoft Attention: weight [D, Hq+Hk+Hv], bias, qkv_hidden_sizes, num_heads."""
    weight, own, inp = (
        constant_array(node.inputs[1]),
        p.own_indices(node),
        p.indices(node.inputs[0]),
    )
    if weight is None or (own is None and inp is None):
        return False
    columns = int(weight.shape[1])
    if inp is not None:
        weight = weight[inp]
    if own is not None:
        weight = weight[:, own]
        bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if bias is not None:
            p.constant(node, 2, bias[own])
        heads = int(node.attrs["num_heads"])
        sizes = [int(s) for s in node.attrs.get("qkv_hidden_sizes", [])]
        sizes = sizes or [columns // 3] * 3
        edges = np.cumsum([0, *sizes]).tolist()
        new_sizes = [int(np.sum((own >= a) & (own < b))) for a, b in itertools.pairwise(edges)]
        kept_q = own[own < sizes[0]]
        node.attrs["num_heads"] = kept_heads(kept_q, sizes[0] // heads)
        node.attrs["qkv_hidden_sizes"] = new_sizes
        _scale(node, sizes[0] // heads, new_sizes[0] // max(node.attrs["num_heads"], 1))
    p.constant(node, 1, weight)
    return True


def multi_head_attention(p: Slicer, node: gs.Node) -> bool:
    """com.microsoft MultiHeadAttention: num_heads and the packed q|k|v bias."""
    indices = [p.indices(x) for x in node.inputs[:3]]
    if all(i is None for i in indices):
        return False
    lengths = [p.groups.length(p.groups.layouts[x.name]) for x in node.inputs[:3]]
    kept = [np.arange(n) if i is None else i for i, n in zip(indices, lengths, strict=True)]
    bias = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if bias is not None:
        offsets = np.cumsum([0, *lengths[:2]])
        p.constant(
            node, 3, np.concatenate([bias[o + k] for o, k in zip(offsets, kept, strict=True)])
        )
    heads = int(node.attrs["num_heads"])
    node.attrs["num_heads"] = kept_heads(kept[0], lengths[0] // heads)
    _scale(node, lengths[0] // heads, len(kept[0]) // node.attrs["num_heads"])
    return True


def attention_op(p: Slicer, node: gs.Node) -> bool:
    """Opset-23 Attention: head counts (3-D inputs) and the scale."""
    query = p.groups.head_tensors.get(node.inputs[0].name) or p.groups.layouts.get(
        node.inputs[0].name
    )
    if query is None:
        return False
    kept = _kept(p, query)
    dim = _head_size(p, query)
    if kept is None or dim is None:
        return False
    count = kept_heads(kept, dim)
    if "q_num_heads" in node.attrs:
        node.attrs["q_num_heads"] = node.attrs["kv_num_heads"] = count
    _scale(node, dim, len(kept) // max(count, 1))
    return True


def forget_head_shapes(p: Slicer) -> None:
    """Drop the recorded shapes of split-head tensors whose heads or dimensions changed."""
    tensors = p.graph.tensors()
    for name, layout in p.groups.head_tensors.items():
        tensor = tensors.get(name)
        if isinstance(tensor, gs.Variable) and _kept(p, layout) is not None:
            tensor.shape = None


def fused(p: Slicer, node: gs.Node) -> bool:
    """Dispatch on the fused attention ops (by domain)."""
    if node.domain == "com.microsoft" and node.op == "Attention":
        return fused_attention(p, node)
    if node.domain == "com.microsoft" and node.op == "MultiHeadAttention":
        return multi_head_attention(p, node)
    if node.domain in (None, "", "ai.onnx") and node.op == "Attention":
        return attention_op(p, node)
    return False
