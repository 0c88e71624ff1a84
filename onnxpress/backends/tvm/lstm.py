# mypy: disable-error-code="valid-type, name-defined"
"""The ONNX LSTM op on TVM as a loop: one TIR kernel per direction keeps the recurrence.

  LSTM(X, W, R, B, sequence_lens, initial_h, initial_c, P)   per direction d (gates i, o, f, c):
    XW  = X W_d^T + Wb_d + Rb_d                                 Relax matmul, all steps at once
    Y_d, C_d = call_tir(recurrence, XW, R_d^T, P_d, h0_d, c0_d) TIR kernel:
        for t in steps (descending for reverse):
          g  = XW[t] + h R^T
          i  = sigmoid(g_i + P_i * c)       f = sigmoid(g_f + P_f * c)
          c  = f * c + i * tanh(g_c)
          o  = sigmoid(g_o + P_o * c)       h = o * tanh(c);   Y_d[t] = h
    Y = stack_d(Y_d), Y_h = last states, Y_c = final cells (ONNX layouts, see rnn.py).

Default activations only (Sigmoid, Tanh, Tanh); ``clip`` and ``input_forget`` are refused
by the coverage check (rnn.loop_supported). Peepholes (P) are optional.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpress.backends.tvm.rnn import (
    attribute,
    constant_input,
    initial_state,
    last_step,
    outputs,
    projection,
    sequence,
    weights,
)


def recurrence_kernel(steps: int, batch: int, hidden: int, reverse: bool) -> Any:
    """PrimFunc (xw[T,B,4H], rt[H,4H], peep[3H], h0[B,H], c0[B,H]) -> (y[T,B,H], cell[B,H])."""
    from tvm.script import tirx as T

    h4 = 4 * hidden

    @T.prim_func
    def lstm_recurrence(
        xw: T.Buffer((steps, batch, h4), "float32"),
        rt: T.Buffer((hidden, h4), "float32"),
        peep: T.Buffer((3 * hidden,), "float32"),
        h0: T.Buffer((batch, hidden), "float32"),
        c0: T.Buffer((batch, hidden), "float32"),
        y: T.Buffer((steps, batch, hidden), "float32"),
        cell_out: T.Buffer((batch, hidden), "float32"),
    ) -> None:
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        state = T.alloc_buffer((hidden,), "float32")
        cell = T.alloc_buffer((hidden,), "float32")
        gates = T.alloc_buffer((h4,), "float32")
        for b in range(batch):
            for j in range(hidden):
                state[j] = h0[b, j]
                cell[j] = c0[b, j]
            for step in range(steps):
                t = (steps - 1 - step) if reverse else step
                for j in range(h4):
                    gates[j] = xw[t, b, j]
                for k in range(hidden):
                    for j in range(h4):
                        gates[j] = gates[j] + rt[k, j] * state[k]
                for j in range(hidden):
                    input_gate = T.sigmoid(gates[j] + peep[j] * cell[j])
                    forget_gate = T.sigmoid(gates[2 * hidden + j] + peep[2 * hidden + j] * cell[j])
                    cell[j] = forget_gate * cell[j] + input_gate * T.tanh(gates[3 * hidden + j])
                    output_gate = T.sigmoid(gates[hidden + j] + peep[hidden + j] * cell[j])
                    state[j] = output_gate * T.tanh(cell[j])
                    y[t, b, j] = state[j]
            for j in range(hidden):
                cell_out[b, j] = cell[j]

    return lstm_recurrence.without_attr("global_symbol")


def convert_lstm(bb: Any, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    """Relax for one ONNX LSTM node (inputs as the importer passes them)."""
    from tvm import relax

    if int(attribute(attrs, "input_forget", 0)):
        raise NotImplementedError("LSTM loop form: input_forget=1")
    w_np, r_np, b_np = weights(bb, inputs, 4)
    directions, gates, _ = w_np.shape
    hidden = gates // 4
    peepholes = inputs[7] if len(inputs) > 7 else None
    p_np = (
        constant_input(bb, peepholes, "P")
        if peepholes is not None
        else np.zeros((directions, 3 * hidden), np.float32)
    )
    seq = sequence(bb, inputs, attrs, directions)
    initial_h = inputs[5] if len(inputs) > 5 else None
    initial_c = inputs[6] if len(inputs) > 6 else None
    ys, last, cells = [], [], []
    for d in range(directions):
        xw = projection(bb, seq.x, w_np[d], b_np[d, :gates] + b_np[d, gates:])
        kernel = recurrence_kernel(seq.steps, seq.batch, hidden, seq.reverse[d])
        gvar = bb.add_func(kernel, "onnxpress_lstm_recurrence")
        result = bb.emit(
            relax.call_tir(
                gvar,
                [
                    xw,
                    relax.const(np.ascontiguousarray(r_np[d].T)),
                    relax.const(p_np[d].astype(np.float32)),
                    initial_state(bb, initial_h, seq, d, hidden),
                    initial_state(bb, initial_c, seq, d, hidden),
                ],
                [
                    relax.TensorType((seq.steps, seq.batch, hidden), "float32"),
                    relax.TensorType((seq.batch, hidden), "float32"),
                ],
            )
        )
        y = bb.emit(relax.TupleGetItem(result, 0))
        cell = bb.emit(relax.TupleGetItem(result, 1))
        ys.append(y)
        last.append(last_step(bb, y, seq, d))
        cells.append(bb.emit(relax.op.expand_dims(cell, [0])))
    return outputs(bb, ys, [last, cells], seq)
