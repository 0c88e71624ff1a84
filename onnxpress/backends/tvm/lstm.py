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

Each step runs in parallel over blocks of hidden units (R^T packed per block,
rnn.packed_recurrent; sigmoid / tanh as vectorizable polynomials, rnn.fast_exp): at hidden
256, T=50, 0.8x onnxruntime's time at batch 1 and 1.0x at batch 8 (was 2.0x and 5.2x).
Default activations only (Sigmoid, Tanh, Tanh); ``clip`` and ``input_forget`` are refused
by the coverage check (rnn.loop_supported). Peepholes (P) are optional.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpress.backends.tvm.rnn import (
    attribute,
    batch_block,
    constant_input,
    fast_sigmoid,
    fast_tanh,
    gate_sums,
    initial_state,
    last_step,
    outputs,
    packed_recurrent,
    projection,
    sequence,
    unit_block,
    weights,
)


def recurrence_kernel(steps: int, batch: int, hidden: int, reverse: bool) -> Any:
    """PrimFunc (xw[T,B,4H], rt[H/U,H,4,U], peep[3H], h0[B,H], c0[B,H]) -> (y[T,B,H],
    cell[B,H]); ``rt`` is R^T packed by ``packed_recurrent`` (each block's weights in one
    contiguous run).

    Each step runs in parallel over blocks of U hidden units (``unit_block``): a block keeps
    the four gates of its units for a tile of batch rows in registers (4 x rows vectors),
    sums ``h R^T`` over k in order (weights read once per step for the whole tile), and
    updates its units' cell and state in place; the state is double-buffered, so blocks
    never read a state another block has already advanced."""
    from tvm.script import tirx as T

    h4 = 4 * hidden
    width, rows = unit_block(hidden), batch_block(batch)
    blocks, tiles = hidden // width, batch // rows
    accumulate = gate_sums(hidden, rows, 4, width)

    @T.prim_func
    def lstm_recurrence(
        xw: T.Buffer((steps, batch, h4), "float32"),
        rt: T.Buffer((blocks, hidden, 4, width), "float32"),
        peep: T.Buffer((3 * hidden,), "float32"),
        h0: T.Buffer((batch, hidden), "float32"),
        c0: T.Buffer((batch, hidden), "float32"),
        y: T.Buffer((steps, batch, hidden), "float32"),
        cell_out: T.Buffer((batch, hidden), "float32"),
    ) -> None:
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        state = T.alloc_buffer((2, batch, hidden), "float32")
        cell = T.alloc_buffer((batch, hidden), "float32")
        for b, j in T.grid(batch, hidden):
            state[0, b, j] = h0[b, j]
            cell[b, j] = c0[b, j]
        for step in range(steps):
            t = (steps - 1 - step) if reverse else step
            now = step % 2
            for block in T.parallel(blocks):
                acc = T.decl_buffer((rows, 4, width), "float32")
                gate = T.decl_buffer((2, width), "float32")
                for tile in range(tiles):
                    for r, g in T.grid(rows, 4):
                        for u in T.vectorized(width):
                            acc[r, g, u] = xw[t, tile * rows + r, g * hidden + block * width + u]
                    accumulate(acc, rt, state, now, block, tile)
                    for r in range(rows):
                        # no Let bindings here: TVM's vectorizer turns a float Let into lane 0
                        for u in T.vectorized(width):
                            gate[0, u] = fast_sigmoid(
                                acc[r, 0, u]
                                + peep[block * width + u] * cell[tile * rows + r, block * width + u]
                            )
                            gate[1, u] = fast_sigmoid(
                                acc[r, 2, u]
                                + peep[2 * hidden + block * width + u]
                                * cell[tile * rows + r, block * width + u]
                            )
                            cell[tile * rows + r, block * width + u] = gate[1, u] * cell[
                                tile * rows + r, block * width + u
                            ] + gate[0, u] * fast_tanh(acc[r, 3, u])
                            state[1 - now, tile * rows + r, block * width + u] = fast_sigmoid(
                                acc[r, 1, u]
                                + peep[hidden + block * width + u]
                                * cell[tile * rows + r, block * width + u]
                            ) * fast_tanh(cell[tile * rows + r, block * width + u])
                            y[t, tile * rows + r, block * width + u] = state[
                                1 - now, tile * rows + r, block * width + u
                            ]
        for b, j in T.grid(batch, hidden):
            cell_out[b, j] = cell[b, j]

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
                    relax.const(packed_recurrent(r_np[d], 4)),
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
