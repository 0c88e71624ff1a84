"""Depthwise convolutions in the blocked layout: the dlight rule ``DepthwiseRows``, tried
before ``TiledReduction`` (tile_schedule.py).

``depthwise_nchwc`` (grouped_kernels.py) reads its padded input through a condition on each
window position. Under TiledReduction its batch, channel blocks, rows and column tiles were
fused into one parallel loop of 14-column tiles: the compiled window loop was a compare and
a branch per read (about 130 branches for 126 FMAs a tile), and kernels under
MIN_PARALLEL_MACS (the 14x14 and 7x7 ones) ran on one core. This rule keeps the rows and
the column tiles as loops of their own inside a parallel loop over the channel blocks:

    parallel (n, channel block)  |  rows  |  columns / T  |  window (unrolled)
        |  T columns (unrolled)  |  the block's lanes (vector)

A channels-last input (int8_depthwise.py's NHWC kernel) runs the rows in parallel
instead, with the channel blocks inside each column tile:

    parallel (n, rows)  |  columns / T  |  channel blocks  |  window  |  T columns  |  lanes

so each input pixel's channels are read together; by channel blocks, every block read all
the image's cache lines for its 8 bytes of each (96 channels at 112x112, stride 2, alone
on two cores, AVX2: 0.22 -> 0.10 ms).
T is the largest divisor of the output width up to 8 (32 vector registers) or 4 (16), at
least 4, else the whole row when it is at most that; otherwise the kernel is left to
TiledReduction. One channel block (16 channels or fewer) adds the rows to the parallel loop;
only kernels of fewer than MIN_PARALLEL_DEPTHWISE multiply-adds stay on one core. Each
output's sum runs in the same order. Measured alone, two cores, AVX-512, warm caches: 144
channels at 56x56 0.080 -> 0.057 ms, 96 at 112x112 stride 2 0.074 -> 0.042, 32 at 112x112
0.071 -> 0.046, 576 at 14x14 0.030 -> 0.016; mobilenet_v2 4.3 -> 3.9 ms per image.
"""

from __future__ import annotations

import math
from typing import Any

from onnxpress.backends.tvm.inline import inline_elementwise
from onnxpress.backends.tvm.tile_schedule import (
    inline_consumers,
    reduction_rule,
)

KERNEL = "depthwise_nchwc"  # the TE compute's name: grouped_kernels.depthwise_nchwc
MIN_PARALLEL_DEPTHWISE = 1 << 14  # multiply-adds from which the channel blocks run in
# parallel: far below TiledReduction's MIN_PARALLEL_MACS. mobilenet_v2's depthwise convs at
# 14x14 and 7x7 (0.25-1M multiply-adds) ran on one core under it; on both, the whole model
# went from 4.3 to 3.9 ms (two cores, AVX-512)


def column_tile(width: int, registers: int) -> int:
    """Output columns per register tile (see the module docstring); 0 when none fits."""
    limit = 8 if registers >= 32 else 4
    if width <= limit:
        return width
    best = max(d for d in range(1, limit + 1) if width % d == 0)
    return best if best >= 4 else 0


def schedule_depthwise(sch: Any, block: Any, registers: int) -> bool:
    """Schedule a ``depthwise_nchwc`` reduction block (loops n, cb, y, x, lanes, ky, kx);
    False, with the schedule untouched, when it does not fit."""
    loops = sch.get_loops(block)
    if len(loops) != 7:
        return False
    extents = [int(sch.get(loop).extent) for loop in loops]
    tile = column_tile(extents[3], registers)
    if not tile:
        return False
    inline_elementwise(sch)
    n, cb, y, x, lanes, ky, kx = loops
    x_outer, x_inner = sch.split(x, factors=[None, tile])
    channels_last = len(sch.get(block).reads[0].source.shape) == 4
    if channels_last:  # rows outermost: each input pixel's channels are read together
        sch.reorder(n, y, x_outer, cb, ky, kx, x_inner, lanes)
        tile_loop, parallel = cb, [n, y]
    else:
        sch.reorder(n, cb, y, x_outer, ky, kx, x_inner, lanes)
        tile_loop = x_outer
        parallel = [n, cb] if extents[0] * extents[1] > 1 else [n, cb, y]
    acc = sch.cache_write(block, 0, "global")
    inline_consumers(sch, acc)
    sch.reverse_compute_at(acc, tile_loop)
    if math.prod(extents) >= MIN_PARALLEL_DEPTHWISE:
        sch.parallel(sch.fuse(*parallel))
    sch.vectorize(lanes)
    for loop in (x_inner, kx, ky):
        sch.unroll(loop)
    init = sch.decompose_reduction(block, ky)
    *_, init_columns, init_lanes = sch.get_loops(init)
    sch.vectorize(init_lanes)
    sch.unroll(init_columns)
    sch.vectorize(sch.get_loops(acc)[-1])
    return True


def depthwise_rule(lanes: int, registers: int) -> Any:
    """The dlight rule ``DepthwiseRows`` (see the module docstring)."""

    def schedule(sch: Any, block: Any) -> bool:
        return sch.get(block).name_hint == KERNEL and schedule_depthwise(sch, block, registers)

    return reduction_rule("DepthwiseRows", schedule, lanes)
