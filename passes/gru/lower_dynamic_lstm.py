"""lower-dynamic-lstm: com.microsoft DynamicQuantizeLSTM -> per-step ONNX ops that quantize
as onnxruntime's kernel does.

``quantize_dynamic`` writes an LSTM as DynamicQuantizeLSTM(X, W[D,I,4H], R[D,H,4H], B,
sequence_lens, initial_h, initial_c, P, W_scale, W_zero_point, R_scale, R_zero_point), W and
R int8 (or uint8), their scales per direction or per gate column. onnxruntime's CPU kernel,
reproduced to 9e-8 by the form below (and 3e-3 away from the float LSTM of the dequantized
weights, so that form would not do):
  Xq, sx, zx = DynamicQuantizeLinear(X)             once, over every step and row
  XW = ((Xq - zx) (W - zw)) * (sx sw) + Wb + Rb      [T, B, 4H]
  for t in steps:
    each row of H quantized alone: s = (max(h, 0) - min(h, 0)) / 255,
    z = round(-min(h, 0) / s), Hq = clip(round(H / s) + z, 0, 255)
    gates = XW[t] + ((Hq - z) (R - zr)) * (s sr), then the LSTM cell (lower-lstm's).
The integer products run as float MatMuls of the centred integers, exact while a dot
product stays under 2^24 in magnitude (a 255 x 128 product summed over up to 513 inputs at
worst). Declared lossy, judged at max-rel ``DEFAULT_BUDGET``: where H lies within a rounding
of a quantization tie, another order of the same float operations (onnxruntime's kernel
against its Sigmoid/Tanh/MatMul ops) can round it to the neighbouring level. On AVX2
without VNNI, onnxruntime's kernel sums u8 x s8 pairs in int16, which 8-bit weights
saturate (255 * 127 * 2 > 32767: 0.23 max-rel on random inputs there); the lowering keeps
the exact sums, as onnxruntime computes them on VNNI, ARM and in its exact-kernel mode, so on
such a CPU it is judged against that mode (``exact_int8``). Refused as lower-lstm refuses,
and where a scale or zero point is not a constant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.gru.lower import LowerGruOptions, lower_ops
from onnxpress.passes.gru.lower_lstm import LSTM_ACTIVATIONS, LstmLowering, lstm_refusal

from onnxpress.core.context import PassContext, TensorShapes
from onnxpress.core.ir import constant_value
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

OP, DOMAIN = "DynamicQuantizeLSTM", "com.microsoft"
QUANTIZATION_INPUTS = range(8, 12)  # W_scale, W_zero_point, R_scale, R_zero_point
LEVELS = 255.0  # uint8 activations


@dataclass(frozen=True)
class LowerDynamicLstmOptions(LowerGruOptions):
    pass


def _refusal(node: gs.Node) -> str:
    reason = lstm_refusal(node)
    if reason:
        return reason
    for index in QUANTIZATION_INPUTS:
        if len(node.inputs) <= index or constant_value(node.inputs[index]) is None:
            return f"input {index} (a weight scale or zero point) is not a constant"
    return ""


def _per_direction(value: np.ndarray, d: int) -> np.ndarray:
    """Direction d's scale or zero point: a scalar, or one per gate column."""
    value = np.asarray(value)
    return value.reshape(-1)[d] if value.ndim <= 1 else value[d]


class DynamicLstmLowering(LstmLowering):
    """lower-lstm's cells, with the projections quantized as onnxruntime's kernel does."""

    def __init__(self, graph: gs.Graph, node: gs.Node, shapes: TensorShapes) -> None:
        super().__init__(graph, node, shapes)
        bias = constant_value(node.inputs[3]) if len(node.inputs) > 3 else None
        self.dtype = np.dtype(np.float32) if bias is None else np.asarray(bias).dtype
        self.quantized_x: tuple[gs.Tensor, gs.Tensor] | None = None
        # ReduceMin/Max take their axes as an input from opset 18
        self.opset = int(graph.opset or 13)
        self.shared: dict[str, gs.Constant] = {}  # the steps' scalar constants, made once

    def _params(self, d: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        scale, zero = (np.asarray(constant_value(self.node.inputs[offset + k])) for k in (0, 1))
        return _per_direction(scale, d).astype(np.float32), _per_direction(zero, d)

    def _centred(self, base: str, weights: np.ndarray, zero: np.ndarray) -> gs.Constant:
        values = weights.astype(np.float64) - np.asarray(zero, np.float64)
        return self.const(base, values.astype(self.dtype))

    def _x_quantized(self, x: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor]:
        """(Xq - zx as floats, sx): X quantized once, shared by both directions."""
        if self.quantized_x is None:
            xq, sx, zx = self.op("DynamicQuantizeLinear", "x_quantize", [x], outputs=3)
            values = self.op("Cast", "x_levels", [xq], {"to": 1})[0]
            zero = self.op("Cast", "x_zero", [zx], {"to": 1})[0]
            self.quantized_x = (self.op("Sub", "x_centred", [values, zero])[0], sx)
        return self.quantized_x

    def projection(self, d: int, x: gs.Tensor, w: np.ndarray, b: np.ndarray) -> gs.Variable:
        p, hidden = f"d{d}", self.hidden
        centred, sx = self._x_quantized(x)
        scale, zero = self._params(d, 8)
        sums = self.op("MatMul", f"{p}/xw_int", [centred, self._centred(f"{p}/W", w, zero)])[0]
        step = self.op("Mul", f"{p}/xw_scale", [sx, self.const(f"{p}/W_scale", scale)])[0]
        xw = self.op("Mul", f"{p}/xw", [sums, step])[0]
        bias = self.const(f"{p}/bias", (b[: 4 * hidden] + b[4 * hidden :]).astype(self.dtype))
        return self.op("Add", f"{p}/xw_bias", [xw, bias])[0]

    def recurrence(self, d: int, r: np.ndarray) -> Callable[[str, gs.Tensor], gs.Variable]:
        scale, zero = self._params(d, 10)
        weights = self._centred(f"d{d}/R", r, zero)
        r_scale = self.const(f"d{d}/R_scale", scale)
        return lambda s, h: self._step_product(s, h, weights, r_scale)

    def _scalar(self, base: str, value: float) -> gs.Constant:
        if base not in self.shared:
            self.shared[base] = self.const(base, np.array(value, self.dtype))
        return self.shared[base]

    def _reduce(self, op: str, base: str, h: gs.Tensor) -> gs.Variable:
        if self.opset >= 18:
            axes = self.const(f"{base}/axes", np.array([1], np.int64))
            return self.op(op, base, [h, axes], {"keepdims": 1})[0]
        return self.op(op, base, [h], {"axes": [1], "keepdims": 1})[0]

    def _step_product(
        self, s: str, h: gs.Tensor, weights: gs.Constant, r_scale: gs.Constant
    ) -> gs.Variable:
        """((Hq - z) (R - zr)) * (s sr), H quantized row by row."""
        zero, top = self._scalar("zero_level", 0.0), self._scalar("top_level", LEVELS)
        # min(h, 0) and max(h, 0) as Clip: elementwise, fused with the scale's arithmetic
        lowest = self._reduce("ReduceMin", f"{s}/h_min", h)
        low = self.op("Clip", f"{s}/h_low", [lowest, gs.Variable.empty(), zero])[0]
        highest = self._reduce("ReduceMax", f"{s}/h_max", h)
        high = self.op("Clip", f"{s}/h_high", [highest, zero])[0]
        span = self.op("Sub", f"{s}/h_span", [high, low])[0]
        scale = self.op("Div", f"{s}/h_scale_raw", [span, top])[0]
        tiny = self._scalar("tiny_scale", float(np.finfo(np.float32).tiny))
        scale = self.op("Clip", f"{s}/h_scale", [scale, tiny])[0]  # a row of zeros: any scale
        negative = self.op("Neg", f"{s}/h_neg_low", [low])[0]
        zp = self.op(
            "Round", f"{s}/h_zero_raw", [self.op("Div", f"{s}/h_zr", [negative, scale])[0]]
        )
        zp = self.op("Clip", f"{s}/h_zero", [zp[0], zero, top])
        ratio = self.op("Div", f"{s}/h_ratio", [h, scale])[0]
        shifted = self.op(
            "Add", f"{s}/h_shift", [self.op("Round", f"{s}/h_round", [ratio])[0], zp[0]]
        )
        levels_h = self.op("Clip", f"{s}/h_levels", [shifted[0], zero, top])[0]
        centred = self.op("Sub", f"{s}/h_centred", [levels_h, zp[0]])[0]
        sums = self.op("MatMul", f"{s}/hr_int", [centred, weights])[0]
        step = self.op("Mul", f"{s}/hr_scale", [scale, r_scale])[0]
        return self.op("Mul", f"{s}/hr", [sums, step])[0]


@register_pass("lower-dynamic-lstm")
class LowerDynamicLstm(Pass[LowerDynamicLstmOptions]):
    """Unroll com.microsoft DynamicQuantizeLSTM ops into per-step cells quantized as
    onnxruntime's kernel quantizes them."""

    options_type = LowerDynamicLstmOptions
    lossless = False
    metric = "max-rel"
    default_budget = 1e-3
    exact_int8 = True  # onnxruntime's u8 x s8 pair sums saturate on AVX2 (module docstring)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Rounds of lowering until none is left or none more lowers: a stacked LSTM's
        second layer has a static input shape only once the first is lowered (shape
        inference does not know the contrib op)."""
        total = PassResult()
        while True:
            result = lower_ops(
                graph,
                ctx,
                self.options,
                OP,
                DynamicLstmLowering,
                LSTM_ACTIVATIONS,
                _refusal,
                (DOMAIN,),
            )
            for key, amount in result.counts.items():
                total.count(key, amount)
            total.details.extend(result.details)
            if not result.changed or not result.refusals:
                total.refusals = result.refusals
                return total
            interface = {id(t) for t in [*graph.inputs, *graph.outputs]}
            for tensor in graph.tensors().values():  # shapes recorded before the lowering
                if isinstance(tensor, gs.Variable) and id(tensor) not in interface:
                    tensor.shape = None
            ctx.invalidate()
