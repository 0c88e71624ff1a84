"""Channel rules: how each op moves, joins, cuts or consumes the channels of its inputs.

A rule set is data: ``RULES`` maps an op type to a function of (tracer, node) that reads the
layouts of the node's inputs and sets those of its outputs (``onnxpress.analysis.channels.groups``).
This module holds the layers; ``onnxpress.analysis.channels.moves`` the ops between them.

* producers open a space: Conv and ConvTranspose (output channels), Gemm / MatMul with a constant weight
  (output features), GRU and LSTM (hidden units; Y, Y_h and Y_c carry them on their last axis); the
  channels of their input (the contracted axis) are consumed;
* a depthwise Conv passes its input's channels on (a multiplier m spreads each over m);
  a grouped Conv identifies its equal input partitions with each other, and its outputs':
  every partition keeps the same channels.
Ops without a rule refuse the channels of their inputs.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.analysis.channels.layout import Layout, node_key
from onnxpress.analysis.channels.moves import (
    Rule,
    concat,
    elementwise,
    flatten,
    gather,
    normalization,
    over_axis,
    pad,
    pool,
    reduce,
    reshape,
    resize,
    shape_dependent,
    slice_,
    split,
    squeeze,
    transpose,
    unary,
    unknown_op,
    unsqueeze,
)
from onnxpress.analysis.channels.residual import layer_norm
from onnxpress.analysis.channels.trace import Tracer, attr, constant_array

__all__ = ["RULES", "Rule", "unknown_op"]


def conv(t: Tracer, node: gs.Node) -> None:
    weight = constant_array(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if weight is None or (bias is not None and constant_array(bias) is None):
        t.refuse_inputs(node, "weight or bias is not a constant")
        return
    groups = int(attr(node, "group", 1))
    c_out, c_in = weight.shape[0], weight.shape[1] * groups
    x = node.inputs[0]
    layout = t.layout(x)
    if layout is not None and layout.axis != 1:
        t.refuse(layout, node, "channels are not on axis 1")
        layout = None
    if groups > 1 and groups == c_in:  # depthwise: channel c makes outputs c*m .. c*m+m-1
        t.depthwise.add(node_key(node))
        source = layout if layout is not None else t.opaque(node, x, c_in, 1)
        t.set(node.outputs[0], source.spread(c_out // c_in))
        return
    if layout is not None:
        t.consumers[node_key(node)] = x.name
        _identify_partitions(t, node, layout, groups)
    out = t.new_producer(node, c_out, 1)
    _identify_partitions(t, node, out, groups)
    t.set(node.outputs[0], t.spaces.expand(out))


def _identify_partitions(t: Tracer, node: gs.Node, layout: Layout, groups: int) -> None:
    """A grouped Conv keeps the same channels in every partition: identify them."""
    if groups <= 1:
        return
    part = t.length(layout) // groups
    pieces = [t.spaces.part(layout, i * part, (i + 1) * part) for i in range(groups)]
    if any(p is None for p in pieces):
        t.refuse(layout, node, "a partition of the grouped Conv splits a channel block")
        return
    t.identify(node, [p for p in pieces if p is not None])


def conv_transpose(t: Tracer, node: gs.Node) -> None:
    """Weight [C_in, C_out, k...]: consumes the input's channels (axis 0 of the weight) and
    opens C_out output channels (axis 1). Grouped ones are refused."""
    weight = constant_array(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if weight is None or (bias is not None and constant_array(bias) is None):
        t.refuse_inputs(node, "weight or bias is not a constant")
        return
    if int(attr(node, "group", 1)) != 1:
        t.refuse_inputs(node, "a grouped ConvTranspose is not pruned")
        return
    t.consume(node, node.inputs[0], 1, "channels are not on axis 1")
    out = t.new_producer(node, weight.shape[1], 1)
    t.set(node.outputs[0], t.spaces.expand(out))


def gemm(t: Tracer, node: gs.Node) -> None:
    weight = constant_array(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if weight is None or weight.ndim != 2 or (bias is not None and constant_array(bias) is None):
        t.refuse_inputs(node, "weight or bias is not a constant matrix")
        return
    layout = t.layout(node.inputs[0])
    if layout is not None:
        if attr(node, "transA", 0) or layout.axis != 1:
            t.refuse(layout, node, "channels are not the contracted axis of A")
        else:
            t.consumers[node_key(node)] = node.inputs[0].name
    features = weight.shape[0] if attr(node, "transB", 0) else weight.shape[1]
    t.set(node.outputs[0], t.new_producer(node, features, 1))


def matmul(t: Tracer, node: gs.Node) -> None:
    weight = constant_array(node.inputs[1])
    x = node.inputs[0]
    rank = t.rank(x)
    out_rank = t.rank(node.outputs[0]) or rank  # x [.., K] · W [K, N] keeps x's rank
    if weight is None or weight.ndim != 2 or rank is None or out_rank is None:
        t.refuse_inputs(node, "not a MatMul by a constant matrix")
        return
    layout = t.layout(x)
    if layout is not None:
        if layout.axis != rank - 1:
            t.refuse(layout, node, "channels are not the contracted (last) axis")
        else:
            t.consumers[node_key(node)] = x.name
    t.set(node.outputs[0], t.new_producer(node, weight.shape[1], out_rank - 1))


def gru(t: Tracer, node: gs.Node) -> None:
    """One hidden unit owns a row of each gate in W, R and B, a column of R, and the
    consumer's input features; Y [.., H] and Y_h [.., H] carry it on their last axis.
    An LSTM likewise, with its peepholes P, initial_c and Y_c; in a bidirectional op both
    directions keep the same units."""
    inputs = list(node.inputs) + [gs.Variable.empty()] * (8 - len(node.inputs))
    recurrence = constant_array(inputs[2])
    bias_ok = not inputs[3].name or constant_array(inputs[3]) is not None
    peepholes_ok = node.op != "LSTM" or not inputs[7].name or constant_array(inputs[7]) is not None
    if constant_array(inputs[1]) is None or recurrence is None or not bias_ok or not peepholes_ok:
        t.refuse_inputs(node, "W, R, B or P is not a constant")
        return
    layout = t.layout(inputs[0])
    if layout is not None:
        if layout.axis != 2:
            t.refuse(layout, node, "channels are not the input-feature axis")
        else:
            t.consumers[node_key(node)] = inputs[0].name
    t.refuse(t.layout(inputs[4]), node, "channels in sequence_lens")
    hidden = int(attr(node, "hidden_size", recurrence.shape[-1]))
    out = t.new_producer(node, hidden, 2)
    for initial in inputs[5:7] if node.op == "LSTM" else inputs[5:6]:
        t.refuse(t.layout(initial), node, f"{initial.name} carries channels of another layer")
        if initial.name and constant_array(initial) is None and not _zeros_of_shape(initial):
            t.refuse(
                out, node, "an initial state is computed (only constants and zeros are sliced)"
            )
    if node.outputs and node.outputs[0].name:
        t.set(node.outputs[0], out.moved(3))
    for state in node.outputs[1:3]:
        if state.name:
            t.set(state, out)


def reshape_merging(t: Tracer, node: gs.Node) -> None:
    """moves.reshape, and also [.., P, C] -> [.., P·C] with the channels last and P static:
    P copies of the channels side by side (a bidirectional GRU/LSTM's Y [.., 2, H] joined
    into [.., 2H] keeps the same units in both directions)."""
    layout, dims_in, dims_out = t.layout(node.inputs[0]), t.dims(node.inputs[0]), None
    shape = constant_array(node.inputs[1])
    if layout is not None and shape is not None and not attr(node, "allowzero", 0):
        dims_out = t.dims(node.outputs[0])
    if layout is None or dims_in is None or dims_out is None or shape is None:
        reshape(t, node)
        return
    shape = shape.reshape(-1)
    axis = len(dims_out) - 1
    outer = [d for d in dims_in[axis : layout.axis] if isinstance(d, int)]
    copies = math.prod(outer)
    kept_dims = all(
        a == b and (a is not None or int(shape[i]) == 0)
        for i, (a, b) in enumerate(zip(dims_in[:axis], dims_out[:axis], strict=False))
    )
    if (
        layout.axis != len(dims_in) - 1
        or not outer
        or len(outer) != layout.axis - axis
        or not kept_dims
        or dims_out[axis] != copies * t.length(layout)
    ):
        reshape(t, node)
        return
    t.set(node.outputs[0], Layout(axis, layout.segments * copies))


def _zeros_of_shape(tensor: gs.Tensor) -> bool:
    """True when the tensor is ConstantOfShape(...) filled with zeros (GRU's default)."""
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "ConstantOfShape":
        return False
    value = tensor.inputs[0].attrs.get("value")
    return value is None or not np.any(np.asarray(value.values))


_UNARY = """Abs Acos Asin Atan Cast Ceil Celu Clip Cos Dropout Elu Erf Exp Floor Gelu HardSigmoid
HardSwish Identity IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal Relu Round Selu Shrink
Sigmoid Sign Sin Softplus Softsign Sqrt Tan Tanh ThresholdedRelu"""
_ELEMENTWISE = """Add And BitwiseAnd BitwiseOr Div Equal Greater GreaterOrEqual Less LessOrEqual Max
Mean Min Mod Mul Or Pow PRelu Sub Sum Where Xor"""
_POOL = "AveragePool GlobalAveragePool GlobalLpPool GlobalMaxPool LpPool MaxPool"
_REDUCE = """ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare"""

RULES: dict[str, Rule] = {
    **dict.fromkeys(_UNARY.split(), unary),
    **dict.fromkeys(_ELEMENTWISE.split(), elementwise),
    **dict.fromkeys(_POOL.split(), pool),
    **dict.fromkeys(_REDUCE.split(), reduce),
    **dict.fromkeys(["Shape", "Size"], shape_dependent),
    **dict.fromkeys(["Softmax", "LogSoftmax", "Hardmax"], over_axis(legacy_coerce=True)),
    "LpNormalization": over_axis(legacy_coerce=False),
    "LayerNormalization": layer_norm,
    "BatchNormalization": normalization(4),
    "InstanceNormalization": normalization(2),
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": matmul,
    "GRU": gru,
    "LSTM": gru,
    "Transpose": transpose,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Gather": gather,
    "Flatten": flatten,
    "Reshape": reshape_merging,
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Pad": pad,
    "Resize": resize,
}
