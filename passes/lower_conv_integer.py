"""lower-conv-integer: the ONNX ConvInteger op as DequantizeLinear (scale 1) -> Conv ->
Round -> Cast to int32.

``ConvInteger(x, w, x_zero, w_zero)`` sums ``(x - x_zero) * (w - w_zero)`` over each window
into int32. onnxruntime's ``quantize_dynamic`` writes it for every Conv of a model it
quantizes dynamically (with DynamicQuantizeLinear in front, computing the activation's
scale and zero point at run time, and the int32 result scaled back to float after it).
TVM's Relax importer has no converter for it, so ``onnxpress compile`` refused such models
("cannot convert these ops: ConvInteger", docs/BENCHMARKS.md, run 27).

Here each operand is dequantized with scale 1 at its own zero point (per output channel for
the weights, DequantizeLinear's ``axis``, opset 13), the float Conv sums the same products,
and Round and Cast give back the int32 result. The products are integers of at most 16 bits,
so the float sum is exact until it passes 2^24, and within a unit in 2^24 after that:
the pass is checked like any lossless one against onnxruntime's ConvInteger. compile's
integer lowering takes the Conv on integer kernels where the zero points are constants.

Refused, with a reason: per-channel weight zero points in a model below opset 13, and zero
points that are neither scalars nor one per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxpress.core.context import PassContext
from onnxpress.core.ir import replace_node
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

PER_AXIS_OPSET = 13  # DequantizeLinear's axis
ROUND_OPSET = 11


@dataclass(frozen=True)
class LowerConvIntegerOptions:
    """No options: every ConvInteger that passes the checks is lowered."""


class Refused(Exception):
    """Why one ConvInteger stays as it is."""


def _zero_point(node: gs.Node, index: int, dtype: type) -> gs.Tensor:
    """The node's zero point input ``index``, or a zero of ``dtype`` where it is absent."""
    if len(node.inputs) > index and node.inputs[index].name:
        return node.inputs[index]
    return gs.Constant(f"{node.name}/zero{index}", np.zeros((), dtype))


def _operand_dtype(tensor: gs.Tensor) -> type:
    """numpy type of an 8-bit operand (uint8 where unknown: onnxruntime's activations)."""
    if tensor.dtype is not None and np.dtype(tensor.dtype) in (np.int8, np.uint8):
        return np.dtype(tensor.dtype).type
    return np.uint8


def lower(node: gs.Node, opset: int) -> list[gs.Node]:
    """The float form of one ConvInteger, writing the node's own int32 output."""
    name = node.name or "ConvInteger"
    x, w = node.inputs[0], node.inputs[1]
    x_zero = _zero_point(node, 2, _operand_dtype(x))
    w_zero = _zero_point(node, 3, _operand_dtype(w))
    if isinstance(x_zero, gs.Constant) and np.size(x_zero.values) != 1:
        raise Refused("the activation's zero point is not a scalar")
    w_size = int(np.prod(w_zero.shape)) if w_zero.shape is not None else None
    out_channels = w.shape[0] if w.shape is not None else None
    per_channel = w_size is not None and w_size > 1
    if w_size is None or (per_channel and w_size != out_channels):
        raise Refused("the weight's zero point is neither a scalar nor one per output channel")
    if per_channel and opset < PER_AXIS_OPSET:
        raise Refused(f"per-channel weight zero points need opset 13 (the model has {opset})")
    one = gs.Constant(f"{name}/one", np.ones((), np.float32))
    ones = gs.Constant(f"{name}/ones", np.ones(w_size, np.float32)) if per_channel else one
    xf = gs.Variable(f"{name}/x_float", dtype=np.float32)
    wf = gs.Variable(f"{name}/w_float", dtype=np.float32)
    yf = gs.Variable(f"{name}/sums", dtype=np.float32)
    rounded = gs.Variable(f"{name}/rounded", dtype=np.float32)
    axis = {"axis": 0} if per_channel else {}
    return [
        gs.Node("DequantizeLinear", f"{name}/x", {}, [x, one, x_zero], [xf]),
        gs.Node("DequantizeLinear", f"{name}/w", axis, [w, ones, w_zero], [wf]),
        gs.Node("Conv", f"{name}/float", dict(node.attrs), [xf, wf], [yf]),
        gs.Node("Round", f"{name}/round", {}, [yf], [rounded]),
        gs.Node("Cast", f"{name}/int32", {"to": TensorProto.INT32}, [rounded], [node.outputs[0]]),
    ]


@register_pass("lower-conv-integer")
class LowerConvInteger(Pass[LowerConvIntegerOptions]):
    """ConvInteger (onnxruntime's dynamic quantization) as a float Conv of its exact sums."""

    options_type = LowerConvIntegerOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        opset = ctx.opset_of(graph)
        for node in [n for n in graph.nodes if n.op == "ConvInteger" and not n.domain]:
            if opset < ROUND_OPSET:
                result.refuse(node.name, f"Round needs opset 11 (the model has {opset})")
                continue
            try:
                new_nodes = lower(node, opset)
            except Refused as refused:
                result.refuse(node.name, str(refused))
                continue
            replace_node(graph, node, new_nodes)
            result.count("ConvInteger")
        if result.changed:
            graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
        return result
