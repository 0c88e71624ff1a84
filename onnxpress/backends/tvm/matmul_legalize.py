"""The legalization of ``relax.matmul`` for the CPU pipeline (schedule.legalize_passes).

By a constant [K, N] matrix (``legalize_matmul``): the weights are packed once, at compile
time, into panels of P columns read front to back (``matmul_panel``).

With N output columns that no vector width divides (a prime such as ViT's 197 tokens, in
the product of two activations Q K^T), the right operand is padded with zero columns to a
multiple of the lanes; with a row count of more than two vectors that 4 does not divide
(197 tokens again), the left one gets zero rows likewise, for constant weights too. The
product is sliced back (``ragged_product``; the slice fuses with the epilogue). Unpadded, no register tile fit the columns, and the
default schedule ran Q K^T as scalar dot products down strided columns; ragged rows put a
predicate on every multiply-add of the tile. ViT-base's unfused attention (12 heads, 197
tokens, depth 64) on the AVX2 EPYC: Q K^T 14.1 -> 0.86 ms, P V 1.21 -> 0.53 ms (onnxruntime
runs the whole block in about 0.9 ms). The zoo's encoder at 197 tokens: 113-119 ms before
this, 45 ms after, onnxruntime 45-48 (docs/BENCHMARKS.md, run 19).

Other matmuls keep TVM's legalization.
"""

from __future__ import annotations

import math
from typing import Any

from onnxpress.backends.tvm.tile_plan import stacked_rows, vector_width


def static_shape(expr: Any) -> list[int] | None:
    """The static shape of ``expr``'s type, or None (no shape, or a symbolic one)."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    try:
        return None if shape is None else [int(d) for d in shape]
    except TypeError:  # symbolic
        return None


MAX_PACKED_ROWS = 8  # matmuls with at most this many rows get panels of one vector


def matmul_panel(rows: list[int], columns: int, lanes: int, registers: int) -> int:
    """Columns per packed weight panel of a matmul with output rows ``rows`` (the data's
    leading axes): one vector for at most MAX_PACKED_ROWS rows (a matrix-vector product
    whose tile stacks vectors of its own), else S x W of the register tile ``plan_tile``
    chooses for the kernel, so each tile reads one panel; 0 when no vector fits."""
    width = vector_width(columns, lanes)
    if not width or math.prod(rows) <= MAX_PACKED_ROWS:
        return width
    extents = (*rows, columns)
    row_axes = [axis for axis in range(len(rows) - 1, -1, -1) if rows[axis] > 1]
    stack, _, _ = stacked_rows(extents, len(rows), width, row_axes, registers)
    return stack * width


def legalize_matmul(lanes: int, registers: int) -> Any:
    """The legalization of ``relax.matmul`` by a constant [K, N] matrix for the CPU
    pipeline: the weights are packed once, at compile time, as panels of P columns,
    ``packed[j // P, k, j % P] = w[k, j]``, each read front to back (``matmul_panel``).
    Row-major, the tile's columns are a short run per row, N floats apart: every step
    starts a new page and the prefetcher restarts. A product of a few rows (a classifier at
    batch 1-8) reads the weights once, so its speed is their stream from memory (a 1280 x
    1000 classifier read its weights at 12 GB/s from DRAM, onnxruntime's packed ones at 25);
    with more rows each panel is re-read once per row tile, from L2 if it is packed (the
    encoder's 128 x 1536 x 384 matmul on Zen 3: 1.22 -> 0.84 ms, where onnxruntime takes
    about 1.0). Other matmuls keep TVM's legalization."""
    import tvm
    from tvm import te

    default = tvm.ir.Op.get("relax.matmul").get_attr("FLegalize")

    def legalize(bb: Any, call: Any) -> Any:
        data, weight = static_shape(call.args[0]), static_shape(call.args[1])
        if (
            data is None
            or weight is None
            or len(weight) != 2
            or len(data) < 2
            or not isinstance(call.args[1], tvm.ir.Constant)
            or str(call.ty.dtype) != "float32"
            or str(call.args[0].ty.dtype) != "float32"
            or str(call.args[1].ty.dtype) != "float32"
        ):
            return _ragged_or(default, bb, call, lanes)
        depth, columns = weight
        out = [*data[:-1], columns]
        x = call.args[0]
        if _ragged_rows(data, lanes):  # zero rows up to whole vectors: no ragged row tile
            x, data = _pad_rows(bb, x, data, lanes)
        panel = matmul_panel(data[:-1], columns, lanes, registers)
        if not panel or columns % panel:
            return _ragged_or(default, bb, call, lanes)

        def pack(w: Any) -> Any:
            return te.compute(
                (columns // panel, depth, panel),
                lambda jb, k, jl: w[k, jb * panel + jl],
                name="packed_weight",
            )

        def matmul(x: Any, packed: Any) -> Any:
            rk = te.reduce_axis((0, depth), name="rk")

            def dot(*i: Any) -> Any:
                row = (*i[:-1], rk)
                return te.sum(x[row] * packed[i[-1] // panel, rk, i[-1] % panel], axis=rk)

            return te.compute((*data[:-1], columns), dot, name="matmul", tag="matmul")

        packed = bb.emit_te(pack, call.args[1], primfunc_name_hint="pack_matmul_weight")
        product = bb.call_te(matmul, x, packed, primfunc_name_hint="matmul")
        return product if data[:-1] == out[:-1] else _slice(bb, bb.emit(product), out)

    return legalize


def _ragged_or(default: Any, bb: Any, call: Any, lanes: int) -> Any:
    padded = ragged_product(bb, call, lanes, default)
    return default(bb, call) if padded is None else padded


def ragged_product(bb: Any, call: Any, lanes: int, default: Any) -> Any | None:
    """A float32 matmul of static shapes with ragged columns or (two activations) ragged
    rows, as the product of zero-padded operands sliced back; None for other matmuls."""
    import tvm
    from tvm import relax, topi

    lhs, rhs, out = static_shape(call.args[0]), static_shape(call.args[1]), static_shape(call)
    if lhs is None or rhs is None or out is None or len(rhs) < 2 or len(lhs) < 2:
        return None
    if str(call.ty.dtype) != "float32":
        return None
    columns = rhs[-1]
    ragged_cols = columns > lanes and not vector_width(columns, lanes)
    ragged_rows = _ragged_rows(lhs, lanes) and not isinstance(call.args[1], tvm.ir.Constant)
    if not (ragged_cols or ragged_rows):
        return None
    left, right = call.args
    if ragged_cols:
        extra = -(-columns // lanes) * lanes - columns
        after = [0] * (len(rhs) - 1) + [extra]
        right = bb.emit_te(
            topi.nn.pad, right, [0] * len(rhs), after, primfunc_name_hint="pad_columns"
        )
    if ragged_rows:
        left, _ = _pad_rows(bb, left, lhs, lanes)
    wide = bb.normalize(relax.op.matmul(left, right, out_dtype="float32"))
    return _slice(bb, bb.emit(default(bb, wide)), out)


def _ragged_rows(shape: list[int], lanes: int) -> bool:
    """More than two vectors of rows (the second-last axis) that 4 does not divide."""
    return len(shape) >= 2 and shape[-2] > 2 * lanes and shape[-2] % 4 != 0


def _pad_rows(bb: Any, x: Any, shape: list[int], lanes: int) -> tuple[Any, list[int]]:
    """``x`` with zero rows up to a multiple of ``lanes``, and its new shape."""
    from tvm import topi

    after = [0] * len(shape)
    after[-2] = -(-shape[-2] // lanes) * lanes - shape[-2]
    padded = bb.emit_te(topi.nn.pad, x, [0] * len(shape), after, primfunc_name_hint="pad_rows")
    return padded, [*shape[:-2], shape[-2] + after[-2], shape[-1]]


def _slice(bb: Any, product: Any, out: list[int]) -> Any:
    """The leading ``out`` part of ``product`` (fused by Relax with what follows)."""
    from tvm import te

    def narrow(x: Any) -> Any:
        return te.compute(out, lambda *i: x(*i), name="matmul_slice")

    return bb.call_te(narrow, product, primfunc_name_hint="slice_product")
