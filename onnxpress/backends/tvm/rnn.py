"""Recurrent ONNX ops (GRU, LSTM) on TVM as loops: what the two converters share.

TVM 0.27's Relax ONNX importer has no GRU or LSTM converter. onnxpress adds its own for the
duration of one import (``build.importer_overrides``): each direction becomes one Relax matmul
for the input projection of every step and one TIR kernel that keeps the recurrence as a loop
(gru.py, lstm.py). This module holds the common parts, below both converters: reading
constant (or weight-only int8, DequantizeLinear(constant)) weights, the layout=1 transposes,
per-direction initial states, and stacking the outputs as ONNX lays them out:
Y [T, D, B, H] (layout 1: [B, T, D, H]) and the last states [D, B, H] (layout 1: [B, D, H]).
The kernels' shared pieces are here too: fast sigmoid / tanh as TIR expressions, the block
sizes (``unit_block``, ``batch_block``) and R^T packed per block (``packed_recurrent``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

DEFAULT_ACTIVATIONS = {"GRU": ("sigmoid", "tanh"), "LSTM": ("sigmoid", "tanh", "tanh")}
LOOP_OPS = tuple(DEFAULT_ACTIVATIONS)


def loop_supported(node: onnx.NodeProto) -> str | None:
    """None when the loop converter takes this GRU/LSTM node, else the reason it does not."""
    defaults = DEFAULT_ACTIVATIONS[node.op_type]
    for attr in node.attribute:
        if attr.name == "activations":
            names = [s.decode().lower() for s in attr.strings]
            if names != list(defaults * (len(names) // len(defaults))):
                return f"activations {names}"
        if attr.name == "clip":
            return "clip"
        if attr.name == "input_forget" and attr.i:
            return "input_forget"
    return None


def attribute(attrs: dict[str, Any], name: str, default: Any) -> Any:
    value = attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def constant_input(bb: Any, expr: Any, what: str) -> np.ndarray:
    """The value of a constant input, or of DequantizeLinear(constant) (weight-only int8)."""
    from tvm import ir, relax

    bound = bb.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
    if isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.dequantize":
        data, scale, zero = (constant_input(bb, arg, what) for arg in bound.args)
        shape = [1] * data.ndim
        if scale.size > 1:
            shape[int(bound.attrs.axis) % data.ndim] = scale.size
        wide = data.astype(np.float64) - zero.reshape(shape if zero.size > 1 else ())
        return (wide * scale.reshape(shape if scale.size > 1 else ())).astype(np.float32)
    if not isinstance(expr, ir.expr.Constant):
        raise NotImplementedError(f"the loop form needs a constant {what}")
    return np.asarray(expr.value.numpy())


def weights(bb: Any, inputs: list[Any], gate_count: int) -> tuple[np.ndarray, ...]:
    """(W [D, G*H, I], R [D, G*H, H], B [D, 2*G*H] (zeros when absent)) as float arrays."""
    w, r = constant_input(bb, inputs[1], "W"), constant_input(bb, inputs[2], "R")
    bias = inputs[3] if len(inputs) > 3 else None
    if bias is None:
        return w, r, np.zeros((w.shape[0], 2 * w.shape[1]), np.float32)
    return w, r, constant_input(bb, bias, "B")


@dataclass
class Sequence:
    """The time-major input of a recurrent op and its sizes."""

    x: Any  # [T, B, I]
    steps: int
    batch: int
    layout: int
    reverse: list[bool]  # per direction


def sequence(bb: Any, inputs: list[Any], attrs: dict[str, Any], directions: int) -> Sequence:
    """Transpose a layout=1 input to time-major, check sequence_lens, list directions."""
    from tvm import relax

    layout = int(attribute(attrs, "layout", 0))
    x = inputs[0]
    if layout == 1:
        x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
    steps, batch = (int(d) for d in list(x.ty.shape)[:2])
    lengths = inputs[4] if len(inputs) > 4 else None
    if lengths is not None and np.any(constant_input(bb, lengths, "sequence_lens") != steps):
        raise NotImplementedError("the loop form needs sequence_lens equal to the length")
    direction = str(attribute(attrs, "direction", "forward"))
    reverse = [
        direction == "reverse" or (direction == "bidirectional" and d == 1)
        for d in range(directions)
    ]
    return Sequence(x, steps, batch, layout, reverse)


def projection(bb: Any, x: Any, weight: np.ndarray, bias: np.ndarray) -> Any:
    """x [T, B, I] @ weight[G, I]^T + bias[G] for all steps at once."""
    from tvm import relax

    product = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(weight.T))))
    return bb.emit(relax.op.add(product, relax.const(bias.astype(np.float32))))


def initial_state(bb: Any, state: Any, seq: Sequence, direction: int, hidden: int) -> Any:
    """[B, H] initial state of one direction (zeros when the input is absent)."""
    from tvm import relax

    if state is None:
        return relax.const(np.zeros((seq.batch, hidden), np.float32))
    if seq.layout == 1:
        state = bb.emit(relax.op.permute_dims(state, [1, 0, 2]))
    picked = relax.op.strided_slice(state, [0], [direction], [direction + 1])
    return bb.emit(relax.op.squeeze(picked, [0]))


def last_step(bb: Any, y: Any, seq: Sequence, direction: int) -> Any:
    """[1, B, H]: the state after the last step this direction took."""
    from tvm import relax

    end = 0 if seq.reverse[direction] else seq.steps - 1
    return bb.emit(relax.op.strided_slice(y, [0], [end], [end + 1]))


def outputs(bb: Any, ys: list[Any], states: list[list[Any]], seq: Sequence) -> Any:
    """relax.Tuple(Y, *final states) in ONNX's layout; ``states`` holds [1, B, H] per direction."""
    from tvm import relax

    y_all = bb.emit(relax.op.stack(ys, axis=1))  # [T, D, B, H]
    finals = [bb.emit(relax.op.concat(per_direction, axis=0)) for per_direction in states]
    if seq.layout == 1:
        y_all = bb.emit(relax.op.permute_dims(y_all, [2, 0, 1, 3]))
        finals = [bb.emit(relax.op.permute_dims(f, [1, 0, 2])) for f in finals]
    return relax.Tuple([y_all, *finals])


# Fast activations for the recurrence kernels (TIR expressions): T.sigmoid / T.tanh lower to
# one libm ``expf`` call per element on x86, which kept the loops scalar. These are TOPI's
# fast_exp polynomial (range reduction to 2^n e^r, |rel err| ~1e-7 on [-88, 88]), written
# as PrimExprs so LLVM vectorizes them with the rest of the step.
EXP_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
EXP_LIMIT = 88.3762626647949
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453


def fast_exp(x: Any) -> Any:
    """exp(x) as a float32 PrimExpr (TOPI's fast_exp)."""
    from tvm import tirx

    def f32(value: float) -> Any:
        return tirx.const(value, "float32")

    x = tirx.max(tirx.min(x, f32(EXP_LIMIT)), f32(-EXP_LIMIT))
    n = tirx.floor(x * f32(LOG2E) + f32(0.5))
    r = x - n * f32(LN2)
    poly = f32(EXP_POLY[0])
    for coefficient in EXP_POLY[1:]:
        poly = poly * r + f32(coefficient)
    poly = poly * r * r + r + f32(1.0)
    exponent = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), 23)
    return poly * tirx.reinterpret("float32", exponent)


def fast_sigmoid(x: Any) -> Any:
    from tvm import tirx

    one = tirx.const(1.0, "float32")
    return one / (one + fast_exp(-x))


def fast_tanh(x: Any) -> Any:
    """tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7)."""
    from tvm import tirx

    two = tirx.const(2.0, "float32")
    return two * fast_sigmoid(two * x) - tirx.const(1.0, "float32")


def unit_block(hidden: int) -> int:
    """Hidden units per vector block of a recurrence kernel: 16 lanes (AVX-512; two AVX2
    registers) when they divide the hidden size, else the largest smaller divisor."""
    return next(width for width in (16, 8, 4, 2, 1) if hidden % width == 0)


def batch_block(batch: int) -> int:
    """Batch rows per register tile: the largest divisor of the batch up to 4."""
    return next(rows for rows in (4, 3, 2, 1) if batch % rows == 0)


def packed_recurrent(r: np.ndarray, gate_count: int) -> np.ndarray:
    """R [G*H, H] as the recurrence kernels read it: [H/U, H, G, U], block b holding R^T's
    columns g*H + b*U .. + U for every k. A thread's share of the weights is then one
    contiguous run that stays in its core's cache across steps (R^T read by rows at a
    4 KB stride mapped a 256-unit LSTM's blocks onto a sixteenth of the cache sets)."""
    hidden = r.shape[1]
    width = unit_block(hidden)
    rt = np.asarray(r, np.float32).T.reshape(hidden, gate_count, hidden // width, width)
    return np.ascontiguousarray(rt.transpose(2, 0, 1, 3))


def gate_sums(hidden: int, rows: int, gates: int, width: int) -> Any:
    """TIR macro ``accumulate(acc, rt, state, now, block, tile)``: add h R^T to a block's
    gate tile, ``acc[r, g, u] += sum_k rt[block, k, g, u] * state[now, tile * rows + r, k]``
    in k order (rows x gates vectors of ``width`` lanes kept in registers)."""
    from tvm.script import tirx as T

    @T.macro
    def accumulate(acc: Any, rt: Any, state: Any, now: Any, block: Any, tile: Any) -> None:
        for k in range(hidden):
            for r in T.unroll(rows):
                for g in T.unroll(gates):
                    for u in T.vectorized(width):
                        acc[r, g, u] = (
                            acc[r, g, u] + rt[block, k, g, u] * state[now, tile * rows + r, k]
                        )

    return accumulate
