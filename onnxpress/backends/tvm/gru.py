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

The kernel is written for the static sizes: each step runs in parallel over blocks of hidden
units with the block's gates for a tile of batch rows in vector registers, R^T packed per
block (rnn.packed_recurrent), sigmoid / tanh as vectorizable polynomials (rnn.fast_exp). onnxpress.backends.tvm.rnn registers the converter with
TVM's importer and holds what GRU and LSTM share.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpress.backends.tvm.rnn import (
    attribute,
    batch_block,
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


def recurrence_kernel(steps: int, batch: int, hidden: int, lbr: bool, reverse: bool) -> Any:
    """The PrimFunc (xw[T,B,3H], rt[H/U,H,3,U], rbh[H], h0[B,H]) -> y[T,B,H]; ``rt`` is R^T
    packed by ``packed_recurrent``. Like the LSTM kernel (lstm.py): each step in parallel
    over blocks of U units, a tile of batch rows of the block's gates in registers, the
    state double-buffered. With linear_before_reset=0 the candidate needs r * h of every
    unit, so a step runs two parallel sweeps (z and r, then the candidate); with 1, one."""
    from tvm.script import tirx as T

    h3, h2 = 3 * hidden, 2 * hidden
    width, rows = unit_block(hidden), batch_block(batch)
    blocks, tiles = hidden // width, batch // rows
    sweep = 3 if lbr else 2
    accumulate = gate_sums(hidden, rows, sweep, width)

    @T.prim_func
    def gru_recurrence(
        xw: T.Buffer((steps, batch, h3), "float32"),
        rt: T.Buffer((blocks, hidden, 3, width), "float32"),
        rbh: T.Buffer((hidden,), "float32"),
        h0: T.Buffer((batch, hidden), "float32"),
        y: T.Buffer((steps, batch, hidden), "float32"),
    ) -> None:
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        state = T.alloc_buffer((2, batch, hidden), "float32")
        update = T.alloc_buffer((batch, hidden), "float32")
        reset_state = T.alloc_buffer((batch, hidden), "float32")
        for b, j in T.grid(batch, hidden):
            state[0, b, j] = h0[b, j]
        for step in range(steps):
            t = (steps - 1 - step) if reverse else step
            now = step % 2
            for block in T.parallel(blocks):
                acc = T.decl_buffer((rows, 3, width), "float32")
                for tile in range(tiles):
                    for r, g in T.grid(rows, sweep):
                        for u in T.vectorized(width):
                            acc[r, g, u] = (
                                xw[t, tile * rows + r, g * hidden + block * width + u]
                                if g < 2
                                else rbh[block * width + u]
                            )
                    accumulate(acc, rt, state, now, block, tile)
                    for r in range(rows):
                        # no Let bindings: TVM's vectorizer turns a float Let into lane 0
                        for u in T.vectorized(width):
                            update[tile * rows + r, block * width + u] = fast_sigmoid(acc[r, 0, u])
                            reset_state[tile * rows + r, block * width + u] = fast_sigmoid(
                                acc[r, 1, u]
                            ) * (
                                acc[r, 2, u]
                                if lbr
                                else state[now, tile * rows + r, block * width + u]
                            )
                            if lbr:  # the candidate needs only this block's units
                                state[1 - now, tile * rows + r, block * width + u] = (
                                    T.float32(1) - update[tile * rows + r, block * width + u]
                                ) * fast_tanh(
                                    xw[t, tile * rows + r, h2 + block * width + u]
                                    + reset_state[tile * rows + r, block * width + u]
                                ) + update[tile * rows + r, block * width + u] * state[
                                    now, tile * rows + r, block * width + u
                                ]
                                y[t, tile * rows + r, block * width + u] = state[
                                    1 - now, tile * rows + r, block * width + u
                                ]
            if not lbr:
                for block in T.parallel(blocks):
                    candidate = T.decl_buffer((rows, width), "float32")
                    for tile in range(tiles):
                        for r in range(rows):
                            for u in T.vectorized(width):
                                candidate[r, u] = xw[t, tile * rows + r, h2 + block * width + u]
                        for k in range(hidden):
                            for r in T.unroll(rows):
                                for u in T.vectorized(width):
                                    candidate[r, u] = (
                                        candidate[r, u]
                                        + rt[block, k, 2, u] * reset_state[tile * rows + r, k]
                                    )
                        for r in range(rows):
                            for u in T.vectorized(width):
                                state[1 - now, tile * rows + r, block * width + u] = (
                                    T.float32(1) - update[tile * rows + r, block * width + u]
                                ) * fast_tanh(candidate[r, u]) + update[
                                    tile * rows + r, block * width + u
                                ] * state[now, tile * rows + r, block * width + u]
                                y[t, tile * rows + r, block * width + u] = state[
                                    1 - now, tile * rows + r, block * width + u
                                ]

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
        recurrent = relax.const(packed_recurrent(r_np[d], 3))
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
