"""Fused attention for CPU builds: softmax(Q K^T * scale + mask) V in one kernel.

Unfused, an encoder layer's attention is three kernels (the score matmul with its scale
and mask, the softmax, the matmul with V) that pass the [heads, M, N] score tensor
through memory twice each way. Here one parallel loop runs over blocks of ``ROWS`` query
rows of one head, and per block:

  s[i, j] = sum_d q[i, d] * kt[d, j] * scale + mask[i, j]   (a [ROWS, N] tile on the stack)
  p[i, j] = softmax over j, with 8-lane partial max and sum (row_schedule.py's arithmetic)
  o[i, e] = sum_j p[i, j] * v[j, e]

Both products run in register tiles: ROWS rows by 16 columns (two 8-lane vectors, one
16-lane vector where the target has AVX-512) kept in a local accumulator, the reduction
outside the rows. The Relax pass ``FusedAttention``
(after SiblingMatmuls, before FastMath in schedule.cpu_lowering_passes) rewrites the
pattern that attention_match.py matches, with a value depth of whole 16-lane tiles (others
keep the three kernels); rows and keys of any count run in padded tiles. Where q and v are
a projection split into heads, the kernel reads the projection token by token and writes
token-major; the head merge that follows (permute_dims(0, 2, 1, 3)) then cancels against
the kernel's own output permutation. BERT-size encoder at sequence 128 on the AVX2 EPYC:
253 -> about 210-235 us per layer (docs/BENCHMARKS.md, run 19).
"""

from __future__ import annotations

from typing import Any

from onnxpress.backends.tvm.attention_match import (
    COLUMNS,
    Attention,
    ints,
    match_attention,
    op_name,
)
from onnxpress.backends.tvm.row_schedule import lane_reduce

__all__ = [
    "Attention",
    "attention_kernel",
    "attention_lanes",
    "fused_attention_pass",
    "pad_operands",
]

ROWS = 4  # query rows per block (4 x 2 vectors = 8 accumulators at 8 lanes)


def attention_lanes(target_lanes: int) -> int:
    """The vector width of the kernel's register tiles for a target with ``target_lanes``
    float lanes: 16 (one AVX-512 register per tile row) where the target has them, else 8
    (one AVX2 register, two NEON ones). The encoder's attention on the AVX-512 Zen 4: 171
    -> 148 us per layer (docs/BENCHMARKS.md, run 24); both sit at the FMA throughput."""
    return COLUMNS if target_lanes >= COLUMNS else 8


def attention_kernel(a: Attention, dtype: str = "float32", lanes: int = 8) -> Any:
    """The scheduled PrimFunc o[B, H, M, E] (token-major: [B, M, H, E], see
    Attention.token_major) = softmax(q kt * scale + mask) v, with kt, v and
    a mask with a keys axis padded to ``a.padded_keys`` (pad_operands). Rows are padded to
    the 4-row blocks with q's reads clamped to the last real row, and the padded rows are
    not written; a padded key's logit is the lowest float and its exp 0, so it adds
    nothing to the max, the sums or the value product. ``lanes``: the vector width
    (attention_lanes), 8 or 16."""
    from tvm import s_tir, te, tirx, topi

    rows, keys, keys_p = a.queries, a.keys, a.padded_keys
    rows_p = -(-rows // ROWS) * ROWS
    q, read_q = _operand("q", (a.batch, a.heads, rows, a.depth), a.q_view, dtype)
    kt = te.placeholder((a.batch, a.heads, a.depth, keys_p), dtype, name="kt")
    v, read_v = _operand("v", (a.batch, a.heads, keys_p, a.value_depth), a.v_view, dtype)
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
        lambda b, h, i, j: te.sum(read_q(b, h, row(i), d) * kt[b, h, d, j], axis=d),
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
        lambda b, h, i, e: te.sum(exp[b, h, i, j] * read_v(b, h, j, e), axis=j),
        name="pv",
    )
    one = tirx.const(1.0, dtype)
    if a.token_major:
        out = te.compute(
            a.out_shape,
            lambda b, i, h, e: pv[b, h, i, e] * (one / row_sum[b, h, i]),
            name="attention",
        )
    else:
        out = te.compute(
            a.out_shape,
            lambda b, h, i, e: pv[b, h, i, e] * (one / row_sum[b, h, i]),
            name="attention",
        )
    sch = s_tir.Schedule(te.create_prim_func([*inputs, out]))
    sch.compute_inline(sch.get_sblock(fast.op.name))
    if a.token_major:  # the loops in (batch, head, row) order, as _schedule wants them
        b, i, h, e = sch.get_loops(sch.get_sblock("attention"))
        sch.reorder(b, h, i, e)
    return _schedule(sch, "exp", lanes)


def _operand(
    name: str, shape: tuple[int, int, int, int], view: tuple[int, int] | None, dtype: str
) -> tuple[Any, Any]:
    """The placeholder of q or v and its reader ``(b, h, t, d) -> value``: head-major
    [B, H, T, D] without a view, else a [B, T, C] tensor with head h at columns
    offset + h * D."""
    from tvm import te

    batch, _, tokens, depth = shape
    if view is None:
        x = te.placeholder(shape, dtype, name=name)
        return x, lambda b, h, t, d: x[b, h, t, d]
    columns, offset = view
    x = te.placeholder((batch, tokens, columns), dtype, name=name)
    return x, lambda b, h, t, d: x[b, t, offset + h * depth + d]


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
    padded = [q, pad(kt, 3, 4), pad(v, 2, 4) if a.v_view is None else pad(v, 1, 3)]
    if mask and a.mask is not None:
        padded.append(pad(mask[0], len(a.mask) - 1, len(a.mask)) if a.mask[-1] != 1 else mask[0])
    return padded


def _schedule(sch: Any, exp_block: str, lanes: int) -> Any:
    """One parallel loop over (batch, head, row block); per block the score tile, the
    softmax and the value product, each in register tiles."""
    out = sch.get_sblock("attention")
    b, h, i, e = sch.get_loops(out)
    block, _ = sch.split(i, [None, ROWS])
    task = sch.fuse(b, h, block)
    sch.parallel(task)
    sch.vectorize(sch.split(e, [None, lanes])[1])
    pv = sch.get_sblock("pv")
    sch.compute_at(pv, task)
    *_, p_rows, p_cols, p_keys = sch.get_loops(pv)
    _tile(sch, pv, (p_rows, p_cols, p_keys), lanes)
    for name in ("shifted", "logits"):
        sch.compute_inline(sch.get_sblock(name))
    for name in ("row_sum", "row_sum_part", exp_block, "row_max", "row_max_part", "scores"):
        sch.compute_at(sch.get_sblock(name), task)
    scores = sch.get_sblock("scores")
    *_, s_rows, s_cols, s_depth = sch.get_loops(scores)
    _tile(sch, scores, (s_rows, s_cols, s_depth), lanes)
    for name in ("row_max_part", "row_sum_part"):  # the lane loop around its reduction
        sch.vectorize(sch.get_loops(sch.get_sblock(name))[-2])
    exp_loops = sch.get_loops(sch.get_sblock(exp_block))
    sch.vectorize(sch.split(exp_loops[-1], [None, lanes])[1])
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
    return func.without_attr("global_symbol")


def _tile(sch: Any, block: Any, loops: tuple[Any, Any, Any], width: int) -> None:
    """rows x COLUMNS register tiles (COLUMNS / ``width`` vectors a row) over ``loops``
    (rows, columns, reduction), the reduction outside the rows: the tile's accumulators
    stay in registers."""
    rows, columns, reduction = loops
    acc = sch.cache_write(block, 0, "local")
    tile, vector = sch.split(columns, [None, COLUMNS])
    vectors, lanes = sch.split(vector, [None, width])
    sch.reorder(tile, reduction, rows, vectors, lanes)
    sch.reverse_compute_at(acc, tile)
    sch.vectorize(lanes)
    sch.unroll(rows)
    sch.unroll(vectors)
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])
    *_, acc_rows, acc_columns = sch.get_loops(acc)
    sch.unroll(acc_rows)
    _, acc_lanes = sch.split(acc_columns, [None, width])
    sch.vectorize(acc_lanes)


def fused_attention_pass(lanes: int = 8) -> Any:
    """The relax module pass ``FusedAttention``: each matched attention (match_attention)
    becomes one call of ``attention_kernel`` at the target's ``lanes`` (float lanes of
    its vectors); the ops it replaces are left unused (dead code elimination removes
    them)."""
    width = attention_lanes(lanes)
    from tvm import relax

    from onnxpress.backends.tvm.fast_math import rewriting_pass

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if op_name(call) == "relax.permute_dims":
                return self.visit_call_permute(call)
            found = match_attention(call, self._bound)
            if found is None:
                return call
            sizes, (q, kt, v, *masks) = found
            args = [q, kt, v]
            if masks:  # masks added one after another: their sum
                mask = masks[0]
                for other in masks[1:]:
                    mask = self.builder_.emit(relax.op.add(mask, other))
                args.append(mask)
            args = pad_operands(self.builder_, sizes, args)
            gvar = self.builder_.add_func(attention_kernel(sizes, lanes=width), "fused_attention")
            out = relax.call_tir(gvar, args, relax.TensorType(sizes.out_shape, "float32"))
            if not sizes.token_major:
                return out
            # back to [B, H, M, E] for the consumers; the usual merge of the heads,
            # permute_dims(.., [0, 2, 1, 3]), cancels it (below)
            return relax.op.permute_dims(self.builder_.emit(out), [0, 2, 1, 3])

        def visit_call_permute(self, call: Any) -> Any:
            """permute_dims(permute_dims(x, p), r) as x where r undoes p."""
            inner = self._bound(call.args[0])
            if op_name(inner) != "relax.permute_dims" or None in (
                call.attrs.axes,
                inner.attrs.axes,
            ):
                return call
            outer, first = ints(call.attrs.axes), ints(inner.attrs.axes)
            if [first[axis] for axis in outer] == list(range(len(outer))):
                return inner.args[0]
            return call

        def _bound(self, expr: Any) -> Any:
            if isinstance(expr, relax.Var):
                return self.lookup_binding(expr)
            return expr

    return rewriting_pass("FusedAttention", _Rewriter)
