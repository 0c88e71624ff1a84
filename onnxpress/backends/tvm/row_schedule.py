"""Row kernels for CPU builds: a softmax, a log-softmax, a layer normalization and a variance
over the last axis, scheduled row by row (fast_math.py emits them in place of Relax's ops).

TOPI's ``fast_softmax`` and ``layer_norm`` as the default schedules run them make a pass
over the whole tensor per stage, with each reduction serial and vectorized across rows (a
strided gather). The attention softmax of a BERT-size encoder (12 x 128 x 128) took about
190 us on the AVX2 EPYC, its layer norms (128 x 384) 27 us each (docs/BENCHMARKS.md, run
19). Here one parallel loop runs over the rows, and per row:

  part[l] = reduce_k x[k * L + l]     (L lanes: a vector register across the row)
  total   = reduce_l part[l], then the row's last ``length % L`` values
  softmax:    e[j] = fast_exp(x[j] - max) into a row buffer on the kernel's stack (it stays
              in L1), its sum likewise, y[j] = e[j] / sum
  log-softmax: the same sum, y[j] = (x[j] - max) - log(sum), one log per row (TOPI's
              log_softmax called the C library's exp and log per element: 13.8x
              onnxruntime's time over 64 x 112 x 112 rows of 112, now 2.3x, as softmax)
  layer norm: the mean, then the mean of (x - mean)^2 (two passes over the row in L1),
              y[j] = (x[j] - mean) * rsqrt(var + eps) * gamma[j] + beta[j]

Elementwise loops are vectorized, their last ``length % L`` iterations a scalar tail.
"""

from __future__ import annotations

import math
from typing import Any

from onnxpress.backends.tvm.matmul_legalize import static_shape

LANES = 8  # a float32 vector on AVX2 (two on NEON)
MIN_PARALLEL = 1 << 14  # elements below which one thread does the whole kernel


class _Row:
    """The lane split of a row of ``length``: ``steps`` vectors of ``lanes``, then ``tail``."""

    def __init__(self, rows: int, length: int) -> None:
        self.rows, self.length = rows, length
        self.lanes = LANES if length >= LANES else 1
        self.steps = length // self.lanes
        self.main = self.steps * self.lanes
        self.tail = length - self.main

    def reduce(self, values: Any, reduce: Any, name: str) -> Any:
        """[rows] = ``reduce`` over each row of ``values`` [rows, length] (lane_reduce)."""
        return lane_reduce(values, reduce, name)

    def schedule(
        self, func: Any, output: str, inline: tuple[str, ...], stages: tuple[str, ...]
    ) -> Any:
        """Schedule ``func``: ``output``'s row loop parallel, ``inline`` blocks inlined,
        ``stages`` (consumers first) computed per row, partials and elementwise loops
        vectorized (the output's column loop too, unless it is one value a row)."""
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        row, column = sch.get_loops(sch.get_sblock(output))
        if self.rows > 1 and self.rows * self.length >= MIN_PARALLEL:
            sch.parallel(row)
        for name in inline:
            sch.compute_inline(sch.get_sblock(name))
        for name in stages:
            sch.compute_at(sch.get_sblock(name), row)
        # partitioned after compute_at: a partitioned block reads its whole range of a row
        if int(sch.get(column).extent) > 1:
            self._vectorized(sch, column)
        for name in stages:
            block = sch.get_sblock(name)
            if name.endswith("_part"):
                if self.lanes > 1 and self.steps > 1:  # the lane loop around its reduction
                    sch.vectorize(sch.get_loops(block)[-2])
            elif len(sch.get_loops(block)) > 1 and not _is_reduction(sch, block):
                self._vectorized(sch, sch.get_loops(block)[-1])
        func = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
        return func.without_attr("global_symbol")

    def _vectorized(self, sch: Any, loop: Any) -> None:
        if self.lanes == 1:
            return
        if self.tail:
            loop = sch.loop_partition(loop, [self.main, None])[0]
        _, inner = sch.split(loop, [None, self.lanes])
        sch.vectorize(inner)


def lane_reduce(values: Any, reduce: Any, name: str) -> Any:
    """``reduce`` over the last axis of ``values`` [..., length]: partials over ``LANES``
    lanes (``name``_part: one vector register across the row), then across the lanes and
    the row's last ``length % LANES`` values (``name``)."""
    from tvm import te, tirx

    *lead, length = (int(d) for d in values.shape)
    row = _Row(math.prod(lead), length)
    lanes, main = row.lanes, row.main
    k = te.reduce_axis((0, row.steps), name=f"{name}_k")

    def partial(*i: Any) -> Any:
        index = (*i[:-1], k * lanes + i[-1])
        return reduce(values[index], axis=k)

    part = te.compute((*lead, lanes), partial, name=f"{name}_part")
    u = te.reduce_axis((0, lanes + row.tail), name=f"{name}_u")

    def total(*r: Any) -> Any:
        lane = (*r, tirx.min(u, lanes - 1))
        if not row.tail:
            return reduce(part[lane], axis=u)
        after = (*r, tirx.min(main + u - lanes, length - 1))
        return reduce(tirx.Select(u < lanes, part[lane], values[after]), axis=u)

    return te.compute(tuple(lead), total, name=name)


def _is_reduction(sch: Any, block: Any) -> bool:
    return any(int(iv.iter_type) != 0 for iv in sch.get(block).iter_vars)


def _exp_sums(rows: int, length: int, dtype: str) -> tuple[Any, ...]:
    """(row, x, shifted = x - max, e = fast_exp(shifted), the row sums of e) for the
    softmax kernels; the stages to compute per row follow the sums' name ``row_sum``."""
    from tvm import te, topi

    row = _Row(rows, length)
    x = te.placeholder((rows, length), dtype, name="x")
    row_max = row.reduce(x, te.max, "row_max")
    shifted = te.compute((rows, length), lambda r, j: x[r, j] - row_max[r], name="shifted")
    exp = topi.fast_exp(shifted)
    return row, x, shifted, exp, row.reduce(exp, te.sum, "row_sum")


def _exp_stages(exp: Any) -> tuple[str, ...]:
    return ("row_sum", "row_sum_part", exp.op.name, "row_max", "row_max_part")


def softmax_rows(rows: int, length: int, dtype: str = "float32") -> Any:
    """The scheduled PrimFunc y[rows, length] = softmax(x[rows, length]) over its last axis
    (``tirx.is_scheduled``: the default schedules leave it alone)."""
    from tvm import te, tirx

    row, x, _, exp, row_sum = _exp_sums(rows, length, dtype)
    inv = te.compute((rows,), lambda r: tirx.const(1.0, dtype) / row_sum[r], name="inv_sum")
    out = te.compute((rows, length), lambda r, j: exp[r, j] * inv[r], name="softmax")
    stages = ("inv_sum", *_exp_stages(exp))
    return row.schedule(te.create_prim_func([x, out]), "softmax", ("shifted",), stages)


def log_softmax_rows(rows: int, length: int, dtype: str = "float32") -> Any:
    """The scheduled PrimFunc y = (x - max) - log(sum(exp(x - max))) over the last axis of
    x[rows, length] (onnxruntime's order): one ``log`` per row, the exponentials on
    ``fast_exp`` (TOPI's log_softmax called the C library's exp and log per element)."""
    from tvm import te, tirx

    row, x, shifted, exp, row_sum = _exp_sums(rows, length, dtype)
    log_sum = te.compute((rows,), lambda r: tirx.log(row_sum[r]), name="log_sum")
    out = te.compute((rows, length), lambda r, j: shifted[r, j] - log_sum[r], name="log_softmax")
    stages = ("log_sum", *_exp_stages(exp))
    return row.schedule(te.create_prim_func([x, out]), "log_softmax", ("shifted",), stages)


def _squared_deviations(rows: int, length: int, dtype: str) -> tuple[Any, ...]:
    """(row, x, the length as a constant, the row means, the row sums of squared deviations
    from the mean) for layer_norm_rows and variance_rows; the stages to compute per row:
    ``squares``, ``squares_part``, ``mean``, ``total``, ``total_part`` (``square`` inlined)."""
    from tvm import te, tirx

    row = _Row(rows, length)
    x = te.placeholder((rows, length), dtype, name="x")
    count = tirx.const(float(length), dtype)
    total = row.reduce(x, te.sum, "total")
    mean = te.compute((rows,), lambda r: total[r] / count, name="mean")
    square = te.compute(
        (rows, length), lambda r, j: (x[r, j] - mean[r]) * (x[r, j] - mean[r]), name="square"
    )
    return row, x, count, mean, row.reduce(square, te.sum, "squares")


def layer_norm_rows(rows: int, length: int, epsilon: float, dtype: str = "float32") -> Any:
    """The scheduled PrimFunc y = layer_norm(x[rows, length], gamma[length], beta[length])
    over the last axis (mean, then the mean of squared deviations)."""
    from tvm import te, tirx

    row, x, count, mean, squares = _squared_deviations(rows, length, dtype)
    gamma = te.placeholder((length,), dtype, name="gamma")
    beta = te.placeholder((length,), dtype, name="beta")
    inv = te.compute(
        (rows,),
        lambda r: tirx.rsqrt(squares[r] / count + tirx.const(epsilon, dtype)),
        name="inv_std",
    )
    out = te.compute(
        (rows, length),
        lambda r, j: (x[r, j] - mean[r]) * inv[r] * gamma[j] + beta[j],
        name="layer_norm",
    )
    stages = ("inv_std", "squares", "squares_part", "mean", "total", "total_part")
    func = te.create_prim_func([x, gamma, beta, out])
    return row.schedule(func, "layer_norm", ("square",), stages)


def variance_rows(rows: int, length: int, dtype: str = "float32") -> Any:
    """The scheduled PrimFunc v[rows, 1] = the mean of squared deviations from the mean over
    the last axis of x[rows, length] (layer_norm_rows' first two stages): the variance of
    an InstanceNormalization or a GroupNorm, which Relax's own kernel reduced serially per
    row, 2.5 ms over wav2vec2's 512 x 3199 (docs/BENCHMARKS.md, run 24)."""
    from tvm import te

    row, x, count, _, squares = _squared_deviations(rows, length, dtype)
    out = te.compute((rows, 1), lambda r, _: squares[r] / count, name="variance")
    stages = ("squares", "squares_part", "mean", "total", "total_part")
    return row.schedule(te.create_prim_func([x, out]), "variance", ("square",), stages)


def _static_rows(x: Any, axes: list[int]) -> tuple[list[int], int, int] | None:
    """(shape, rows, length) of ``x`` for a kernel over its last axis only; None where the
    shape is not static or ``axes`` is another axis."""
    shape = static_shape(x)
    if not shape or [a % len(shape) for a in axes] != [len(shape) - 1]:
        return None
    rows = math.prod(shape[:-1])
    return (shape, rows, shape[-1]) if rows and shape[-1] else None


def _emit_rows(
    builder: Any, x: Any, rows_of: tuple[list[int], int, int], kernel: Any, name: str,
    extra: list[Any],
) -> Any:  # fmt: skip
    from tvm import relax

    shape, rows, length = rows_of
    gvar = builder.add_func(kernel, name)
    flat = builder.emit(relax.op.reshape(x, [rows, length]))
    out = builder.emit(
        relax.call_tir(gvar, [flat, *extra], relax.TensorType((rows, length), "float32"))
    )
    return relax.op.reshape(out, shape)


def emit_softmax(builder: Any, x: Any, axis: int) -> Any | None:
    """y = softmax(x, axis) through ``softmax_rows`` where ``axis`` is the last one of a static
    float32 shape; None otherwise (the caller keeps TOPI's kernel)."""
    rows_of = _static_rows(x, [axis])
    if rows_of is None:
        return None
    kernel = softmax_rows(rows_of[1], rows_of[2])
    return _emit_rows(builder, x, rows_of, kernel, "softmax_rows", [])


def emit_log_softmax(builder: Any, x: Any, axis: int) -> Any | None:
    """y = log_softmax(x, axis) through ``log_softmax_rows`` where ``axis`` is the last one of
    a static float32 shape; None otherwise."""
    rows_of = _static_rows(x, [axis])
    if rows_of is None:
        return None
    kernel = log_softmax_rows(rows_of[1], rows_of[2])
    return _emit_rows(builder, x, rows_of, kernel, "log_softmax_rows", [])


def emit_layer_norm(builder: Any, call: Any) -> Any | None:
    """A Relax ``nn.layer_norm`` call over the last axis of a static float32 shape through
    ``layer_norm_rows`` (gamma and beta of the row's length); None otherwise."""
    x, gamma, beta = call.args
    attrs = call.attrs
    rows_of = _static_rows(x, [int(a) for a in attrs.axes])
    if rows_of is None or not all(_flag(f) for f in (attrs.center, attrs.scale)):
        return None
    length = rows_of[2]
    for param in (gamma, beta):
        if static_shape(param) != [length]:
            return None
    kernel = layer_norm_rows(rows_of[1], length, float(attrs.epsilon))
    return _emit_rows(builder, x, rows_of, kernel, "layer_norm_rows", [gamma, beta])


def emit_variance(builder: Any, call: Any) -> Any | None:
    """A Relax ``variance`` call over the last axis of a static float32 shape through
    ``variance_rows``; None otherwise."""
    from tvm import relax

    x = call.args[0]
    axes = call.attrs.axis
    rows_of = _static_rows(x, [int(a) for a in axes] if axes is not None else [])
    if rows_of is None:
        return None
    shape, rows, length = rows_of
    gvar = builder.add_func(variance_rows(rows, length), "variance_rows")
    flat = builder.emit(relax.op.reshape(x, [rows, length]))
    out = builder.emit(relax.call_tir(gvar, [flat], relax.TensorType((rows, 1), "float32")))
    kept = [*shape[:-1], 1] if _flag(call.attrs.keepdims) else shape[:-1]
    return relax.op.reshape(out, kept)


def _flag(value: Any) -> bool:
    return bool(getattr(value, "value", value))
