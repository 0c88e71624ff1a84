"""lower-gru: the ONNX GRU op -> per-step primitive ops (MatMul/Add/Split/Sigmoid/Tanh/Mul).

For each direction d (forward, reverse, or both), with gates in ONNX order z, r, h:
  XW = MatMul(X[T,B,I], W_d^T) + bias_x            one projection for all steps
  for t in steps (reversed for the reverse direction):
    zr = Sigmoid(XW[t][:, :2H] + H Rzr^T + ...),  z, r = Split(zr)
    linear_before_reset=1:  n = Tanh(XW[t][:, 2H:] + r * (H Rh^T + Rbh))
    linear_before_reset=0:  n = Tanh(XW[t][:, 2H:] + (r * H) Rh^T)     (Wbh + Rbh in bias_x)
    H = n + z * (H - n)                              = (1 - z) n + z H
  Y = stack of the step states [T, D, B, H] (layout 1: [B, T, D, H]); Y_h = last state.

Why: TVM 0.27's Relax ONNX importer has no GRU converter, so ``onnxpress compile`` runs this
pass first; the unrolled form is also what a kernel tuner sees as a few repeated tasks.
Refused, with a reason: unknown or dynamic sizes (T, batch), activations other than
Sigmoid/Tanh, and opsets < 13. sequence_lens L (any int32 tensor) masks each step:
H = Where(t < L, H_new, H), Y[t] = Where(t < L, H_new, 0), and with given initial states
the final ones are zero where L = 0, as onnxruntime does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.core.context import PassContext, TensorShapes
from onnxpress.core.ir import constant_value
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

logger = logging.getLogger(__name__)

_DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh")


@dataclass(frozen=True)
class LowerGruOptions:
    max_steps: int = 4096  # refuse to unroll sequences longer than this
    masked_only: bool = False  # lower only ops given sequence_lens (for loop kernels without)

    def __post_init__(self) -> None:
        if isinstance(self.max_steps, bool) or self.max_steps < 1:
            raise ValueError(f"max-steps must be an integer >= 1, not {self.max_steps!r}")


@register_pass("lower-gru")
class LowerGru(Pass[LowerGruOptions]):
    """Unroll ONNX GRU ops into per-step MatMul/Sigmoid/Tanh cells (for TVM and others)."""

    options_type = LowerGruOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return lower_ops(graph, ctx, self.options, "GRU", Lowering)


def lower_ops(
    graph: gs.Graph,
    ctx: PassContext,
    options: LowerGruOptions,
    op: str,
    lowering: type[Lowering],
    defaults: tuple[str, ...] = _DEFAULT_ACTIVATIONS,
    extra: Callable[[gs.Node], str] | None = None,
    domains: tuple[str | None, ...] = (None, "", "ai.onnx"),
) -> PassResult:
    """Unroll every ``op`` node (GRU or LSTM) that passes the checks; refuse the others."""
    result = PassResult()
    found = [n for n in graph.nodes if n.op == op and n.domain in domains]
    if not found:
        return result
    opset = ctx.opset_of(graph)
    shapes = ctx.analysis(TensorShapes, graph)
    for node in found:
        reason = refusal(node, shapes, opset, options, defaults) or (extra(node) if extra else "")
        if options.masked_only and not (len(node.inputs) > 4 and node.inputs[4].name):
            reason = "no sequence_lens, and masked-only=true (left for a loop kernel)"
        if reason:
            result.refuse(node.name, reason)
            continue
        steps = lowering(graph, node, shapes).emit()
        node.outputs.clear()
        node.inputs.clear()
        result.count(f"{op.lower()}_lowered")
        result.count("steps_unrolled", steps)
        result.details.append({"node": node.name, "steps": steps})
    graph.nodes = [n for n in graph.nodes if n.outputs or n.op != op]
    graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
    return result


def refusal(
    node: gs.Node,
    shapes: TensorShapes,
    opset: int,
    options: LowerGruOptions,
    defaults: tuple[str, ...] = _DEFAULT_ACTIVATIONS,
) -> str:
    if opset < 13:
        return f"opset {opset} < 13 (Split takes its sizes as an input from 13)"
    acts = node.attrs.get("activations")
    direction = str(node.attrs.get("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        return f"unknown direction '{direction}'"
    dirs = 2 if direction == "bidirectional" else 1
    if acts is not None and [str(a) for a in acts] != list(defaults) * dirs:
        return f"activations {list(acts)} (only {', '.join(defaults)} are lowered)"
    if node.attrs.get("activation_alpha") or node.attrs.get("activation_beta"):
        return "activation_alpha/beta are not supported"
    for i in (1, 2):
        if constant_value(node.inputs[i]) is None:
            return f"{('W', 'R')[i - 1]} is not a constant"
    if len(node.inputs) > 3 and node.inputs[3].name and constant_value(node.inputs[3]) is None:
        return "B is not a constant"
    x_shape = shapes.get(node.inputs[0].name)
    if x_shape is None or len(x_shape) != 3 or any(d is None for d in x_shape):
        return f"input X has no static shape ({x_shape}); specialise input shapes first"
    layout = int(node.attrs.get("layout", 0))
    steps = x_shape[1] if layout else x_shape[0]
    if steps is not None and steps > options.max_steps:
        return f"{steps} steps > max-steps {options.max_steps}"
    return ""


class Lowering:
    """Emits the unrolled cells of one GRU node; the new nodes write the GRU's outputs."""

    gates = 3  # gate blocks in W and R; B holds twice as many
    state_inputs = (5,)  # initial_h (an LSTM adds initial_c); Y_h (and Y_c) are their finals

    def __init__(self, graph: gs.Graph, node: gs.Node, shapes: TensorShapes) -> None:
        self.graph, self.node = graph, node
        self.prefix = node.name or "gru"
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}
        x_shape = shapes.get(node.inputs[0].name)
        assert x_shape is not None
        self.layout = int(node.attrs.get("layout", 0))
        dims = [int(d) for d in x_shape if d is not None]
        self.steps, self.batch = (dims[1], dims[0]) if self.layout else (dims[0], dims[1])
        self.hidden = int(node.attrs["hidden_size"])
        self.lbr = int(node.attrs.get("linear_before_reset", 0))
        self.clip = node.attrs.get("clip")
        self.dtype = np.asarray(constant_value(node.inputs[1])).dtype
        given = len(node.inputs) > 4 and node.inputs[4].name
        self.lengths: gs.Tensor | None = node.inputs[4] if given else None

    def _name(self, base: str) -> str:
        candidate, i = f"{self.prefix}/{base}", 1
        while candidate in self.taken:
            candidate, i = f"{self.prefix}/{base}_{i}", i + 1
        self.taken.add(candidate)
        return candidate

    def const(self, base: str, value: Any) -> gs.Constant:
        return gs.Constant(self._name(base), np.asarray(value))

    def op(
        self,
        op: str,
        base: str,
        inputs: list[gs.Tensor],
        attrs: dict[str, Any] | None = None,
        outputs: int = 1,
    ) -> list[gs.Variable]:
        outs = [
            gs.Variable(self._name(f"{base}_out{i}" if outputs > 1 else base))
            for i in range(outputs)
        ]
        node = gs.Node(op, self._name(base), attrs or {}, list(inputs), list(outs))
        self.graph.nodes.append(node)
        return outs

    def gate(self, base: str, value: gs.Tensor, activation: str) -> gs.Variable:
        if self.clip is not None:
            limit = float(self.clip)
            lo = self.const(f"{base}/clip_min", np.array(-limit, self.dtype))
            hi = self.const(f"{base}/clip_max", np.array(limit, self.dtype))
            value = self.op("Clip", f"{base}/clip", [value, lo, hi])[0]
        return self.op(activation, base, [value])[0]

    def masked(
        self, s: str, t: int, new: list[gs.Variable], old: list[gs.Tensor]
    ) -> tuple[list[gs.Tensor], gs.Variable]:
        """Step t's states kept past each row's length, and its output zeroed there."""
        if self.lengths is None:
            return list(new), new[0]
        step = self.const(f"{s}/step", np.array(t, np.int32))
        valid = self.op("Less", f"{s}/valid", [step, self.lengths])[0]
        rows = self.op("Unsqueeze", f"{s}/valid_rows", [valid, self.const(f"{s}/axis", [1])])[0]
        kept: list[gs.Tensor] = [
            self.op("Where", f"{s}/keep{k}", [rows, n, o])[0]
            for k, (n, o) in enumerate(zip(new, old, strict=True))
        ]
        zero = self.const(f"{s}/zero", np.zeros((), self.dtype))
        return kept, self.op("Where", f"{s}/y", [rows, new[0], zero])[0]

    def finals(self, d: int, states: list[gs.Tensor], given: bool) -> list[gs.Tensor]:
        """The final states; zero for rows of length 0 when the initial ones were given."""
        if self.lengths is None or not given:
            return states
        zero = self.const(f"d{d}/zero", np.zeros((), self.dtype))
        started = self.op(
            "Greater",
            f"d{d}/started",
            [self.lengths, self.const(f"d{d}/none", np.array(0, np.int32))],
        )[0]
        rows = self.op("Unsqueeze", f"d{d}/started_rows", [started, self.const(f"d{d}/axis", [1])])
        return [
            self.op("Where", f"d{d}/final{k}", [rows[0], v, zero])[0] for k, v in enumerate(states)
        ]

    def emit(self) -> int:
        node, hidden = self.node, self.hidden
        direction = str(node.attrs.get("direction", "forward"))
        directions = ["forward", "reverse"] if direction == "bidirectional" else [direction]
        x = node.inputs[0]
        if self.layout:
            x = self.op("Transpose", "x_time_major", [x], {"perm": [1, 0, 2]})[0]
        w = np.asarray(constant_value(node.inputs[1]))
        r = np.asarray(constant_value(node.inputs[2]))
        has_b = len(node.inputs) > 3 and node.inputs[3].name
        b = (
            np.asarray(constant_value(node.inputs[3]))
            if has_b
            else np.zeros((len(directions), 2 * self.gates * hidden), self.dtype)
        )
        inits = [
            node.inputs[k] if len(node.inputs) > k and node.inputs[k].name else None
            for k in self.state_inputs
        ]
        states_by_dir: list[list[gs.Variable]] = []
        finals_by_dir: list[list[gs.Tensor]] = []
        for d, kind in enumerate(directions):
            states, finals = self._direction(d, kind, x, w[d], r[d], b[d], inits)
            states_by_dir.append(states)
            finals_by_dir.append(finals)
        count = 1 + len(self.state_inputs)
        outputs = list(node.outputs) + [None] * (count - len(node.outputs))
        y_out = outputs[0]
        if self._needed(y_out):
            stacked = []
            for d, states in enumerate(states_by_dir):
                axes = self.const(f"d{d}/y_axes", np.array([0, 1], np.int64))
                parts = [
                    self.op("Unsqueeze", f"d{d}/t{t}/y", [s, axes])[0] for t, s in enumerate(states)
                ]
                stacked.append(self.op("Concat", f"d{d}/y", parts, {"axis": 0})[0])
            y = (
                stacked[0]
                if len(stacked) == 1
                else self.op("Concat", "y_dirs", stacked, {"axis": 1})[0]
            )
            perm = {"perm": [2, 0, 1, 3]}
            self._write(self.op("Transpose", "y_layout", [y], perm)[0] if self.layout else y, y_out)
        for k, final_out in enumerate(outputs[1:count]):
            if not self._needed(final_out):
                continue
            base = ("yh", "yc")[k]
            axes = self.const(f"{base}_axes", np.array([0], np.int64))
            lasts = [
                self.op("Unsqueeze", f"d{d}/{base}", [finals[k], axes])[0]
                for d, finals in enumerate(finals_by_dir)
            ]
            yh = lasts[0] if len(lasts) == 1 else self.op("Concat", base, lasts, {"axis": 0})[0]
            perm = {"perm": [1, 0, 2]}
            self._write(
                self.op("Transpose", f"{base}_layout", [yh], perm)[0] if self.layout else yh,
                final_out,
            )
        return self.steps * len(directions)

    def initial(self, d: int, init: gs.Tensor | None, base: str) -> gs.Tensor:
        """Direction d's initial state from initial_h/initial_c, or zeros."""
        if init is None:
            return self.const(base, np.zeros((self.batch, self.hidden), self.dtype))
        index = self.const(f"{base}_index", np.array(d, np.int64))
        return self.op("Gather", base, [init, index], {"axis": 1 if self.layout else 0})[0]

    def _needed(self, tensor: gs.Tensor | None) -> bool:
        if tensor is None or not tensor.name:
            return False
        return bool(tensor.outputs) or any(t is tensor for t in self.graph.outputs)

    def _write(self, value: gs.Variable, target: gs.Variable) -> None:
        """Make the producer of ``value`` write ``target`` (keeps graph output names)."""
        producer = value.inputs[0]
        producer.outputs = [target if o is value else o for o in producer.outputs]

    def _direction(
        self,
        d: int,
        kind: str,
        x: gs.Tensor,
        w: np.ndarray,
        r: np.ndarray,
        b: np.ndarray,
        inits: list[gs.Tensor | None],
    ) -> tuple[list[gs.Variable], list[gs.Tensor]]:
        """Emit one direction; returns the step states in time order (Y[t]) and [Y_h]."""
        h2, hidden = 2 * self.hidden, self.hidden
        wb, rb = b[: 3 * hidden], b[3 * hidden :]
        bias_x = wb + rb if self.lbr == 0 else np.concatenate([wb[:h2] + rb[:h2], wb[h2:]])
        p = f"d{d}"
        xw = self.op("MatMul", f"{p}/xw", [x, self.const(f"{p}/W_T", w.T.copy())])[0]
        xw = self.op("Add", f"{p}/xw_bias", [xw, self.const(f"{p}/bias_x", bias_x)])[0]
        split_x = self.const(f"{p}/split_x", np.array([h2, hidden], np.int64))
        split_zr = self.const(f"{p}/split_zr", np.array([hidden, hidden], np.int64))
        state = self.initial(d, inits[0], f"{p}/h0")
        if self.lbr:
            r_t = self.const(f"{p}/R_T", r.T.copy())
            rh_bias = self.const(f"{p}/bias_h", np.concatenate([np.zeros(h2, b.dtype), rb[h2:]]))
            split_h = split_x
        else:
            rzr_t = self.const(f"{p}/Rzr_T", r[:h2].T.copy())
            rh_t = self.const(f"{p}/Rh_T", r[h2:].T.copy())
        order = range(self.steps) if kind == "forward" else range(self.steps - 1, -1, -1)
        states: dict[int, gs.Tensor] = {}
        if self.steps == 0:
            raise ValueError("a GRU over 0 steps")
        for t in order:
            s = f"{p}/t{t}"
            xt = self.op(
                "Gather",
                f"{s}/x",
                [xw, self.const(f"{s}/index", np.array(t, np.int64))],
                {"axis": 0},
            )[0]
            x_zr, x_h = self.op("Split", f"{s}/x_split", [xt, split_x], {"axis": 1}, outputs=2)
            if self.lbr:
                hr = self.op("MatMul", f"{s}/hr", [state, r_t])[0]
                hr = self.op("Add", f"{s}/hr_bias", [hr, rh_bias])[0]
                h_zr, h_h = self.op("Split", f"{s}/h_split", [hr, split_h], {"axis": 1}, outputs=2)
            else:
                h_zr = self.op("MatMul", f"{s}/hr_zr", [state, rzr_t])[0]
            zr = self.gate(f"{s}/zr", self.op("Add", f"{s}/zr_in", [x_zr, h_zr])[0], "Sigmoid")
            z, reset = self.op("Split", f"{s}/zr_split", [zr, split_zr], {"axis": 1}, outputs=2)
            if self.lbr:
                rec = self.op("Mul", f"{s}/r_h", [reset, h_h])[0]
            else:
                gated = self.op("Mul", f"{s}/r_state", [reset, state])[0]
                rec = self.op("MatMul", f"{s}/hr_h", [gated, rh_t])[0]
            n = self.gate(f"{s}/n", self.op("Add", f"{s}/n_in", [x_h, rec])[0], "Tanh")
            diff = self.op("Sub", f"{s}/h_minus_n", [state, n])[0]
            keep = self.op("Mul", f"{s}/z_keep", [z, diff])[0]
            new_state = self.op("Add", f"{s}/h", [n, keep])[0]
            (state,), states[t] = self.masked(s, t, [new_state], [state])
        # Y_h is the last state computed: t = T-1 forward, t = 0 reverse.
        return [states[t] for t in range(self.steps)], self.finals(d, [state], inits[0] is not None)
