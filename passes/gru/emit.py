"""Graph building for fuse-gru: the GRU op's sequence input and re-produced step outputs.

  * sequence input: steps x_t = Gather(X, t, axis) / Squeeze(Slice(X, t:t+1)) /
    Squeeze(Split(X)[t]) for t = 0..T-1, or T-1..0 (a reverse chain) -> X itself (Slice
    when X is longer, Transpose when batch-first); anything else -> Concat(Unsqueeze(x_t, 0));
  * step states read outside the loop: h_t -> Gather(Squeeze(Y, 1), t), last -> Squeeze(Y_h, 0);
    Concat(Unsqueeze(h_t, a) for t in order, axis=a) -> Transpose(Squeeze(Y, 1)) moving
    time to axis a, so torch's ``stack(outputs, 1)`` becomes one node;
  * where the source named its gates, their order in the input projection (report only).
New nodes write the original tensors, so graph outputs keep their names; the cells' nodes,
and whatever fed only them, are then removed.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.gru.graph import (
    PROJECTIONS,
    GraphIndex,
    RecurrentCell,
    TensorTypes,
    producer,
)

from onnxpress.core.ir import unique_name


def _axes(index: GraphIndex, node: gs.Node) -> list[int] | None:
    """Axes of a Squeeze/Unsqueeze, from the attribute (opset < 13) or the constant input."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    value = index.literal(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if value is None else [int(a) for a in np.atleast_1d(value)]


def sequence_step(
    index: GraphIndex, x: gs.Tensor, types: TensorTypes
) -> tuple[gs.Tensor, int, int] | None:
    """(X, time axis, t) when the step input is slice t of a rank-3 tensor X, else None."""
    node = producer(x)
    if node is None:
        return None
    if node.op == "Gather":
        data, step, axis = node.inputs[0], index.literal(node.inputs[1]), node.attrs.get("axis", 0)
        if step is None or step.ndim != 0:
            return None
        step = int(step)
    elif node.op == "Squeeze":
        axes, sliced = _axes(index, node), producer(node.inputs[0])
        if axes is None or len(axes) != 1 or sliced is None:
            return None
        axis, data = axes[0], sliced.inputs[0]
        if sliced.op == "Split":
            step = sliced.outputs.index(node.inputs[0])
            if sliced.attrs.get("axis", 0) % 3 != axis % 3:
                return None
        elif sliced.op == "Slice" and len(sliced.inputs) >= 4:
            starts, slice_axes = index.literal(sliced.inputs[1]), index.literal(sliced.inputs[3])
            if starts is None or slice_axes is None or list(slice_axes.ravel() % 3) != [axis % 3]:
                return None
            step = int(starts.ravel()[0])
        else:
            return None
        if types.get(node.inputs[0].name, (0, []))[1][axis % 3 : axis % 3 + 1] != [1]:
            return None
    else:
        return None
    dims = types.get(data.name, (0, []))[1]
    if len(dims) != 3:
        return None
    axis %= 3
    if step < 0:
        length = dims[axis]
        if not isinstance(length, int):
            return None
        step += length
    return data, axis, step


def is_zero(index: GraphIndex, tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is all zeros by construction (constant, ConstantOfShape, Expand)."""
    value = index.literal(tensor)
    if value is not None:
        return not np.any(value)
    node = producer(tensor)
    if node is not None and node.op == "ConstantOfShape":
        fill = node.attrs.get("value")
        return fill is None or not np.any(fill.values)
    if node is not None and node.op == "Expand":
        value = index.literal(node.inputs[0])
        return value is not None and not np.any(value)
    return False


class Emitter:
    """Appends nodes to a graph with unique names under one prefix (opset >= 13 forms)."""

    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.taken: set[str] = set(graph.tensors()) | {n.name for n in graph.nodes}

    def name(self, base: str) -> str:
        return unique_name(self.graph, f"{self.prefix}/{base}", self.taken)

    def const(self, base: str, values: Any) -> gs.Constant:
        """A constant; Python ints become int64, arrays keep their dtype."""
        array = np.asarray(values)
        return gs.Constant(
            self.name(base), array.astype(np.int64) if array.dtype.kind == "i" else array
        )

    def node(
        self,
        op: str,
        inputs: list[gs.Tensor],
        attrs: dict[str, Any] | None = None,
        outputs: list[gs.Tensor] | None = None,
        name: str | None = None,
    ) -> list[gs.Tensor]:
        outs = outputs or [gs.Variable(self.name(op.lower()), dtype=np.float32)]
        for out in outs:
            old = producer(out)
            if old is not None:  # the new node writes this tensor from now on
                old.outputs[old.outputs.index(out)] = gs.Variable(self.name("replaced"))
        node = gs.Node(
            op, name=name or self.name(op), attrs=attrs or {}, inputs=inputs, outputs=outs
        )
        self.graph.nodes.append(node)
        return outs

    def one(
        self,
        op: str,
        inputs: list[gs.Tensor],
        attrs: dict[str, Any] | None = None,
        output: gs.Tensor | None = None,
    ) -> gs.Tensor:
        return self.node(op, inputs, attrs, [output] if output is not None else None)[0]


@dataclass(frozen=True)
class SequenceSource:
    """Where a chain's steps come from: X[start : start + length] along ``axis``."""

    data: gs.Tensor
    axis: int  # time axis of data: 0 time-first, 1 batch-first
    start: int
    length: int
    reverse: bool  # the steps run from the last time step to the first


def sequence_source(
    index: GraphIndex, cells: Sequence[RecurrentCell], types: TensorTypes
) -> SequenceSource | None:
    """The slice of one rank-3 tensor the cells' inputs step through, in either direction."""
    steps = [sequence_step(index, cell.x, types) for cell in cells]
    first = steps[0]
    if first is None or first[1] not in (0, 1):
        return None
    if any(s is None or s[0] is not first[0] or s[1] != first[1] for s in steps):
        return None
    times = [s[2] for s in steps if s is not None]
    start, length = min(times), len(cells)
    reverse = length > 1 and times == list(range(start + length - 1, start - 1, -1))
    if not reverse and times != list(range(start, start + length)):
        return None
    return SequenceSource(first[0], first[1], start, length, reverse)


def sequence_input(
    emit: Emitter, index: GraphIndex, cells: Sequence[RecurrentCell], types: TensorTypes
) -> tuple[gs.Tensor, str, SequenceSource | None]:
    """The GRU's X [T, batch, I], the layout it was found in, and its source slice."""
    source = sequence_source(index, cells, types)
    if source is not None:
        data, axis = source.data, source.axis
        if source.start != 0 or types[data.name][1][axis] != source.length:
            data = emit.one(
                "Slice",
                [
                    data,
                    emit.const("start", [source.start]),
                    emit.const("end", [source.start + source.length]),
                    emit.const("axis", [axis]),
                ],
            )
        if axis == 0:
            return data, "time-first", source
        return emit.one("Transpose", [data], {"perm": [1, 0, 2]}), "batch-first", source
    zero = emit.const("axes", [0])
    stacked = [emit.one("Unsqueeze", [cell.x, zero]) for cell in cells]
    if len(stacked) == 1:
        return stacked[0], "one step", None
    return emit.one("Concat", stacked, {"axis": 0}), "stacked steps", None


def stacked_concat(
    index: GraphIndex, cells: Sequence[RecurrentCell], readers: list[list[gs.Node]]
) -> tuple[gs.Node, int, list[gs.Node]] | None:
    """Concat(Unsqueeze(h_t, a) for every step in order, axis=a) among the step readers."""
    for unsqueeze in readers[0]:
        out = unsqueeze.outputs[0]
        if unsqueeze.op != "Unsqueeze" or len(out.outputs) != 1 or id(out) in index.outputs:
            continue
        concat = out.outputs[0]
        axes = _axes(index, unsqueeze)
        if concat.op != "Concat" or len(concat.inputs) != len(cells) or axes is None:
            continue
        axis = axes[0] % 3
        if len(axes) != 1 or concat.attrs.get("axis", 0) % 3 != axis:
            continue
        parts = [producer(t) for t in concat.inputs]
        if all(
            p is not None
            and p.op == "Unsqueeze"
            and p.inputs[0] is cell.h_new
            and p in readers[t]
            and _axes(index, p) == axes
            and len(p.outputs[0].outputs) == 1
            and id(p.outputs[0]) not in index.outputs
            for t, (p, cell) in enumerate(zip(parts, cells, strict=True))
        ):
            return concat, axis, [p for p in parts if p is not None]
    return None


def gate_order(
    index: GraphIndex, cell: RecurrentCell, source: dict[str, np.ndarray], hidden: int
) -> str:
    """Gate order of a single concatenated input projection, e.g. 'r,z,n' for torch."""
    projections = [n for n in cell.nodes.values() if n.op in PROJECTIONS and n.inputs[0] is cell.x]
    if len(projections) > 1:
        return "separate projections"
    weight = index.literal(projections[0].inputs[1]) if projections else None
    if weight is None or weight.ndim != 2:
        return "unknown"
    node = projections[0]
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        weight = weight.T
    if node.op == "Gemm":
        weight = weight * float(node.attrs.get("alpha", 1.0))
    if weight.shape[1] != len(source) * hidden:
        return "unknown"
    order = []
    for k in range(len(source)):
        block = weight[:, k * hidden : (k + 1) * hidden].T
        found = [g for g, w in source.items() if np.allclose(block, w, rtol=1e-3, atol=1e-5)]
        order.append(found[0] if len(found) == 1 else "?")
    return ",".join(order)


def remove_dead(graph: gs.Graph, seeds: list[gs.Node]) -> int:
    """Remove ``seeds`` and their producers once nothing live reads them; return the count.

    Linear in the nodes it looks at, unlike gs.Graph.cleanup, whose unlinking compares
    nodes by value and is quadratic in the readers of shared weights (every step's cell).
    """
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    outputs = {id(t) for t in graph.outputs}
    heap = [(-order[id(n)], id(n), n) for n in seeds if id(n) in order]
    heapq.heapify(heap)
    dead: set[int] = set()
    while heap:  # consumers (later in order) are decided before their producers
        _, key, node = heapq.heappop(heap)
        if key in dead or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            continue
        if any(id(o) in outputs or any(id(c) not in dead for c in o.outputs) for o in node.outputs):
            continue
        dead.add(key)
        for t in node.inputs:
            p = producer(t)
            if p is not None and id(p) not in dead and id(p) in order:
                heapq.heappush(heap, (-order[id(p)], id(p), p))
    gone = [n for n in graph.nodes if id(n) in dead]
    touched = {id(t): t for n in gone for t in n.inputs}
    for t in touched.values():  # list methods on gs's synchronized lists: no per-item sync
        kept = [c for c in t.outputs if id(c) not in dead]
        list.clear(t.outputs)
        list.extend(t.outputs, kept)
    for n in gone:
        for t in n.outputs:
            list.clear(t.inputs)
        list.clear(n.inputs)
        list.clear(n.outputs)
    graph.nodes = [n for n in graph.nodes if id(n) not in dead]
    return len(gone)
