"""A softmax over the last axis, scheduled for CPUs row by row (fast_math.py emits it).

TOPI's ``fast_softmax`` as the default schedules run it makes four passes over the whole
tensor: the row maxima, ``exp`` into a buffer of the tensor's size, the row sums, the
division. The two reductions ran serially, vectorized across rows (a strided gather), and
the attention softmax of a BERT-size encoder (12 x 128 x 128) took about 190 us on the AVX2
EPYC, 5% of the model (docs/BENCHMARKS.md, run 19).

Here one parallel loop runs over the rows, and per row:

  part_max[l] = max_k x[k * L + l]        (L lanes, a vector register across the row)
  row_max     = max_l part_max[l]
  e[j]        = fast_exp(x[j] - row_max)  (a row buffer on the kernel's stack: stays in L1)
  part_sum[l], row_sum likewise
  y[j]        = e[j] / row_sum

The same arithmetic as TOPI's kernel (its ``fast_exp``, the max subtracted first, a
division), in another summation order.
"""

from __future__ import annotations

import math
from typing import Any

LANES = 8  # a float32 vector on AVX2 (two on NEON)
MIN_PARALLEL = 1 << 14  # elements below which one thread does the whole softmax


def softmax_rows(rows: int, length: int, dtype: str = "float32") -> Any:
    """The scheduled PrimFunc y[rows, length] = softmax(x[rows, length]) over its last axis
    (``tirx.is_scheduled``: the default schedules leave it alone). A row whose length is not
    a multiple of the lanes has its last ``length % LANES`` values reduced after the lanes,
    and its elementwise loops are partitioned into a vector part and a scalar tail."""
    from tvm import s_tir, te, tirx, topi

    lanes = LANES if length >= LANES else 1
    steps = length // lanes
    main = steps * lanes
    tail = length - main
    x = te.placeholder((rows, length), dtype, name="x")

    def lanes_then_tail(part: Any, values: Any, reduce: Any, name: str) -> Any:
        """part[r, 0..lanes) then values[r, main..length) reduced into one value a row."""
        u = te.reduce_axis((0, lanes + tail), name=f"{name}_u")

        def value(r: Any) -> Any:
            own = part[r, tirx.min(u, lanes - 1)]
            rest = values[r, tirx.min(main + u - lanes, length - 1)]
            return reduce(tirx.Select(u < lanes, own, rest), axis=u)

        return te.compute((rows,), value, name=name)

    k = te.reduce_axis((0, steps), name="k")
    part_max = te.compute(
        (rows, lanes), lambda r, v: te.max(x[r, k * lanes + v], axis=k), name="part_max"
    )
    row_max = lanes_then_tail(part_max, x, te.max, "row_max")
    shifted = te.compute((rows, length), lambda r, j: x[r, j] - row_max[r], name="shifted")
    exp = topi.fast_exp(shifted)
    k2 = te.reduce_axis((0, steps), name="k2")
    part_sum = te.compute(
        (rows, lanes), lambda r, v: te.sum(exp[r, k2 * lanes + v], axis=k2), name="part_sum"
    )
    row_sum = lanes_then_tail(part_sum, exp, te.sum, "row_sum")
    out = te.compute((rows, length), lambda r, j: exp[r, j] / row_sum[r], name="softmax")

    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    row, column = sch.get_loops(sch.get_sblock("softmax"))
    if rows > 1 and rows * length >= MIN_PARALLEL:
        sch.parallel(row)
    sch.compute_inline(sch.get_sblock("shifted"))
    exp_block = exp.op.name
    for name in ("row_sum", "part_sum", exp_block, "row_max", "part_max"):
        sch.compute_at(sch.get_sblock(name), row)
    # partitioned after compute_at: a partitioned block reads its whole range of a row
    _vectorized(sch, column, lanes, main, tail)
    _vectorized(sch, sch.get_loops(sch.get_sblock(exp_block))[-1], lanes, main, tail)
    if lanes > 1 and steps > 1:  # each lane's reduction runs inside the vector loop: one register
        for name in ("part_max", "part_sum"):
            sch.vectorize(sch.get_loops(sch.get_sblock(name))[-2])
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
    return func.without_attr("global_symbol")


def _vectorized(sch: Any, loop: Any, lanes: int, main: int, tail: int) -> None:
    """Vectorize ``loop`` by ``lanes``, its last ``tail`` iterations a scalar loop after."""
    if lanes == 1:
        return
    if tail:
        loop = sch.loop_partition(loop, [main, None])[0]
    _, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)


def emit_softmax(builder: Any, x: Any, axis: int) -> Any | None:
    """y = softmax(x, axis) through ``softmax_rows`` where ``axis`` is the last one of a static
    float32 shape; None otherwise (the caller keeps TOPI's kernel)."""
    from tvm import relax

    try:  # a static shape: IntImm dimensions
        shape: list[int] = [int(d.value) for d in x.ty.shape]
    except (AttributeError, TypeError):
        return None
    if not shape or axis not in (-1, len(shape) - 1):
        return None
    length = shape[-1]
    rows = math.prod(shape[:-1])
    if rows == 0 or length == 0:
        return None
    gvar = builder.add_func(softmax_rows(rows, length, "float32"), "softmax_rows")
    flat = builder.emit(relax.op.reshape(x, [rows, length]))
    out = builder.emit(relax.call_tir(gvar, [flat], relax.TensorType((rows, length), "float32")))
    return relax.op.reshape(out, shape)
