# mypy: disable-error-code="valid-type, name-defined"
"""The ONNX GRU op on TVM as a loop: one TIR kernel keeps the recurrence, instead of T unrolled
steps (passes/gru/lower.py), so compile time does not grow with the sequence length.

  GRU(X, W, R, B, sequence_lens, initial_h)      per direction d (gates z, r, h):
    XW    = X W_d^T + Wb_d (+ Rb_d for z, r; + Rb_h too when linear_before_reset=0)   Relax matmul
    Y_d   = call_tir(recurrence, XW, R_d^T, Rb_h, h0_d)                               TIR kernel
            for t in steps (descending for reverse):
              zr = sigmoid(XW[t, :, :2H] + h R_zr^T)
              n  = tanh(XW[t, :, 2H:] + r * (h R_h^T + Rb_h))     linear_before_reset=1
              n  = tanh(XW[t, :, 2H:] + (r * h) R_h^T)            linear_before_reset=0
              h  = (1 - z) * n + z * h ;  Y_d[t] = h
    Y = stack_d(Y_d) [T, D, B, H] (layout 1: [B, T, D, H]);  Y_h = last state of each direction.

The kernel is written for the static sizes; the gate sweep runs over R^T so that its inner
loop is a contiguous, vectorizable axpy. onnxpress.backends.tvm.rnn registers the converter with
TVM's importer and holds what GRU and LSTM share.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpress.backends.tvm.rnn import (
    attribute,
    initial_state,
    last_step,
    outputs,
    projection,
    sequence,
    weights,
)


def recurrence_kernel(steps: int, batch: int, hidden: int, lbr: bool, reverse: bool) -> Any:
    """The PrimFunc (xw[T,B,3H], rt[H,3H], rbh[H], h0[B,H]) -> y[T,B,H]."""
    from tvm.script import tirx as T

    h3, h2 = 3 * hidden, 2 * hidden
    sweep = h3 if lbr else h2

    @T.prim_func
    def gru_recurrence(
        xw: T.Buffer((steps, batch, h3), "float32"),
        rt: T.Buffer((hidden, h3), "float32"),
        rbh: T.Buffer((hidden,), "float32"),
        h0: T.Buffer((batch, hidden), "float32"),
        y: T.Buffer((steps, batch, hidden), "float32"),
    ) -> None:
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        state = T.alloc_buffer((hidden,), "float32")
        gates = T.alloc_buffer((h3,), "float32")
        reset_state = T.alloc_buffer((hidden,), "float32")
        for b in range(batch):
            for j in range(hidden):
                state[j] = h0[b, j]
            for step in range(steps):
                t = (steps - 1 - step) if reverse else step
                for j in range(h2):
                    gates[j] = xw[t, b, j]
                for j in range(hidden):
                    gates[h2 + j] = rbh[j]
                for k in range(hidden):
                    for j in range(sweep):
                        gates[j] = gates[j] + rt[k, j] * state[k]
                for j in range(h2):
                    gates[j] = T.sigmoid(gates[j])
                if not lbr:
                    for k in range(hidden):
                        reset_state[k] = gates[hidden + k] * state[k]
                    for k in range(hidden):
                        for j in range(hidden):
                            gates[h2 + j] = gates[h2 + j] + rt[k, h2 + j] * reset_state[k]
                for j in range(hidden):
                    candidate = T.tanh(
                        xw[t, b, h2 + j] + gates[h2 + j] * gates[hidden + j]
                        if lbr
                        else xw[t, b, h2 + j] + gates[h2 + j]
                    )
                    state[j] = (T.float32(1) - gates[j]) * candidate + gates[j] * state[j]
                    y[t, b, j] = state[j]

    return gru_recurrence.without_attr("global_symbol")


def convert_gru(bb: Any, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    """Relax for one ONNX GRU node (inputs as the importer passes them)."""
    from tvm import relax

    lbr = bool(int(attribute(attrs, "linear_before_reset", 0)))
    w_np, r_np, b_np = weights(bb, inputs, 3)
    directions, gates, _ = w_np.shape
    hidden = gates // 3
    seq = sequence(bb, inputs, attrs, directions)
    initial_h = inputs[5] if len(inputs) > 5 else None
    ys, last = [], []
    for d in range(directions):
        wb, rb = b_np[d, :gates], b_np[d, gates:]
        x_bias = wb + np.concatenate([rb[: 2 * hidden], rb[2 * hidden :] * (0 if lbr else 1)])
        xw = projection(bb, seq.x, w_np[d], x_bias)
        h0 = initial_state(bb, initial_h, seq, d, hidden)
        kernel = recurrence_kernel(seq.steps, seq.batch, hidden, lbr, seq.reverse[d])
        gvar = bb.add_func(kernel, "onnxpress_gru_recurrence")
        rbh = rb[2 * hidden :] if lbr else np.zeros(hidden, np.float32)
        recurrent = relax.const(np.ascontiguousarray(r_np[d].T))
        y = bb.emit(
            relax.call_tir(
                gvar,
                [xw, recurrent, relax.const(rbh.astype(np.float32)), h0],
                relax.TensorType((seq.steps, seq.batch, hidden), "float32"),
            )
        )
        ys.append(y)
        last.append(last_step(bb, y, seq, d))
    return outputs(bb, ys, [last], seq)
