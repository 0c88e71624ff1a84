"""Channel rules for ops that pass channels on, move their axis, join or cut them.

* activations, Dropout, Cast, ...: channels pass on unchanged;
* elementwise ops (Add, Mul, Where, ...) identify the channels of their operands; a
  constant operand that spans the channels is sliced by the rewrite, a broadcast one is not;
* BatchNormalization / InstanceNormalization (per-channel constants), pooling, Pad and
  Resize that leave the channel axis alone, Softmax / LayerNormalization over other axes;
* Transpose, Squeeze, Unsqueeze, Gather and Reduce* over other axes move the channel axis;
* Flatten / Reshape merging the channel axis with the axes after it spread each channel
  over a block of features; Concat lays spaces end to end; Split and Slice cut them.
Anything else refuses: ops that mix channels (over the channel axis), shape-dependent
consumers, ops without a rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.analysis.channels.layout import Layout, Segment, node_key
from onnxpress.analysis.channels.trace import (
    Tracer,
    attr,
    constant_array,
    int_list,
    is_used,
    static_prod,
)

Rule = Callable[[Tracer, gs.Node], None]


def unknown_op(t: Tracer, node: gs.Node) -> None:
    t.refuse_inputs(node, "no channel rule for this op")


def shape_dependent(t: Tracer, node: gs.Node) -> None:
    """Shape and Size read the channel count. A Shape sliced (start, end) to other axes (an
    exported batch or sequence length) does not, nor does a Shape whose only readers are
    Gathers of constant indices off the channel axis (a batch or time size, as torch's RNN
    exports read it for the zero initial state)."""
    layout, rank = t.layout(node.inputs[0]), t.rank(node.inputs[0])
    if node.op == "Shape" and layout is not None and rank is not None:
        start, end = (int(attr(node, name, value)) for name, value in (("start", 0), ("end", rank)))
        start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
        if not start <= layout.axis < end:
            return
    if node.op == "Shape" and _reads_other_dims(t, node):
        return
    t.refuse_inputs(node, "shape-dependent consumer")


def _reads_other_dims(t: Tracer, node: gs.Node) -> bool:
    layout, rank = t.layout(node.inputs[0]), t.rank(node.inputs[0])
    if layout is None or rank is None or not node.outputs:
        return layout is None
    dims = list(range(rank))[attr(node, "start", 0) : attr(node, "end", rank)]
    output = node.outputs[0]
    if any(output is o for o in t.graph.outputs) or not output.outputs:
        return False
    for reader in output.outputs:
        index = constant_array(reader.inputs[1]) if len(reader.inputs) > 1 else None
        if reader.op != "Gather" or reader.inputs[0] is not output or index is None:
            return False
        if attr(reader, "axis", 0) != 0 or layout.axis % rank in {
            dims[int(i)] for i in index.reshape(-1)
        }:
            return False
    return True


def unary(t: Tracer, node: gs.Node) -> None:
    layout = t.layout(node.inputs[0]) if node.inputs else None
    for tensor in node.inputs[1:]:
        t.refuse(t.layout(tensor), node, "channels in a parameter input")
    for out in node.outputs:
        t.set(out, layout)


def elementwise(t: Tracer, node: gs.Node) -> None:
    operands = [x for x in node.inputs if x.name]
    ranks = [t.rank(x) for x in operands]
    out_rank = t.rank(node.outputs[0]) or max((r for r in ranks if r is not None), default=None)
    traced = [(x, t.layout(x), r) for x, r in zip(operands, ranks, strict=True)]
    if out_rank is None or any(lay and r is None for _, lay, r in traced):
        t.refuse_inputs(node, "unknown rank")
        return
    placed = [lay.moved(lay.axis + out_rank - r) for _, lay, r in traced if lay and r is not None]
    if not placed:
        return
    if len({lay.axis for lay in placed}) > 1:
        t.refuse_inputs(node, "operands carry channels on different axes")
        return
    axis, length = placed[0].axis, t.length(placed[0])
    for x, lay, r in traced:
        if lay is not None or r is None:
            continue
        dims = t.dims(x) or []
        dim = dims[axis - (out_rank - r)] if axis - (out_rank - r) >= 0 else 1
        if dim == 1 or (dim == length and constant_array(x) is not None):
            continue  # broadcast along the channels, or a constant the rewrite slices
        if dim == length:
            placed.append(t.opaque(node, x, length, axis))
        else:
            t.refuse_inputs(node, f"operand '{x.name}' has unknown size on the channel axis")
            return
    t.identify(node, placed)
    t.set(node.outputs[0], t.spaces.expand(placed[0]))


def normalization(params: int) -> Rule:
    """BatchNormalization (4 parameter inputs) / InstanceNormalization (2): per channel."""

    def rule(t: Tracer, node: gs.Node) -> None:
        layout = t.layout(node.inputs[0])
        if layout is None:
            return
        if layout.axis != 1:
            t.refuse(layout, node, "channels are not on axis 1")
        elif any(constant_array(x) is None for x in node.inputs[1 : 1 + params]):
            t.refuse(layout, node, "parameters are not constants")
        elif any(is_used(out, t) for out in node.outputs[1:]):
            t.refuse(layout, node, "running statistics outputs are used")
        else:
            t.norms[node_key(node)] = node.inputs[0].name
            t.set(node.outputs[0], layout)

    return rule


def _axis_of(t: Tracer, node: gs.Node, default: int) -> tuple[Layout, int] | None:
    """(layout of input 0, the node's normalized ``axis`` attribute), or None if untraced."""
    layout = t.layout(node.inputs[0])
    rank = t.rank(node.inputs[0])
    if layout is None:
        return None
    if rank is None:
        t.refuse(layout, node, "unknown rank")
        return None
    return layout, int(attr(node, "axis", default)) % rank


def over_axis(legacy_coerce: bool) -> Rule:
    """Softmax-like ops mix values along ``axis``; before opset 13 along all axes after it."""

    def rule(t: Tracer, node: gs.Node) -> None:
        found = _axis_of(t, node, 1 if legacy_coerce and t.opset < 13 else -1)
        if found is None:
            return
        layout, axis = found
        coerced = legacy_coerce and t.opset < 13
        if layout.axis == axis or (coerced and layout.axis > axis):
            t.refuse(layout, node, "normalizes over the channel axis")
        else:
            t.set(node.outputs[0], layout)

    return rule


def layer_norm(t: Tracer, node: gs.Node) -> None:
    found = _axis_of(t, node, -1)
    if found is None:
        return
    layout, axis = found
    if layout.axis >= axis:
        t.refuse(layout, node, "normalizes over the channel axis")
    elif any(is_used(out, t) for out in node.outputs[1:]):
        t.refuse(layout, node, "mean / inverse std outputs are used")
    else:
        t.set(node.outputs[0], layout)


def pool(t: Tracer, node: gs.Node) -> None:
    layout = t.layout(node.inputs[0])
    if layout is None:
        return
    if layout.axis != 1:
        t.refuse(layout, node, "channels are not on axis 1")
    elif any(is_used(out, t) for out in node.outputs[1:]):
        t.refuse(layout, node, "pooling indices depend on the channel count")
    else:
        t.set(node.outputs[0], layout)


def reduce(t: Tracer, node: gs.Node) -> None:
    layout, rank = t.layout(node.inputs[0]), t.rank(node.inputs[0])
    if layout is None:
        return
    axes = int_list(node, "axes", 1)
    if rank is None or (axes is None and len(node.inputs) > 1 and node.inputs[1].name):
        t.refuse(layout, node, "unknown rank or computed axes")
        return
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            t.set(node.outputs[0], layout)
        else:
            t.refuse(layout, node, "reduces over every axis")
        return
    axes = [a % rank for a in axes]
    if layout.axis in axes:
        t.refuse(layout, node, "reduces over the channel axis")
        return
    keep = attr(node, "keepdims", 1)
    t.set(
        node.outputs[0],
        layout.moved(layout.axis - (0 if keep else sum(a < layout.axis for a in axes))),
    )


def transpose(t: Tracer, node: gs.Node) -> None:
    layout, rank = t.layout(node.inputs[0]), t.rank(node.inputs[0])
    if layout is None or rank is None:
        t.refuse(layout, node, "unknown rank")
        return
    perm = [int(p) for p in attr(node, "perm", list(range(rank))[::-1])]
    t.set(node.outputs[0], layout.moved(perm.index(layout.axis)))


def squeeze(t: Tracer, node: gs.Node) -> None:
    layout, dims = t.layout(node.inputs[0]), t.dims(node.inputs[0])
    if layout is None:
        return
    axes = int_list(node, "axes", 1)
    if dims is None or (axes is None and any(d is None for d in dims)):
        t.refuse(layout, node, "unknown squeezed axes")
        return
    axes = (
        [a % len(dims) for a in axes]
        if axes is not None
        else [i for i, d in enumerate(dims) if d == 1]
    )
    if layout.axis in axes:
        t.refuse(layout, node, "squeezes the channel axis")
    else:
        t.set(node.outputs[0], layout.moved(layout.axis - sum(a < layout.axis for a in axes)))


def unsqueeze(t: Tracer, node: gs.Node) -> None:
    layout, rank = t.layout(node.inputs[0]), t.rank(node.inputs[0])
    if layout is None:
        return
    axes = int_list(node, "axes", 1)
    if axes is None or rank is None:
        t.refuse(layout, node, "unknown axes")
        return
    axis = layout.axis
    for inserted in sorted(a % (rank + len(axes)) for a in axes):
        axis += inserted <= axis
    t.set(node.outputs[0], layout.moved(axis))


def gather(t: Tracer, node: gs.Node) -> None:
    t.refuse(t.layout(node.inputs[1]), node, "channels used as indices")
    found = _axis_of(t, node, 0)
    index_rank = t.rank(node.inputs[1])
    if found is None:
        return
    layout, axis = found
    if axis == layout.axis or index_rank is None:
        t.refuse(layout, node, "gathers along the channel axis (or unknown index rank)")
    else:
        moved = layout.axis if layout.axis < axis else layout.axis - 1 + index_rank
        t.set(node.outputs[0], layout.moved(moved))


def flatten(t: Tracer, node: gs.Node) -> None:
    found = _axis_of(t, node, 1)
    dims = t.dims(node.inputs[0])
    if found is None or dims is None:
        return
    layout, axis = found
    between, inner = static_prod(dims[axis : layout.axis]), static_prod(dims[layout.axis + 1 :])
    if layout.axis < axis or between != 1 or inner is None:
        t.refuse(layout, node, "the channel axis is not the first flattened axis of static size")
    else:
        t.set(node.outputs[0], Layout(1, layout.spread(inner).segments))


def reshape(t: Tracer, node: gs.Node) -> None:
    """[.., C, d1, .., dk] -> [.., C·s, e1, .., ej] with ∏e | ∏d: channel c -> a block of s."""
    layout, dims_in = t.layout(node.inputs[0]), t.dims(node.inputs[0])
    if layout is None:
        return
    shape, dims_out = constant_array(node.inputs[1]), t.dims(node.outputs[0])
    if shape is None or dims_in is None or dims_out is None or attr(node, "allowzero", 0):
        t.refuse(layout, node, "shape is computed, unknown or allows zeros")
        return
    shape = shape.reshape(-1)
    length, inner = t.length(layout), static_prod(dims_in[layout.axis + 1 :])
    for axis, dim in enumerate(dims_out):
        outer = static_prod(dims_out[axis + 1 :])
        if inner is None or dim is None or outer is None or inner % outer:
            continue
        if dim * outer != length * inner:
            continue
        block = inner // outer
        copies_channels = any(v == 0 and i == layout.axis for i, v in enumerate(shape))
        if copies_channels and not (axis == layout.axis and block == 1):
            break
        t.set(node.outputs[0], Layout(axis, layout.spread(block).segments))
        return
    t.refuse(layout, node, "splits or moves the channel axis")


def concat(t: Tracer, node: gs.Node) -> None:
    rank = t.rank(node.outputs[0])
    traced = [(x, t.layout(x)) for x in node.inputs]
    if all(lay is None for _, lay in traced):
        return
    if rank is None:
        t.refuse_inputs(node, "unknown rank")
        return
    axis = int(attr(node, "axis", 0)) % rank
    axes = {lay.axis for _, lay in traced if lay is not None}
    if axes == {axis}:  # lay the spaces end to end
        segments: list[Segment] = []
        for x, lay in traced:
            size = (t.dims(x) or [None] * rank)[axis]
            if lay is None and size is None:
                t.refuse_inputs(node, f"'{x.name}' has an unknown size on the channel axis")
                return
            lay = lay if lay is not None else t.opaque(node, x, int(size or 0), axis)
            segments.extend(lay.segments)
        t.set(node.outputs[0], t.spaces.expand(Layout(axis, tuple(segments))))
    else:  # concatenated along another axis: the operands' channels are the same channels
        elementwise(t, node)


def split(t: Tracer, node: gs.Node) -> None:
    found = _axis_of(t, node, 0)
    if found is None:
        return
    layout, axis = found
    outputs = list(node.outputs)
    if layout.axis != axis:
        for out in outputs:
            t.set(out, layout)
        return
    length = t.length(layout)
    sizes = int_list(node, "split", 1)
    if sizes is None:
        chunk = -(-length // len(outputs))
        sizes = [chunk] * (len(outputs) - 1) + [length - chunk * (len(outputs) - 1)]
    offsets = np.cumsum([0, *sizes]).tolist()
    parts = [t.spaces.part(layout, a, b) for a, b in itertools.pairwise(offsets)]
    if any(p is None for p in parts) or offsets[-1] != length:
        t.refuse(layout, node, "split sizes cut a channel block")
        return
    for out, part in zip(outputs, parts, strict=True):
        t.set(out, part)


def slice_(t: Tracer, node: gs.Node) -> None:
    layout, rank = t.layout(node.inputs[0]), t.rank(node.inputs[0])
    if layout is None:
        return
    starts, ends = int_list(node, "starts", 1), int_list(node, "ends", 2)
    axes, steps = int_list(node, "axes", 3), int_list(node, "steps", 4)
    if starts is None or ends is None or rank is None:
        t.refuse(layout, node, "starts / ends are not constants")
        return
    axes = [a % rank for a in (axes if axes is not None else range(len(starts)))]
    steps = steps if steps is not None else [1] * len(starts)
    if len(node.inputs) > 3 and node.inputs[3].name and int_list(node, "axes", 3) is None:
        t.refuse(layout, node, "axes are not constants")
        return
    out: Layout | None = layout
    length = t.length(layout)
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        if axis != layout.axis:
            continue
        low = min(max(start + length if start < 0 else start, 0), length)
        high = min(max(end + length if end < 0 else end, 0), length)
        out = t.spaces.part(layout, low, high) if step == 1 and low < high else None
        if out is None:
            t.refuse(layout, node, "strided, empty or block-splitting slice of the channels")
            return
    t.set(node.outputs[0], out)


def pad(t: Tracer, node: gs.Node) -> None:
    layout, rank = t.layout(node.inputs[0]), t.rank(node.inputs[0])
    if layout is None:
        return
    pads, axes = int_list(node, "pads", 1), int_list(node, "axes", 3)
    if pads is None or rank is None:
        t.refuse(layout, node, "pads are not constants")
        return
    axes = [a % rank for a in axes] if axes is not None else list(range(rank))
    n = len(axes)
    if any(pads[i] or pads[i + n] for i, a in enumerate(axes) if a == layout.axis):
        t.refuse(layout, node, "pads the channel axis")
    else:
        t.set(node.outputs[0], layout)


def resize(t: Tracer, node: gs.Node) -> None:
    layout, rank = t.layout(node.inputs[0]), t.rank(node.inputs[0])
    if layout is None:
        return
    if rank is None or t.opset < 11:
        t.refuse(layout, node, "unknown rank or opset before 11")
        return
    axes = [int(a) % rank for a in attr(node, "axes", range(rank))]
    if layout.axis in axes:
        where = axes.index(layout.axis)
        for index, keeps in ((2, 1), (3, t.length(layout))):
            given = node.inputs[index] if len(node.inputs) > index else None
            if given is None or not given.name:
                continue
            value = constant_array(given)
            if value is None or (value.size and value.reshape(-1)[where] != keeps):
                t.refuse(layout, node, "resizes the channel axis, or computed scales / sizes")
                return
    t.set(node.outputs[0], layout)
