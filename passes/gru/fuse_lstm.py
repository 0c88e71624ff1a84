"""fuse-lstm: LSTM cells written in primitive ops -> one ONNX LSTM op per unrolled loop.

  for t in 0..T-1:  i, f, o = σ(W x_t + R h + b [+ P ⊙ c]),  g = tanh(Wg x_t + Rg h + bg)
                    c = f*c + i*g,   h = o * tanh(c)        (o's peephole reads the new c)
  ->  Y, Y_h, Y_c = LSTM(X[T, batch, I], W, R, B, initial_h, initial_c, P)

One rule, ``fuse-lstm``. Pattern: each Tanh of a cell state followed by h = o * tanh(c)
(lstm_cell), cells linked h -> h and c -> c into chains, cut where the weights change.
Check: refuses, with a reason, Tanhs that are not LSTM cells, per-step weights, a state
projection (LSTMP), cell states read outside the loop but for the last, and cells whose
weights, recovered by probing (lstm_probe), do not reproduce the cell within
``tolerance``. Rewrite: one LSTM node (reverse chains get direction="reverse", and a
forward and a reverse LSTM over the same X are paired into a bidirectional one, as in
fuse-gru); step states read outside come from Y, the last h and c from Y_h and Y_c.
Cells masked by a length (h and c kept past it, the output zeroed) give the op
sequence_lens, as in fuse-gru (mask.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnxpress.passes.gru.cell import cell_signature
from onnxpress.passes.gru.emit import (
    Emitter,
    gate_order,
    is_zero,
    sequence_input,
)
from onnxpress.passes.gru.fusion import (
    ChainOptions,
    link_chains,
    match_anchors,
    run_fusion,
    signature_runs,
    without_dead_readers,
)
from onnxpress.passes.gru.graph import GraphIndex, TensorTypes, tensor_types
from onnxpress.passes.gru.lengths import check_masks, sequence_lens
from onnxpress.passes.gru.lstm_cell import LstmCellMatch, is_cell_output, match_lstm_cell
from onnxpress.passes.gru.lstm_probe import LstmSpec, LstmWeights, lstm_self_check, probe_lstm
from onnxpress.passes.gru.mask import attach_masks, state_out, step_views
from onnxpress.passes.gru.outputs import StepOutputs
from onnxpress.passes.gru.pair import FusedRnn

from onnxpress.core.context import PassContext
from onnxpress.core.ir import unique_name
from onnxpress.core.pass_base import Pass, PassResult, Refusal
from onnxpress.core.registry import register_pass
from onnxpress.core.rewrite import Rule, rule_node_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FuseLstmOptions(ChainOptions):
    pass


@dataclass
class LstmCandidate:
    """A chain of matched cells sharing weights, or one Tanh that is refused."""

    anchor: str
    cells: list[LstmCellMatch] = field(default_factory=list)
    problem: str | None = None
    head: LstmCellMatch | None = None  # a first step from zeros that differs (folded h @ R)
    weights: LstmWeights | None = None
    error: float = 0.0
    lengths: gs.Tensor | None = None  # the lengths the cells are masked by, if any


class FuseLstmRule(Rule[LstmCandidate]):
    name = "fuse-lstm"

    def __init__(self, options: FuseLstmOptions) -> None:
        self.options = options
        self.model = onnx.ModelProto()
        self.types: TensorTypes = {}
        self.index: GraphIndex | None = None
        self.replaced: list[gs.Node] = []
        self.fused: list[FusedRnn] = []
        self.refusals: list[Refusal] = []
        self.dead_removed = 0

    def anchor(self, match: LstmCandidate) -> str:
        return match.anchor

    def pattern(self, graph: gs.Graph, ctx: PassContext) -> list[LstmCandidate]:
        graph.toposort()
        tanhs, self.dead_removed = without_dead_readers(
            graph, lambda: [n for n in graph.nodes if n.op == "Tanh" and is_cell_output(n)]
        )
        if not tanhs:
            return []
        self.model = ctx.export(graph)
        index = self.index = GraphIndex(graph)
        self.types = tensor_types(self.model)
        cells, found = match_anchors(
            tanhs,
            lambda node: match_lstm_cell(index, node, self.types),
            lambda name, reason: LstmCandidate(name, problem=reason),
        )
        cells, refused = attach_masks(index, self.types, cells, _states)
        found.extend(LstmCandidate(name, problem=reason) for name, reason in refused)
        chains = link_chains(
            cells,
            lambda c: (id(c.h), id(c.c)),
            lambda c: (id(state_out(c, "h", c.h_new)), id(state_out(c, "c", c.c_new))),
        )
        for chain in chains:
            found.extend(self._runs(chain))
        return found

    def _runs(self, chain: list[LstmCellMatch]) -> list[LstmCandidate]:
        """Split a chain where the cell changes; a lone differing step is refused."""
        assert self.index is not None
        signatures = [_signature(self.index, cell) for cell in chain]
        runs = signature_runs(signatures)
        head = None
        if len(runs) > 1 and len(runs[0]) == 1 and _zero_start(self.index, chain[0]):
            head = chain[runs.pop(0)[0]]
        out = []
        for steps in runs:
            run = [chain[t] for t in steps]
            if len(run) == 1 and len(chain) > 1 and not (head is not None and steps[0] == 1):
                out.append(LstmCandidate(run[0].name, problem=_per_step(run[0], len(chain))))
            else:
                out.append(LstmCandidate(run[0].name, run, head=head if steps[0] == 1 else None))
        return out

    def _dims(self, tensor: gs.Tensor) -> list[int | str | None]:
        return self.types.get(tensor.name, (0, []))[1]

    def check(self, graph: gs.Graph, match: LstmCandidate, ctx: PassContext) -> str | None:
        if match.problem is not None:
            return match.problem
        cells, first = match.cells, match.cells[0]
        if len(cells) < self.options.min_steps:
            return f"{len(cells)} cell(s), fewer than min-steps={self.options.min_steps}"
        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 13:
            return f"opset {opset} < 13 is not supported"
        for tensor in (first.x, first.h, first.c, first.h_new):
            if self.types.get(tensor.name, (0, []))[0] != TensorProto.FLOAT:
                return f"'{tensor.name}' is not float32 (or its type is unknown)"
        x_dims = self._dims(first.x)
        if len(x_dims) != 2 or not isinstance(x_dims[1], int):
            return f"step input '{first.x.name}' is not [batch, features] with static features"
        for t, cell in enumerate(cells[:-1]):
            inside = cell.nodes.keys() | cells[t + 1].nodes.keys()
            outside = [r for r in cell.c_new.outputs if id(r) not in inside]
            if outside or any(cell.c_new is o for o in graph.outputs):
                return f"the cell state '{cell.c_new.name}' of step {t} is read outside the loop"
        probe = next((c for c in cells if c.h is not c.c), None)
        if probe is None:
            return "h and c are one tensor in every cell: the cell cannot be probed"
        spec = self._spec(probe)
        weights = probe_lstm(self.model, spec, ctx.seed)
        if isinstance(weights, str):
            return weights
        error = lstm_self_check(self.model, spec, weights, ctx.seed)
        match.weights, match.error = weights, error
        if not error <= self.options.tolerance:
            return f"self-check failed: the LSTM differs from the cell by {error:.3g}"
        if match.head is not None:
            head = self._spec(match.head)
            if lstm_self_check(self.model, head, weights, ctx.seed, True) <= self.options.tolerance:
                match.cells.insert(0, match.head)
                match.anchor = match.head.name
            else:
                self.refusals.append(Refusal(match.head.name, _per_step(match.head, len(cells))))
        zero_start = _zero_start(self.index, match.cells[0])
        lengths = check_masks(self.model, self.index, self.types, match.cells, zero_start)
        if isinstance(lengths, str):
            return lengths
        match.lengths = lengths
        return None

    def _spec(self, cell: LstmCellMatch) -> LstmSpec:
        batch = self._dims(cell.x)[0]
        return LstmSpec(
            x=cell.x.name,
            h=cell.h.name,
            c=cell.c.name,
            h_new=cell.h_new.name,
            c_new=cell.c_new.name,
            gates={k: t.name for k, t in cell.gates.items()},
            activation_outputs=tuple(a.outputs[0].name for a in cell.activations.values()),
            input_size=int(self._dims(cell.x)[1] or 0),
            hidden=int(self._dims(cell.tanh.outputs[0])[-1] or 0),
            batch=batch if isinstance(batch, int) else None,
        )

    def rewrite(self, graph: gs.Graph, match: LstmCandidate, ctx: PassContext) -> dict[str, Any]:
        assert self.index is not None and match.weights is not None
        index, cells, weights = self.index, match.cells, match.weights
        spec = self._spec(cells[0])
        emit = Emitter(graph, match.anchor)
        sequence, layout, source = sequence_input(emit, index, cells, self.types)
        reverse = source is not None and source.reverse
        inputs = [sequence, *(emit.const(k, getattr(weights, k)) for k in ("W", "R", "B"))]
        first = cells[0]
        zero_start = _zero_start(index, first)
        if match.lengths is not None:
            elem = self.types[match.lengths.name][0]
            inputs.append(sequence_lens(emit, match.lengths, elem, len(cells)))
        if not zero_start or weights.P is not None:
            if match.lengths is None:
                inputs.append(gs.Variable.empty())
            for state in (first.h, first.c):
                inputs.append(
                    gs.Variable.empty()
                    if zero_start
                    else emit.one("Unsqueeze", [state, emit.const("axes", [0])])
                )
        if weights.P is not None:
            inputs.append(emit.const("P", weights.P))
        attrs: dict[str, Any] = {"hidden_size": spec.hidden}
        if reverse:
            attrs["direction"] = "reverse"
        y, y_last, c_last = emit.node(
            "LSTM",
            inputs,
            attrs,
            [gs.Variable(emit.name(n), dtype=np.float32) for n in ("Y", "Y_h", "Y_c")],
            name=unique_name(graph, rule_node_name(self, match.anchor), emit.taken),
        )
        masked = match.lengths is not None
        views = step_views(cells) if masked else cells
        outputs = StepOutputs(emit, index, views, reverse, y, y_last, masked)
        batch = self._dims(first.x)[0]
        outputs.rewire(self.types, (TensorProto.FLOAT, [len(cells), batch, spec.hidden]))
        last = cells[-1]
        if masked:
            outputs.last_state(state_out(last, "h", last.h_new), y_last)
        outputs.last_state(state_out(last, "c", last.c_new), c_last)
        if outputs.concat is not None:
            self.replaced.append(outputs.concat)
        self.replaced.extend(node for cell in cells for node in cell.nodes.values())
        node = y.inputs[0]
        self.fused.append(
            FusedRnn(
                node, source, outputs.stacked, outputs.stacked_axis, not zero_start, match.lengths
            )
        )
        return {
            "node": node.name,
            "cells": [cell.name for cell in cells],
            "cell_count": len(cells),
            "seq_length": len(cells),
            "direction": "reverse" if reverse else "forward",
            "hidden": spec.hidden,
            "input_size": spec.input_size,
            "gate_order": gate_order(index, first, weights.source_input_weights, spec.hidden),
            "peepholes": weights.P is not None,
            "layout": layout,
            "initial_state": "zeros" if zero_start else f"{first.h.name}, {first.c.name}",
            "sequence_lens": match.lengths.name if match.lengths is not None else None,
            "stacked_output": outputs.stacked.name if outputs.stacked is not None else None,
            "self_check_max_abs_error": match.error,
        }


def _states(cell: LstmCellMatch) -> dict[str, tuple[gs.Tensor, gs.Tensor]]:
    return {"h": (cell.h_new, cell.h), "c": (cell.c_new, cell.c)}


def _zero_start(index: GraphIndex, cell: LstmCellMatch) -> bool:
    return is_zero(index, cell.h) and is_zero(index, cell.c)


def _per_step(cell: LstmCellMatch, length: int) -> str:
    return (
        f"step '{cell.name}' of a chain of {length} cells has weights or structure different "
        "from its neighbours: not a shared-weight loop"
    )


def _signature(index: GraphIndex, cell: LstmCellMatch) -> str:
    return cell_signature(index, cell, {id(cell.x): "x", id(cell.h): "s", id(cell.c): "s"})


@register_pass("fuse-lstm")
class FuseLstm(Pass[FuseLstmOptions]):
    """Fuse LSTM cells written in primitive ops (unrolled loops too) into ONNX LSTM ops."""

    options_type = FuseLstmOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return run_fusion(FuseLstmRule(self.options), graph, ctx, "lstm")
