"""lower-lstm: the ONNX LSTM op -> per-step primitive ops, symmetric to lower-gru.

For each direction d (forward, reverse, or both), with gates in ONNX order i, o, f, c:
  XW = MatMul(X[T,B,I], W_d^T) + Wb + Rb            one projection for all steps
  for t in steps (reversed for the reverse direction):
    i, o, f, g = Split(XW[t] + H R_d^T)
    i = Sigmoid(i + Pi*C),  f = Sigmoid(f + Pf*C)      (peepholes when P is given)
    C = f*C + i*Tanh(g),   o = Sigmoid(o + Po*C),  H = o*Tanh(C)
  Y = stack of the step states [T, D, B, H] (layout 1: [B, T, D, H]); Y_h, Y_c = last H, C.

Why: targets that want loops, or kernels tuned per step; ``fuse-lstm`` is the inverse.
sequence_lens masks the steps as in lower-gru (h and c kept past the length, Y zero).
Refused, with a reason, as lower-gru refuses (unknown sizes, other activations,
opset < 13), and also: clip,
input_forget=1, and peepholes that are not a constant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.gru.lower import LowerGruOptions, Lowering, lower_ops

from onnxpress.core.context import PassContext
from onnxpress.core.ir import constant_value
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

logger = logging.getLogger(__name__)

LSTM_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")


@dataclass(frozen=True)
class LowerLstmOptions(LowerGruOptions):
    pass


def lstm_refusal(node: gs.Node) -> str:
    if node.attrs.get("clip") is not None:
        return "clip is not lowered"
    if int(node.attrs.get("input_forget", 0)):
        return "input_forget=1 is not lowered"
    if len(node.inputs) > 7 and node.inputs[7].name and constant_value(node.inputs[7]) is None:
        return "P is not a constant"
    return ""


class LstmLowering(Lowering):
    """Emits the unrolled cells of one LSTM node."""

    gates = 4
    state_inputs = (5, 6)

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
        hidden, p = self.hidden, f"d{d}"
        node = self.node
        peepholes = (
            np.asarray(constant_value(node.inputs[7]))[d]
            if len(node.inputs) > 7 and node.inputs[7].name
            else None
        )
        xw = self.projection(d, x, w, b)
        recurrent = self.recurrence(d, r)
        split = self.const(f"{p}/split", np.array([hidden] * 4, np.int64))
        peep = (
            [self.const(f"{p}/P{k}", peepholes[k * hidden : (k + 1) * hidden]) for k in range(3)]
            if peepholes is not None
            else None
        )
        h = self.initial(d, inits[0], f"{p}/h0")
        c = self.initial(d, inits[1], f"{p}/c0")
        order = range(self.steps) if kind == "forward" else range(self.steps - 1, -1, -1)
        states: dict[int, gs.Tensor] = {}
        for t in order:
            s = f"{p}/t{t}"
            index = self.const(f"{s}/index", np.array(t, np.int64))
            xt = self.op("Gather", f"{s}/x", [xw, index], {"axis": 0})[0]
            hr = recurrent(s, h)
            pre = self.op("Add", f"{s}/gates", [xt, hr])[0]
            i, o, f, g = self.op("Split", f"{s}/split", [pre, split], {"axis": 1}, outputs=4)
            if peep is not None:
                i = self.op("Add", f"{s}/i_peep", [i, self.op("Mul", f"{s}/pi", [peep[0], c])[0]])[
                    0
                ]
                f = self.op("Add", f"{s}/f_peep", [f, self.op("Mul", f"{s}/pf", [peep[2], c])[0]])[
                    0
                ]
            i, f = self.gate(f"{s}/i", i, "Sigmoid"), self.gate(f"{s}/f", f, "Sigmoid")
            g = self.gate(f"{s}/g", g, "Tanh")
            c_old = c
            kept = self.op("Mul", f"{s}/f_c", [f, c])[0]
            c = self.op("Add", f"{s}/c", [kept, self.op("Mul", f"{s}/i_g", [i, g])[0]])[0]
            if peep is not None:
                o = self.op("Add", f"{s}/o_peep", [o, self.op("Mul", f"{s}/po", [peep[1], c])[0]])[
                    0
                ]
            o = self.gate(f"{s}/o", o, "Sigmoid")
            h_new = self.op("Mul", f"{s}/h", [o, self.op("Tanh", f"{s}/c_tanh", [c])[0]])[0]
            (h, c), states[t] = self.masked(s, t, [h_new, c], [h, c_old])
        given = inits[0] is not None or inits[1] is not None
        return [states[t] for t in range(self.steps)], self.finals(d, [h, c], given)

    def projection(self, d: int, x: gs.Tensor, w: np.ndarray, b: np.ndarray) -> gs.Variable:
        """X W^T + Wb + Rb for every step at once: [T, B, 4H]."""
        p, hidden = f"d{d}", self.hidden
        xw = self.op("MatMul", f"{p}/xw", [x, self.const(f"{p}/W_T", w.T.copy())])[0]
        bias = self.const(f"{p}/bias", b[: 4 * hidden] + b[4 * hidden :])
        return self.op("Add", f"{p}/xw_bias", [xw, bias])[0]

    def recurrence(self, d: int, r: np.ndarray) -> Callable[[str, gs.Tensor], gs.Variable]:
        """The step's H R^T, as a function of the step's name and H."""
        r_t = self.const(f"d{d}/R_T", r.T.copy())
        return lambda s, h: self.op("MatMul", f"{s}/hr", [h, r_t])[0]


@register_pass("lower-lstm")
class LowerLstm(Pass[LowerLstmOptions]):
    """Unroll ONNX LSTM ops into per-step MatMul/Sigmoid/Tanh cells."""

    options_type = LowerLstmOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return lower_ops(
            graph, ctx, self.options, "LSTM", LstmLowering, LSTM_ACTIVATIONS, lstm_refusal
        )
