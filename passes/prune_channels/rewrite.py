"""Slicing for channel pruning: every node that reads or writes pruned channels.

Given the channel groups and, per pruned group, the sorted channels it keeps, the indices
that survive along each tensor's channel axis follow from its layout. Then:

* Conv: W[kept_out][:, kept_in], b[kept_out]; a depthwise Conv slices W and b by its output
  and sets ``group`` to the kept input count; a grouped Conv keeps the same channels in
  every partition, so W's input axis is sliced by the first partition's;
* Gemm / MatMul: the contracted rows of the weight (columns with transB), the output
  columns (rows) and C;
* ConvTranspose (weight [C_in, C_out, k...]): W[kept_in][:, kept_out], b[kept_out];
* GRU / LSTM: rows j, H+j, ... of each gate in W and R in every direction (both directions
  of a bidirectional op keep the same units), the 6 (8) blocks of B, the 3 peephole blocks
  of P, the columns of R, the input columns of W, ``hidden_size``; initial_h (initial_c) is
  sliced, or dropped when zeros;
* BatchNormalization / InstanceNormalization: the per-channel constants; a
  LayerNormalization over the channels (the residual width): ``width.py``;
* constant operands of elementwise ops that span the channel axis;
* Split sizes, Slice starts / ends, the Reshape shape entry and the Resize size of the
  channel axis;
* attention heads: the head Reshapes and the fused attention ops (``attention.py``).

Constants are replaced by new ones, never edited in place (another node may share them);
the recorded shapes of rewritten intermediate tensors are dropped for shape inference to
redo, and nodes left dead (the shape arithmetic of a dropped initial_h) are removed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.prune_channels import width
from onnxpress.passes.prune_channels.attention import forget_head_shapes, fused, head_shape

from onnxpress.analysis.channels.groups import ChannelGroups
from onnxpress.analysis.channels.layout import node_key
from onnxpress.analysis.channels.trace import constant_array
from onnxpress.core.ir import unique_name

Handler = Callable[["Pruner", gs.Node], bool]


class Pruner:
    """Applies one choice of kept channels (group index -> sorted indices) to a graph."""

    def __init__(
        self,
        graph: gs.Graph,
        groups: ChannelGroups,
        kept: Mapping[int, np.ndarray],
        norm_stats: str = "kept",
    ):
        self.graph = graph
        self.groups = groups
        self.kept = kept
        self.norm_stats = norm_stats  # LayerNorms over a pruned width: kept | full (width.py)
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def indices(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """Surviving indices along the tensor's channel axis; None if it keeps them all."""
        if tensor is None or not tensor.name:
            return None
        return self.groups.tensor_indices(tensor.name, self.kept)

    def own_indices(self, node: gs.Node) -> np.ndarray | None:
        """Surviving output channels (hidden units) of a producer."""
        layout = self.groups.producers.get(node_key(node))
        return None if layout is None else self.groups.kept_indices(layout, self.kept)

    def constant(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Replace input ``index`` of ``node`` with a new constant."""
        old = node.inputs[index] if index < len(node.inputs) else None
        base = old.name if old is not None and old.name else f"{node.name or 'node'}_input{index}"
        tensor = gs.Constant(unique_name(self.graph, f"{base}_pruned", self.taken), values)
        if old is None:
            node.inputs.extend([gs.Variable.empty()] * (index - len(node.inputs)) + [tensor])
        else:
            node.inputs[index] = tensor

    def apply(self) -> int:
        """Rewrite every affected node; return how many were changed."""
        changed = sum(
            HANDLERS[node.op](self, node) for node in list(self.graph.nodes) if node.op in HANDLERS
        )
        outputs = {id(t) for t in [*self.graph.inputs, *self.graph.outputs]}
        for name, tensor in self.graph.tensors().items():
            if isinstance(tensor, gs.Variable) and id(tensor) not in outputs:
                if self.groups.tensor_indices(name, self.kept) is not None:
                    tensor.shape = None
        forget_head_shapes(self)
        self.graph.cleanup(remove_unused_graph_inputs=False)
        return changed


def _value(node: gs.Node, index: int) -> np.ndarray | None:
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None
    return constant_array(node.inputs[index])


def conv(p: Pruner, node: gs.Node) -> bool:
    weight, bias = _value(node, 1), _value(node, 2)
    out, inp = p.indices(node.outputs[0]), p.indices(node.inputs[0])
    if weight is None or (out is None and inp is None):
        return False
    groups = int(node.attrs.get("group", 1))
    if node_key(node) in p.groups.depthwise:
        multiplier = weight.shape[0] // groups
        if out is not None:
            weight, bias = weight[out], bias[out] if bias is not None else None
            node.attrs["group"] = len(out) // multiplier
    else:
        if out is not None:
            weight, bias = weight[out], bias[out] if bias is not None else None
        if inp is not None:
            weight = weight[:, inp[inp < weight.shape[1]]] if groups > 1 else weight[:, inp]
    p.constant(node, 1, weight)
    if bias is not None:
        p.constant(node, 2, bias)
    return True


def conv_transpose(p: Pruner, node: gs.Node) -> bool:
    """Weight [C_in, C_out, k...]: kept outputs on axis 1, kept inputs on axis 0."""
    weight, bias = _value(node, 1), _value(node, 2)
    out, inp = p.indices(node.outputs[0]), p.indices(node.inputs[0])
    if weight is None or (out is None and inp is None):
        return False
    if out is not None:
        weight, bias = weight[:, out], bias[out] if bias is not None else None
    if inp is not None:
        weight = weight[inp]
    p.constant(node, 1, weight)
    if bias is not None:
        p.constant(node, 2, bias)
    return True


def gemm(p: Pruner, node: gs.Node) -> bool:
    weight, bias = _value(node, 1), _value(node, 2)
    out, inp = p.own_indices(node), p.indices(node.inputs[0])
    if weight is None or (out is None and inp is None):
        return False
    k_axis, n_axis = (1, 0) if node.attrs.get("transB", 0) else (0, 1)
    features = weight.shape[n_axis]
    if inp is not None:
        weight = np.take(weight, inp, axis=k_axis)
    if out is not None:
        weight = np.take(weight, out, axis=n_axis)
        if bias is not None and bias.ndim and bias.shape[-1] == features:
            p.constant(node, 2, np.take(bias, out, axis=-1))
    p.constant(node, 1, weight)
    return True


def matmul(p: Pruner, node: gs.Node) -> bool:
    weight = _value(node, 1)
    out, inp = p.own_indices(node), p.indices(node.inputs[0])
    if weight is None or (out is None and inp is None):
        return False
    if inp is not None:
        weight = weight[inp]
    if out is not None:
        weight = weight[:, out]
    p.constant(node, 1, weight)
    return True


def gru(p: Pruner, node: gs.Node) -> bool:
    units, inp = p.own_indices(node), p.indices(node.inputs[0])
    weight, recurrence, bias = _value(node, 1), _value(node, 2), _value(node, 3)
    if weight is None or recurrence is None or (units is None and inp is None):
        return False
    hidden = recurrence.shape[-1]
    gates = recurrence.shape[1] // hidden  # GRU 3, LSTM 4

    def blocks(count: int) -> np.ndarray:
        return np.concatenate([block * hidden + units for block in range(count)])

    if inp is not None:
        weight = weight[:, :, inp]
    if units is not None:
        weight, recurrence = weight[:, blocks(gates)], recurrence[:, blocks(gates)][:, :, units]
        if bias is not None:
            p.constant(node, 3, bias[:, blocks(2 * gates)])
        peepholes = _value(node, 7) if node.op == "LSTM" else None
        if peepholes is not None:
            p.constant(node, 7, peepholes[:, blocks(3)])
        for index in (5, 6) if node.op == "LSTM" else (5,):
            initial = _value(node, index)
            if initial is not None:
                p.constant(node, index, initial[..., units])
            elif len(node.inputs) > index and node.inputs[index].name:
                node.inputs[index] = gs.Variable.empty()  # zeros: the default state
        while node.inputs and not node.inputs[-1].name:
            node.inputs.pop()
        node.attrs["hidden_size"] = len(units)
    p.constant(node, 1, weight)
    p.constant(node, 2, recurrence)
    return True


def normalization(p: Pruner, node: gs.Node) -> bool:
    kept = p.indices(node.inputs[0])
    if kept is None:
        return False
    for index in range(1, 5 if node.op == "BatchNormalization" else 3):
        values = _value(node, index)
        if values is not None:
            p.constant(node, index, values[kept])
    return True


def layer_norm(p: Pruner, node: gs.Node) -> bool:
    """A LayerNormalization over a pruned residual width (``width.py``): γ and β at the kept
    channels; with norm-stats=full, zero-padded to the original width between Pad and Slice."""
    x = node.inputs[0]
    kept = p.indices(x)
    if kept is None or node_key(node) not in p.groups.norms:
        return False
    full = p.groups.length(p.groups.layouts[x.name]) if p.norm_stats == "full" else len(kept)
    for index, values in width.norm_parameters(node, kept, full):
        p.constant(node, index, values)
    if full > len(kept):
        width.pad_and_slice(
            p.graph, node, len(kept), full - len(kept), p.groups.ranks[x.name], p.taken
        )
    return True


def elementwise(p: Pruner, node: gs.Node) -> bool:
    """Slice constant operands that span the channel axis (right-aligned broadcasting)."""
    out = node.outputs[0]
    kept = p.indices(out)
    if kept is None:
        return False
    layout, rank = p.groups.layouts[out.name], p.groups.ranks[out.name]
    length = p.groups.length(layout)
    for index in range(len(node.inputs)):
        values = _value(node, index)
        if values is None or p.indices(node.inputs[index]) is not None:
            continue
        axis = layout.axis - (rank - values.ndim)
        if axis >= 0 and values.shape[axis] == length:
            p.constant(node, index, np.take(values, kept, axis=axis))
    return True


def concat(p: Pruner, node: gs.Node) -> bool:
    """Along the channel axis a constant is a segment of its own (kept whole); along
    another axis it spans the channels like an elementwise operand."""
    out = node.outputs[0]
    layout, rank = p.groups.layouts.get(out.name), p.groups.ranks.get(out.name)
    if layout is None or rank is None or int(node.attrs.get("axis", 0)) % rank == layout.axis:
        return False
    return elementwise(p, node)


def split(p: Pruner, node: gs.Node) -> bool:
    source = p.groups.layouts.get(node.inputs[0].name)
    rank = p.groups.ranks.get(node.inputs[0].name)
    if source is None or rank is None or p.indices(node.inputs[0]) is None:
        return False
    if int(node.attrs.get("axis", 0)) % rank != source.axis:
        return False
    sizes = []
    for out in node.outputs:
        kept = p.indices(out)
        layout = p.groups.layouts[out.name]
        sizes.append(len(kept) if kept is not None else p.groups.length(layout))
    node.attrs.pop("num_outputs", None)
    if "split" in node.attrs or (p.graph.opset or 0) < 13:
        node.attrs["split"] = sizes
    else:
        p.constant(node, 1, np.array(sizes, dtype=np.int64))
    return True


def slice_(p: Pruner, node: gs.Node) -> bool:
    kept = p.indices(node.inputs[0])
    layout = p.groups.layouts.get(node.inputs[0].name)
    rank = p.groups.ranks.get(node.inputs[0].name)
    if kept is None or layout is None or rank is None:
        return False
    legacy = "starts" in node.attrs
    starts = np.array(node.attrs["starts"] if legacy else _value(node, 1), dtype=np.int64)
    ends = np.array(node.attrs["ends"] if legacy else _value(node, 2), dtype=np.int64)
    given = node.attrs.get("axes") if legacy else _value(node, 3)
    axes = [int(a) % rank for a in (given if given is not None else range(len(starts)))]
    length = p.groups.length(layout)
    for i, axis in enumerate(axes):
        if axis == layout.axis:
            low, high = (int(v) + length if v < 0 else int(v) for v in (starts[i], ends[i]))
            starts[i] = int(np.sum(kept < min(max(low, 0), length)))
            ends[i] = int(np.sum(kept < min(max(high, 0), length)))
    if legacy:
        node.attrs["starts"], node.attrs["ends"] = starts.tolist(), ends.tolist()
    else:
        p.constant(node, 1, starts.astype(_value(node, 1).dtype))  # type: ignore[union-attr]
        p.constant(node, 2, ends.astype(_value(node, 2).dtype))  # type: ignore[union-attr]
    return True


def sized_axis(index: int) -> Handler:
    """Reshape (shape, input 1) / Resize (sizes, input 3): the channel-axis entry."""

    def handler(p: Pruner, node: gs.Node) -> bool:
        out = node.outputs[0]
        kept, values = p.indices(out), _value(node, index)
        if kept is None or values is None or not values.size:
            return False
        layout = p.groups.layouts[out.name]
        axes = list(range(len(values)))
        if node.op == "Resize" and "axes" in node.attrs:
            axes = [int(a) % p.groups.ranks[out.name] for a in node.attrs["axes"]]
        position = axes.index(layout.axis) if layout.axis in axes else None
        if position is None or values[position] <= 0:
            return False
        values = values.copy()
        values[position] = len(kept)
        p.constant(node, index, values)
        return True

    return handler


_ELEMENTWISE = """Add And BitwiseAnd BitwiseOr Div Equal Greater GreaterOrEqual Less LessOrEqual Max
Mean Min Mod Mul Or Pow PRelu Sub Sum Where Xor"""

HANDLERS: dict[str, Handler] = {
    **dict.fromkeys(_ELEMENTWISE.split(), elementwise),
    "Concat": concat,
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": matmul,
    "GRU": gru,
    "LSTM": gru,
    "BatchNormalization": normalization,
    "InstanceNormalization": normalization,
    "LayerNormalization": layer_norm,
    "Split": split,
    "Slice": slice_,
    "Reshape": lambda p, node: (
        head_shape(p, node) if node_key(node) in p.groups.head_shapes else sized_axis(1)(p, node)
    ),
    "Attention": fused,
    "MultiHeadAttention": fused,
    "Resize": sized_axis(3),
}
