"""Fused attention for CPU builds: softmax(Q K^T * scale + mask) V in one kernel.

Unfused, an encoder layer's attention is three kernels (the score matmul with its scale
and mask, the softmax, the matmul with V) that pass the [heads, M, N] score tensor
through memory twice each way. Here one parallel loop runs over blocks of ``ROWS`` query
rows of one head, and per block:

  s[i, j] = sum_d q[i, d] * kt[d, j] * scale + mask[i, j]   (a [ROWS, N] tile on the stack)
  p[i, j] = softmax over j, with 8-lane partial max and sum (row_schedule.py's arithmetic)
  o[i, e] = sum_j p[i, j] * v[j, e]

Both products run in register tiles: ROWS rows by 16 columns (two 8-lane vectors) kept in
a local accumulator, the reduction outside the rows. The Relax pass ``FusedAttention``
(before FastMath in schedule.cpu_lowering_passes) rewrites the pattern matmul -> [multiply
or divide by a constant] -> [add a broadcast mask] -> softmax(-1) -> matmul over static
float32 [batch, heads, rows, depth] tensors with a value depth of whole 16-lane tiles (others
keep the three kernels); rows and keys of any count run in padded tiles. BERT-size encoder at sequence 128
on the AVX2 EPYC: 253 -> about 210-235 us per layer (docs/BENCHMARKS.md, run 19).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnxpress.backends.tvm.matmul_legalize import static_shape
from onnxpress.backends.tvm.row_schedule import lane_reduce

ROWS = 4  # query rows per block (4 x 2 vectors = 8 accumulators)
COLUMNS = 16  # output columns of a register tile


@dataclass(frozen=True)
class Attention:
    """Static sizes: batch, heads, queries M, keys N, head depth D, value depth E; the mask's
    shape (broadcast to [batch, heads, M, N]) or None."""

    batch: int
    heads: int
    queries: int
    keys: int
    depth: int
    value_depth: int
    scale: float
    mask: tuple[int, ...] | None

    @property
    def padded_keys(self) -> int:
        """Keys rounded up to the score tile: kt, v and a mask with a keys axis arrive
        padded to it (``pad_operands``)."""
        return -(-self.keys // COLUMNS) * COLUMNS

    def fits(self) -> bool:
        """Whether the kernel applies: value vectors of whole register tiles. Rows and keys
        of any count run in padded tiles (see attention_kernel)."""
        return self.value_depth % COLUMNS == 0 and self.keys >= 1 and self.queries >= 1


def attention_kernel(a: Attention, dtype: str = "float32") -> Any:
    """The scheduled PrimFunc o[B, H, M, E] = softmax(q kt * scale + mask) v, with kt, v and
    a mask with a keys axis padded to ``a.padded_keys`` (pad_operands). Rows are padded to
    the 4-row blocks with q's reads clamped to the last real row, and the padded rows are
    not written; a padded key's logit is the lowest float and its exp 0, so it adds
    nothing to the max, the sums or the value product."""
    from tvm import s_tir, te, tirx, topi

    rows, keys, keys_p = a.queries, a.keys, a.padded_keys
    rows_p = -(-rows // ROWS) * ROWS
    q = te.placeholder((a.batch, a.heads, rows, a.depth), dtype, name="q")
    kt = te.placeholder((a.batch, a.heads, a.depth, keys_p), dtype, name="kt")
    v = te.placeholder((a.batch, a.heads, keys_p, a.value_depth), dtype, name="v")
    inputs = [q, kt, v]
    mask = None
    mask_shape = _padded_mask(a)
    if mask_shape is not None:
        mask = te.placeholder(mask_shape, dtype, name="mask")
        inputs.append(mask)
    scores_shape = (a.batch, a.heads, rows_p, keys_p)

    def row(i: Any) -> Any:
        return tirx.min(i, rows - 1) if rows_p != rows else i

    d = te.reduce_axis((0, a.depth), name="d")
    dot = te.compute(
        scores_shape,
        lambda b, h, i, j: te.sum(q[b, h, row(i), d] * kt[b, h, d, j], axis=d),
        name="scores",
    )
    scale = tirx.const(a.scale, dtype)
    lowest = tirx.const(-3.4e38, dtype)

    def masked(b: Any, h: Any, i: Any, j: Any) -> Any:
        value = dot[b, h, i, j] * scale
        if mask is not None and mask_shape is not None:
            offset = len(scores_shape) - len(mask_shape)
            index = [
                0 if extent == 1 else axis
                for axis, extent in zip((b, h, row(i), j)[offset:], mask_shape, strict=True)
            ]
            value = value + mask[tuple(index)]
        return tirx.Select(j < keys, value, lowest) if keys_p != keys else value

    logits = te.compute(scores_shape, masked, name="logits")
    row_max = lane_reduce(logits, te.max, "row_max")
    shifted = te.compute(
        scores_shape, lambda b, h, i, j: logits[b, h, i, j] - row_max[b, h, i], name="shifted"
    )
    fast = topi.fast_exp(shifted)
    zero = tirx.const(0.0, dtype)
    exp = te.compute(  # padded keys: exp 0 (the fast exp clamps its input at about -88)
        scores_shape,
        lambda b, h, i, j: tirx.Select(j < keys, fast[b, h, i, j], zero),
        name="exp",
    )
    row_sum = lane_reduce(exp, te.sum, "row_sum")
    j = te.reduce_axis((0, keys_p), name="j")
    pv = te.compute(
        (a.batch, a.heads, rows_p, a.value_depth),
        lambda b, h, i, e: te.sum(exp[b, h, i, j] * v[b, h, j, e], axis=j),
        name="pv",
    )
    one = tirx.const(1.0, dtype)
    out = te.compute(
        (a.batch, a.heads, rows, a.value_depth),
        lambda b, h, i, e: pv[b, h, i, e] * (one / row_sum[b, h, i]),
        name="attention",
    )
    sch = s_tir.Schedule(te.create_prim_func([*inputs, out]))
    sch.compute_inline(sch.get_sblock(fast.op.name))
    return _schedule(sch, "exp")


def _padded_mask(a: Attention) -> tuple[int, ...] | None:
    """The mask's shape as the kernel takes it: a keys axis padded like kt."""
    if a.mask is None:
        return None
    keys = a.mask[-1]
    return (*a.mask[:-1], a.padded_keys if keys != 1 else 1)


def pad_operands(builder: Any, a: Attention, args: list[Any]) -> list[Any]:
    """[q, kt, v, mask?] with kt's and v's keys axes (and the mask's, if it has one) padded
    with zeros to ``a.padded_keys``: the kernel reads them without bounds checks (a
    clamped index in the score tile made its column vector a gather)."""
    from tvm import relax

    extra = a.padded_keys - a.keys
    if not extra:
        return args

    def pad(x: Any, axis: int, rank: int) -> Any:
        widths = [0] * (2 * rank)
        widths[2 * axis + 1] = extra
        return builder.emit(relax.op.nn.pad(x, widths, pad_value=0.0))

    q, kt, v, *mask = args
    padded = [q, pad(kt, 3, 4), pad(v, 2, 4)]
    if mask and a.mask is not None:
        padded.append(pad(mask[0], len(a.mask) - 1, len(a.mask)) if a.mask[-1] != 1 else mask[0])
    return padded


def _schedule(sch: Any, exp_block: str) -> Any:
    """One parallel loop over (batch, head, row block); per block the score tile, the
    softmax and the value product, each in register tiles."""
    out = sch.get_sblock("attention")
    b, h, i, e = sch.get_loops(out)
    block, _ = sch.split(i, [None, ROWS])
    task = sch.fuse(b, h, block)
    sch.parallel(task)
    _, lanes = sch.split(e, [None, 8])
    sch.vectorize(lanes)
    pv = sch.get_sblock("pv")
    sch.compute_at(pv, task)
    *_, p_rows, p_cols, p_keys = sch.get_loops(pv)
    _tile(sch, pv, p_rows, p_cols, p_keys)
    for name in ("shifted", "logits"):
        sch.compute_inline(sch.get_sblock(name))
    for name in ("row_sum", "row_sum_part", exp_block, "row_max", "row_max_part", "scores"):
        sch.compute_at(sch.get_sblock(name), task)
    scores = sch.get_sblock("scores")
    *_, s_rows, s_cols, s_depth = sch.get_loops(scores)
    _tile(sch, scores, s_rows, s_cols, s_depth)
    for name in ("row_max_part", "row_sum_part"):  # the lane loop around its reduction
        sch.vectorize(sch.get_loops(sch.get_sblock(name))[-2])
    exp_loops = sch.get_loops(sch.get_sblock(exp_block))
    _, lanes = sch.split(exp_loops[-1], [None, 8])
    sch.vectorize(lanes)
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
    return func.without_attr("global_symbol")


def _tile(sch: Any, block: Any, rows: Any, columns: Any, reduction: Any) -> None:
    """rows x COLUMNS register tiles (two 8-lane vectors a row), the reduction outside the
    rows: the tile's accumulators stay in registers."""
    acc = sch.cache_write(block, 0, "local")
    tile, vector = sch.split(columns, [None, COLUMNS])
    vectors, lanes = sch.split(vector, [None, 8])
    sch.reorder(tile, reduction, rows, vectors, lanes)
    sch.reverse_compute_at(acc, tile)
    sch.vectorize(lanes)
    sch.unroll(rows)
    sch.unroll(vectors)
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])
    *_, acc_rows, acc_columns = sch.get_loops(acc)
    sch.unroll(acc_rows)
    _, acc_lanes = sch.split(acc_columns, [None, 8])
    sch.vectorize(acc_lanes)


def _op(expr: Any) -> str:
    return str(getattr(getattr(expr, "op", None), "name", ""))


def _scalar(expr: Any) -> float | None:
    """The value of a one-element float constant, else None."""
    import tvm

    if not isinstance(expr, tvm.ir.Constant):
        return None
    values = expr.value.numpy()
    return float(values.reshape(-1)[0]) if values.size == 1 else None


def match_attention(call: Any, lookup: Any) -> tuple[Attention, list[Any]] | None:
    """(sizes, [q, kt, v, mask?]) where ``call`` is matmul(softmax(matmul(q, kt) [* or / a
    constant] [+ mask], axis=-1), v) over static float32 4-D tensors; else None. ``lookup``
    maps a variable to the expression bound to it (None where it has none)."""
    if _op(call) != "relax.matmul":
        return None
    probs, v = call.args
    softmax = lookup(probs)
    if _op(softmax) != "relax.nn.softmax" or int(softmax.attrs.axis) not in (-1, 3):
        return None
    node, mask, scale = lookup(softmax.args[0]), None, 1.0
    if _op(node) == "relax.add":
        for scores, other in (node.args, node.args[::-1]):
            if _op(lookup(scores)) in ("relax.matmul", "relax.multiply", "relax.divide"):
                node, mask = lookup(scores), other
                break
        else:
            return None
    if _op(node) in ("relax.multiply", "relax.divide"):
        left, right = node.args
        factor, scores = (_scalar(right), left) if _scalar(right) is not None else (None, None)
        if factor is None and _op(node) == "relax.multiply":
            factor, scores = _scalar(left), right
        if factor is None or factor == 0.0:
            return None
        scale = factor if _op(node) == "relax.multiply" else 1.0 / factor
        node = lookup(scores)
    if _op(node) != "relax.matmul":
        return None
    q, kt = node.args
    shapes = [static_shape(x) for x in (q, kt, v)]
    if any(s is None or len(s) != 4 for s in shapes) or not _all_float32(q, kt, v, mask):
        return None
    (b, h, m, d), kt_shape, (vb, vh, n, e) = shapes  # type: ignore[misc]
    if kt_shape != [b, h, d, n] or (vb, vh) != (b, h):
        return None
    mask_shape = None
    if mask is not None:
        mask_shape = static_shape(mask)
        full = [b, h, m, n]
        if (
            mask_shape is None
            or len(mask_shape) > 4
            or any(
                dim not in (1, want)
                for dim, want in zip(mask_shape[::-1], full[::-1], strict=False)
            )
        ):
            return None
    sizes = Attention(b, h, m, n, d, e, scale, None if mask_shape is None else tuple(mask_shape))
    if not sizes.fits():
        return None
    return sizes, [q, kt, v, *([mask] if mask is not None else [])]


def _all_float32(*exprs: Any) -> bool:
    return all(
        str(getattr(getattr(x, "ty", None), "dtype", "")) == "float32"
        for x in exprs
        if x is not None
    )


def fused_attention_pass() -> Any:
    """The relax module pass ``FusedAttention``: each matched attention (match_attention)
    becomes one call of ``attention_kernel``; the ops it replaces are left unused (dead code
    elimination removes them)."""
    from tvm import relax

    from onnxpress.backends.tvm.fast_math import rewriting_pass

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            found = match_attention(call, self._bound)
            if found is None:
                return call
            sizes, args = found
            args = pad_operands(self.builder_, sizes, args)
            gvar = self.builder_.add_func(attention_kernel(sizes), "fused_attention")
            shape = (sizes.batch, sizes.heads, sizes.queries, sizes.value_depth)
            return relax.call_tir(gvar, args, relax.TensorType(shape, "float32"))

        def _bound(self, expr: Any) -> Any:
            if isinstance(expr, relax.Var):
                return self.lookup_binding(expr)
            return expr

    return rewriting_pass("FusedAttention", _Rewriter)
