"""fuse-gru: GRU cells written in primitive ops -> one ONNX GRU op per unrolled loop.

  for t in 0..T-1:  z = σ(Wz x_t + Rz h + bz),  r = σ(Wr x_t + Rr h + br)
                    n = tanh(Wn x_t + bWn + r*(Rn h + bRn))   linear_before_reset=1
                     or tanh(Wn x_t + Rn (r*h) + bn)          linear_before_reset=0
                    h = (1-z)*n + z*h                         (any algebraic form)
  ->  Y, Y_h = GRU(X[T, batch, I], W, R, B, initial_h = h_0 unless it is zeros)

A chain whose steps read x_{T-1} first becomes direction="reverse"; a forward and a
reverse GRU over the same X then become one direction="bidirectional" GRU, and a Concat
or Add joining their stacked outputs is rewritten from its Y (pair). Cells masked by a
length L (h kept and the output zeroed where t >= L: a padded batch) give the op
sequence_lens = Clip(Cast(L, int32), 0, T) (mask).

One rule, ``fuse-gru``. Pattern: chains of cells matched around each gated Tanh
(cell), linked state to state and cut where the weights change. Check: refuses, with a
reason, Tanhs that are not GRU cells, per-step weights, unknown sizes or dtypes, and cells
whose weights, recovered by probing (probe), do not reproduce the cell on random
inputs. Rewrite (emit): one GRU node, X from the tensor the steps were sliced from,
and every step state read outside the loop re-produced from Y or Y_h. A single cell (a
step-wise decoder) becomes a GRU with seq_length 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnxpress.passes.gru.cell import CellMatch, cell_signature, match_cell, near_gate
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
from onnxpress.passes.gru.mask import attach_masks, state_out, step_views
from onnxpress.passes.gru.outputs import StepOutputs
from onnxpress.passes.gru.pair import FusedRnn
from onnxpress.passes.gru.probe import CellSpec, GruWeights, probe_weights, self_check

from onnxpress.core.context import PassContext
from onnxpress.core.ir import unique_name
from onnxpress.core.pass_base import Pass, PassResult, Refusal
from onnxpress.core.registry import register_pass
from onnxpress.core.rewrite import Rule, rule_node_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FuseGruOptions(ChainOptions):
    linear_before_reset: int | None = None  # None infers it per cell; 0 or 1 forces it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.linear_before_reset not in (None, 0, 1):
            raise ValueError(
                f"linear-before-reset must be 0, 1 or none, not {self.linear_before_reset!r}"
            )


@dataclass
class GruCandidate:
    """A chain of matched cells sharing weights, or one Tanh that is refused."""

    anchor: str
    cells: list[CellMatch] = field(default_factory=list)
    problem: str | None = None
    head: CellMatch | None = None  # a first step that differs, kept if it matches from zeros
    weights: GruWeights | None = None
    error: float = 0.0
    lengths: gs.Tensor | None = None  # the lengths the cells are masked by, if any


class FuseGruRule(Rule[GruCandidate]):
    name = "fuse-gru"

    def __init__(self, options: FuseGruOptions) -> None:
        self.options = options
        self.model = onnx.ModelProto()
        self.types: TensorTypes = {}
        self.index: GraphIndex | None = None
        self.replaced: list[gs.Node] = []  # nodes the rewrites made dead (with their inputs)
        self.refusals: list[Refusal] = []  # heads left out of a fused chain
        self.fused: list[FusedRnn] = []  # the GRU ops made, for pairing into bidirectional
        self.dead_removed = 0

    def anchor(self, match: GruCandidate) -> str:
        return match.anchor

    def pattern(self, graph: gs.Graph, ctx: PassContext) -> list[GruCandidate]:
        graph.toposort()
        index = self.index = GraphIndex(graph)
        tanhs, self.dead_removed = without_dead_readers(
            graph, lambda: [n for n in graph.nodes if n.op == "Tanh" and near_gate(index, n)]
        )
        if not tanhs:
            return []
        if self.dead_removed:
            graph.toposort()
            index = self.index = GraphIndex(graph)
        order = [id(n) for n in graph.nodes]
        self.model = ctx.export(graph)  # the probes run on this model; it sorts the graph
        if [id(n) for n in graph.nodes] != order:
            index = self.index = GraphIndex(graph)
        self.types = tensor_types(self.model)
        cells, found = match_anchors(
            tanhs,
            lambda node: match_cell(index, node, self.types),
            lambda name, reason: GruCandidate(name, problem=reason),
        )
        cells, refused = attach_masks(index, self.types, cells, lambda c: {"h": (c.h_new, c.h)})
        found.extend(GruCandidate(name, problem=reason) for name, reason in refused)
        next_state = lambda c: id(state_out(c, "h", c.h_new))  # noqa: E731
        for chain in link_chains(cells, lambda c: id(c.h), next_state):
            found.extend(self._runs(chain))
        return found

    def _runs(self, chain: list[CellMatch]) -> list[GruCandidate]:
        """Split a chain where the cell changes; a lone differing step is refused.

        A lone first step from a zero state (an exporter folded its recurrent projection
        into a constant) is kept as the next run's ``head``: check() keeps it when it
        matches the run's GRU from zeros."""
        assert self.index is not None
        signatures = [cell_signature(self.index, cell) for cell in chain]
        runs = signature_runs(signatures)
        head = None
        if len(runs) > 1 and len(runs[0]) == 1 and is_zero(self.index, chain[0].h):
            head = chain[runs.pop(0)[0]]
        out = []
        for run in runs:
            cells = [chain[t] for t in run]
            if len(run) == 1 and len(chain) > 1 and not (head is not None and run[0] == 1):
                out.append(GruCandidate(cells[0].name, problem=_per_step(chain, run[0])))
            else:
                out.append(GruCandidate(cells[0].name, cells, head=head if run[0] == 1 else None))
        return out

    def _dims(self, tensor: gs.Tensor) -> list[int | str | None]:
        return self.types.get(tensor.name, (0, []))[1]

    def check(self, graph: gs.Graph, match: GruCandidate, ctx: PassContext) -> str | None:
        if match.problem is not None:
            return match.problem
        assert self.index is not None
        cells, first = match.cells, match.cells[0]
        if len(cells) < self.options.min_steps:
            return f"{len(cells)} cell(s), fewer than min-steps={self.options.min_steps}"
        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 13:
            return f"opset {opset} < 13 is not supported"
        for tensor in (first.x, first.h, first.h_new):
            if self.types.get(tensor.name, (0, []))[0] != TensorProto.FLOAT:
                return f"'{tensor.name}' is not float32 (or its type is unknown)"
        x_dims, h_dims = self._dims(first.x), self._dims(first.h)
        if len(x_dims) != 2 or not isinstance(x_dims[1], int):
            return f"step input '{first.x.name}' is not [batch, features] with static features"
        hidden = self._hidden(first)
        if h_dims and (len(h_dims) != 2 or h_dims[1] not in (hidden, None)):
            return f"state '{first.h.name}' is not [batch, {hidden}]"
        if h_dims and None not in (h_dims[0], x_dims[0]) and h_dims[0] != x_dims[0]:
            return f"state batch {h_dims[0]} differs from input batch {x_dims[0]}"
        if self.index.is_const(first.h) and not is_zero(self.index, first.h):
            return "the initial state is a constant that is not zero"
        spec = self._spec(first)
        weights = probe_weights(self.model, spec, ctx.seed, self.options.linear_before_reset)
        if isinstance(weights, str):
            return weights
        error = self_check(self.model, spec, weights, ctx.seed)
        match.weights, match.error = weights, error
        if not error <= self.options.tolerance:
            return (
                f"self-check failed: the GRU (linear_before_reset="
                f"{weights.linear_before_reset}) differs from the cell by {error:.3g}"
            )
        if match.head is not None:
            head_error = self_check(self.model, self._spec(match.head), weights, ctx.seed, True)
            if head_error <= self.options.tolerance:
                match.cells.insert(0, match.head)
                match.anchor = match.head.name
            else:
                self.refusals.append(Refusal(match.head.name, _per_step([match.head, first], 0)))
                if len(match.cells) == 1:
                    return _per_step([match.head, first], 1)
        zero_start = is_zero(self.index, match.cells[0].h)
        lengths = check_masks(self.model, self.index, self.types, match.cells, zero_start)
        if isinstance(lengths, str):
            return lengths
        match.lengths = lengths
        return None

    def _hidden(self, cell: CellMatch) -> int:
        return int(self._dims(cell.tanh.outputs[0])[-1] or 0)  # static: match_cell checked it

    def _spec(self, cell: CellMatch) -> CellSpec:
        batch = self._dims(cell.x)[0]
        return CellSpec(
            x=cell.x.name,
            h=cell.h.name,
            h_new=cell.h_new.name,
            z=cell.z.name,
            r=cell.r.name,
            n_pre=cell.tanh.inputs[0].name,
            sigmoid_outputs=tuple(s.outputs[0].name for s in cell.gate_sigmoids),
            input_size=int(self._dims(cell.x)[1] or 0),
            hidden=self._hidden(cell),
            z_keeps_state=cell.z_keeps_state,
            batch=batch if isinstance(batch, int) else None,
        )

    def rewrite(self, graph: gs.Graph, match: GruCandidate, ctx: PassContext) -> dict[str, Any]:
        assert self.index is not None and match.weights is not None
        index, cells, weights = self.index, match.cells, match.weights
        spec = self._spec(cells[0])
        emit = Emitter(graph, match.anchor)
        sequence, layout, source = sequence_input(emit, index, cells, self.types)
        reverse = source is not None and source.reverse
        inputs = [
            sequence,
            emit.const("W", weights.W),
            emit.const("R", weights.R),
            emit.const("B", weights.B),
        ]
        zero_start = is_zero(index, cells[0].h)
        if match.lengths is not None:
            elem = self.types[match.lengths.name][0]
            inputs.append(sequence_lens(emit, match.lengths, elem, len(cells)))
        if not zero_start:
            inputs += [
                gs.Variable.empty(),
                emit.one("Unsqueeze", [cells[0].h, emit.const("axes", [0])]),
            ]
        attrs: dict[str, Any] = {
            "hidden_size": spec.hidden,
            "linear_before_reset": weights.linear_before_reset,
        }
        if reverse:
            attrs["direction"] = "reverse"
        y, y_last = emit.node(
            "GRU",
            inputs,
            attrs,
            [
                gs.Variable(emit.name("Y"), dtype=np.float32),
                gs.Variable(emit.name("Y_h"), dtype=np.float32),
            ],
            name=unique_name(graph, rule_node_name(self, match.anchor), emit.taken),
        )
        masked = match.lengths is not None
        views = step_views(cells) if masked else cells
        outputs = StepOutputs(emit, index, views, reverse, y, y_last, masked)
        batch = self._dims(cells[0].x)[0]
        outputs.rewire(self.types, (TensorProto.FLOAT, [len(cells), batch, spec.hidden]))
        if masked:
            outputs.last_state(state_out(cells[-1], "h", cells[-1].h_new), y_last)
        if outputs.concat is not None:
            self.replaced.append(outputs.concat)
        self.replaced.extend(node for cell in cells for node in cell.nodes.values())
        self.fused.append(
            FusedRnn(
                y.inputs[0],
                source,
                outputs.stacked,
                outputs.stacked_axis,
                not zero_start,
                match.lengths,
            )
        )
        logger.debug("fuse-gru: %d cells from %s into one GRU", len(cells), match.anchor)
        return {
            "node": y.inputs[0].name,
            "cells": [cell.name for cell in cells],
            "cell_count": len(cells),
            "seq_length": len(cells),
            "direction": "reverse" if reverse else "forward",
            "hidden": spec.hidden,
            "input_size": spec.input_size,
            "linear_before_reset": weights.linear_before_reset,
            "gate_order": gate_order(index, cells[0], weights.source_input_weights, spec.hidden),
            "update": "(1-z)*n + z*h" if spec.z_keeps_state else "z*n + (1-z)*h, z negated",
            "layout": layout,
            "initial_state": "zeros" if zero_start else cells[0].h.name,
            "sequence_lens": match.lengths.name if match.lengths is not None else None,
            "stacked_output": outputs.stacked.name if outputs.stacked is not None else None,
            "self_check_max_abs_error": match.error,
        }


def _per_step(chain: list[CellMatch], t: int) -> str:
    other = chain[t - 1] if t > 0 else chain[t + 1]
    return (
        f"step {t} of a chain of {len(chain)} cells has weights or structure different from "
        f"its neighbour '{other.name}': per-step weights are not a shared-weight loop"
    )


@register_pass("fuse-gru")
class FuseGru(Pass[FuseGruOptions]):
    """Fuse GRU cells written in primitive ops (unrolled loops too) into ONNX GRU ops."""

    options_type = FuseGruOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return run_fusion(FuseGruRule(self.options), graph, ctx, "gru")
