"""Pairs a forward and a reverse recurrent op over the same sequence into one bidirectional op.

  Yf, Yhf = GRU(X, Wf, Rf, Bf)                     Y, Yh = GRU(X, [Wf; Wr], [Rf; Rr], [Bf; Br],
  Yr, Yhr = GRU(X, Wr, Rr, Br, direction=reverse)   ->            direction=bidirectional)
                                                    Yf = Y[:, 0:1], Yr = Y[:, 1:2] (Yh alike)
The same for LSTM (Y_c, and peepholes P, stacked too). Both ops must read the same slice of
the same tensor and share every attribute but the direction, and both start from zeros or
both from given states. Where the two stacked step outputs are joined on the feature axis,
the join is rewritten from Y directly, in the layout the source had:
  Concat([stack_f, stack_r], axis=-1) -> Reshape(Transpose(Y, time and batch first), [0, 0, -1])
  Add(stack_f, stack_r)               -> ReduceSum(Y, axes=[1]) (Transpose if batch-first)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.gru.emit import Emitter, SequenceSource
from onnxpress.passes.gru.graph import producer

from onnxpress.core.ir import constant_value

STATE_INPUTS = {"GRU": (5,), "LSTM": (5, 6)}  # initial_h (and initial_c)
WEIGHT_INPUTS = {"GRU": (1, 2, 3), "LSTM": (1, 2, 3, 7)}  # W, R, B (and peepholes P)


@dataclass
class FusedRnn:
    """One op made by a fusion pass, with what pairing needs to know about it."""

    node: gs.Node
    source: SequenceSource | None  # where its X comes from; None: not a slice of a tensor
    stacked: gs.Tensor | None  # the stacked step output it now writes, if any
    stacked_axis: int
    has_initial_state: bool
    lengths: gs.Tensor | None = None  # what sequence_lens is computed from, if masked

    @property
    def reverse(self) -> bool:
        return self.node.attrs.get("direction", "forward") == "reverse"

    def key(self) -> tuple[Any, ...] | None:
        if self.source is None:
            return None
        attrs = {k: v for k, v in self.node.attrs.items() if k != "direction"}
        s = self.source
        lengths = id(self.lengths) if self.lengths is not None else None
        return (
            self.node.op,
            id(s.data),
            s.axis,
            s.start,
            s.length,
            lengths,
            repr(sorted(attrs.items())),
        )


def _weight(node: gs.Node, k: int, like: np.ndarray) -> np.ndarray:
    """Input k of the op (a constant), or zeros shaped like ``like`` where it is absent."""
    tensor = node.inputs[k] if k < len(node.inputs) else None
    value = constant_value(tensor) if tensor is not None and tensor.name else None
    return np.zeros_like(like) if value is None else value


def pair_directions(
    graph: gs.Graph, fused: list[FusedRnn]
) -> tuple[list[dict[str, Any]], list[gs.Node]]:
    """Merge forward/reverse pairs; return a record per merge and the nodes made dead."""
    records: list[dict[str, Any]] = []
    dead: list[gs.Node] = []
    waiting: dict[tuple[Any, ...], FusedRnn] = {}
    for op in fused:
        key = op.key()
        if key is None:
            continue
        other = waiting.get(key)
        if (
            other is not None
            and other.reverse != op.reverse
            and (other.has_initial_state == op.has_initial_state)
        ):
            del waiting[key]
            ahead, back = (op, other) if other.reverse else (other, op)
            records.append(_merge(graph, ahead, back, dead))
        else:
            waiting.setdefault(key, op)
    return records, dead


def record_pairs(details: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> None:
    """Note in each fused chain's record the bidirectional op it became part of."""
    for pair in pairs:
        for record in details:
            if record.get("node") in (pair["forward"], pair["reverse"]):
                record["bidirectional"] = pair


def _merge(graph: gs.Graph, ahead: FusedRnn, back: FusedRnn, dead: list[gs.Node]) -> dict[str, Any]:
    op, f, r = ahead.node.op, ahead.node, back.node
    emit = Emitter(graph, f.name)
    names = {1: "W", 2: "R", 3: "B", 7: "P"}
    given: dict[int, gs.Tensor] = {0: f.inputs[0]}
    if len(f.inputs) > 4 and f.inputs[4].name:  # sequence_lens: the same lengths in both
        given[4] = f.inputs[4]
    for k in WEIGHT_INPUTS[op]:
        if any(k < len(n.inputs) and n.inputs[k].name for n in (f, r)):
            both = [_weight(n, k, _weight(m, k, np.zeros(0))) for n, m in ((f, r), (r, f))]
            given[k] = emit.const(names[k], np.concatenate(both))
    if ahead.has_initial_state:
        for k in STATE_INPUTS[op]:
            given[k] = emit.one("Concat", [f.inputs[k], r.inputs[k]], {"axis": 0})
    inputs = [given.get(k, gs.Variable.empty()) for k in range(max(given) + 1)]
    attrs = {**f.attrs, "direction": "bidirectional"}
    count = len(f.outputs)
    outs = [gs.Variable(emit.name(n), dtype=np.float32) for n in ("Y", "Y_h", "Y_c")[:count]]
    merged = emit.node(op, inputs, attrs, outs, name=emit.name(f"bidirectional_{op}"))
    for direction, node in enumerate((f, r)):
        for j, old in enumerate(list(node.outputs)):
            if not old.name or not (old.outputs or old in graph.outputs):
                continue
            axis = 1 if j == 0 else 0
            bounds = [emit.const(n, [v]) for n, v in (("from", direction), ("to", direction + 1))]
            emit.one("Slice", [merged[j], *bounds, emit.const("axis", [axis])], output=old)
    dead.extend([f, r])
    join = _rewrite_join(emit, ahead, back, merged[0], dead)
    return {"node": merged[0].inputs[0].name, "forward": f.name, "reverse": r.name, "join": join}


def _rewrite_join(
    emit: Emitter, ahead: FusedRnn, back: FusedRnn, y: gs.Tensor, dead: list[gs.Node]
) -> str | None:
    """The Concat/Add of the two stacked outputs, written from Y; which one, or None."""
    if ahead.stacked is None or back.stacked is None or ahead.stacked_axis != back.stacked_axis:
        return None
    stacks = (ahead.stacked, back.stacked)
    readers = [t.outputs for t in stacks]
    if any(len(r) != 1 for r in readers) or readers[0][0] is not readers[1][0]:
        return None
    join = readers[0][0]
    if any(id(t) in {id(o) for o in emit.graph.outputs} for t in stacks):
        return None
    batch_first = ahead.stacked_axis == 1
    out = join.outputs[0]
    if join.op == "Concat" and list(join.inputs) == list(stacks) and join.attrs["axis"] in (2, -1):
        perm = [2, 0, 1, 3] if batch_first else [0, 2, 1, 3]
        moved = emit.one("Transpose", [y], {"perm": perm})
        emit.one("Reshape", [moved, emit.const("shape", [0, 0, -1])], output=out)
        kind = "concat"
    elif join.op == "Add" and {id(t) for t in join.inputs} == {id(t) for t in stacks}:
        summed = emit.one(
            "ReduceSum",
            [y, emit.const("axes", [1])],
            {"keepdims": 0},
            output=None if batch_first else out,
        )
        if batch_first:
            emit.one("Transpose", [summed], {"perm": [1, 0, 2]}, output=out)
        kind = "add"
    else:
        return None
    dead.extend(p for p in (producer(t) for t in stacks) if p is not None)
    dead.append(join)
    return kind
