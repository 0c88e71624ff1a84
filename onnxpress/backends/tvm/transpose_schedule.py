"""Elementwise kernels that read a tensor transposed: the dlight rule ``TiledTranspose``.

The int8 lowering (int8.py) computes a convolution as a GEMM whose int32 result is laid out
[pixels, channels]; its epilogue (requantize, residual add, Relu, the next quantize) writes
NCHW, and the next layer's im2col reads NHWC from an NCHW tensor. Scheduled like any
elementwise kernel, the output's last axis (image columns) becomes the vector lanes, and
each lane reads the transposed tensor one row of channels apart: a 256-channel ResNet-50
epilogue touched a new cache line per element, 0.7-1.1 ms for 0.8 M elements, a third of
the int8 model. This rule tiles the output's last axis with the output axis along which
that read is contiguous:

    for (other axes, a // T, last // W) in parallel:   # one tile: W rows of T values read
        for a % T:                                    # ... and reused for every a in it
            for last % W (vector):
                out[..., a, ..., last] = f(in[..., last, ..., a], ...)

so a tile's reads stay in L1 while the output is still written one vector at a time.
The blocked layout's conversion back to NCHW (``from_blocked``: out[n, c, h, w] reads
x[n, c // T, h, w, c % T]) is such a read too: contiguous inside each block of T channels,
so the tile is the block. Scheduled by LoopParallel, each output row re-read its whole
channel block once per channel of the block: a [1, 96, 112, 112] conversion 0.49 -> 0.13 ms
(docs/BENCHMARKS.md, run 26). It applies only when one spatial block remains after
inlining, and each output keeps its arithmetic (bit-identical results).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from onnxpress.backends.tvm.inline import inline_elementwise
from onnxpress.backends.tvm.tile_plan import row_tile, vector_width
from onnxpress.backends.tvm.tile_schedule import MIN_PARALLEL_ELEMENTS

logger = logging.getLogger(__name__)

TILE = 16  # values of the contiguous axis per tile (one 64-byte line of fp32 / int32)


def axis_strides(
    sch: Any, block: Any, tiles: dict[int, int] | None = None
) -> list[list[int | None]]:
    """Per read of ``block``: the row-major offset's step per unit of each block axis
    (None where it is not a constant). With ``tiles`` {axis: T}, the step of that axis is
    taken within an aligned tile of T values (axis = T * o + i, i + 1 < T), as a blocked
    layout's channel axis reads (c // T, ..., c % T): 1 inside a block, not constant
    across block edges."""
    tiles = tiles or {}
    from tvm import tirx
    from tvm.ir import Range
    from tvm.sym import Analyzer

    stmt = sch.get(block)
    axes = [iv.var for iv in stmt.iter_vars]

    def analyzer(moved: int, shift: int, y: Any, outer: Any) -> Any:
        """Axes bound to their ranges; axis ``moved`` to y + ``shift``, y one below its end."""
        found = Analyzer()
        dtype = str(axes[moved].ty.dtype)
        tile = tiles.get(moved)
        for position, iv in enumerate(stmt.iter_vars):
            extent = max(int(iv.dom.extent) - (position == moved), 1)
            bound = Range.from_min_extent(iv.dom.min, tirx.const(extent, dtype))
            if position == moved and tile:
                zero = tirx.const(0, dtype)
                found.bind(
                    outer, Range.from_min_extent(zero, tirx.const(extent // tile + 1, dtype))
                )
                found.bind(y, Range.from_min_extent(zero, tirx.const(tile - 1, dtype)))
                found.bind(iv.var, outer * tirx.const(tile, dtype) + y + tirx.const(shift, dtype))
            elif position == moved:
                found.bind(y, bound)
                found.bind(iv.var, y + tirx.const(shift, dtype))
            else:
                found.bind(iv.var, bound)
        return found

    result = []
    for read in stmt.reads:
        shape = [int(d) for d in read.source.shape]
        flat = sum(
            (rng.min * math.prod(shape[p + 1 :]) for p, rng in enumerate(read.region)),
            tirx.const(0, str(axes[0].ty.dtype)),
        )
        steps: list[int | None] = []
        for moved, axis in enumerate(axes):
            y, outer = tirx.Var("y", str(axis.ty.dtype)), tirx.Var("o", str(axis.ty.dtype))
            base, ahead = analyzer(moved, 0, y, outer), analyzer(moved, 1, y, outer)
            step = base.simplify(ahead.simplify(flat) - base.simplify(flat))
            steps.append(int(step.value) if isinstance(step, tirx.IntImm) else None)
        result.append(steps)
    return result


def tile_transposed(sch: Any, block: Any, lanes: int) -> bool:
    """Tile ``block`` (see the module docstring) if one of its big reads is transposed."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    extents = [int(iv.dom.extent) for iv in stmt.iter_vars]
    if stmt.init is not None or len(loops) != len(extents) or len(extents) < 2:
        return False
    if any(int(iv.iter_type) != 0 for iv in stmt.iter_vars):
        return False
    if [int(sch.get(loop).extent) for loop in loops] != extents:
        return False
    written = [rng.min for rng in stmt.writes[0].region]
    if len(written) != len(extents) or any(
        not w.same_as(iv.var) for w, iv in zip(written, stmt.iter_vars, strict=True)
    ):
        return False
    total, last = math.prod(extents), len(extents) - 1
    found = _contiguous_axis(sch, block, extents)
    if found is None:
        return False
    contiguous, tile = found
    width = vector_width(extents[last], lanes) or 1
    a_outer, a_inner = sch.split(loops[contiguous], factors=[None, tile])
    l_outer, l_inner = sch.split(loops[last], factors=[None, width])
    others = [loop for i, loop in enumerate(loops) if i not in (contiguous, last)]
    sch.reorder(*others, a_outer, l_outer, a_inner, l_inner)
    outer = sch.fuse(*others, a_outer, l_outer)
    if total >= MIN_PARALLEL_ELEMENTS:
        sch.parallel(outer)
    if width > 1:
        sch.vectorize(l_inner)
    return True


def _contiguous_axis(sch: Any, block: Any, extents: list[int]) -> tuple[int, int] | None:
    """(axis, tile): the output axis along which the first big read that is transposed
    (not read along the lanes, the last axis) is contiguous, and the tile of that axis:
    a divisor near TILE, or the block of a blocked layout that the read takes it from
    (c // T, ..., c % T: contiguous inside a block of T)."""
    total, last = math.prod(extents), len(extents) - 1
    strides = axis_strides(sch, block)
    for index, (read, steps) in enumerate(zip(sch.get(block).reads, strides, strict=True)):
        size = math.prod(int(d) for d in read.source.shape)
        if size * 4 < total or steps[last] in (0, 1):
            continue  # small (a bias, a scale) or already read along the lanes
        candidates = [a for a in range(last) if steps[a] == 1 and extents[a] >= 4]
        if candidates:
            axis = candidates[-1]
            return axis, row_tile(extents[axis], TILE)  # a divisor where one is near TILE
        for axis in reversed(range(last)):
            if steps[axis] is not None or extents[axis] < 4:
                continue
            for tile in (TILE, TILE // 2, TILE // 4):
                if extents[axis] % tile:
                    continue
                blocked = axis_strides(sch, block, {axis: tile})[index]
                if blocked[axis] == 1 and blocked[last] not in (0, 1, None):
                    return axis, tile
    return None


def tiled_transpose_rule(lanes: int) -> Any:
    """The dlight rule ``TiledTranspose`` (see the module docstring)."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    class TiledTranspose(dl.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc):
                return None
            try:
                sch = s_tir.Schedule(func)
                inline_elementwise(sch)
                blocks = sch.get_child_blocks(sch.get_sblock("root"))
                if len(blocks) != 1 or not tile_transposed(sch, blocks[0], lanes):
                    return None
            except Exception as exc:
                logger.debug("TiledTranspose skipped a kernel: %s", exc, exc_info=True)
                return None
            return sch

    return TiledTranspose()
