"""Reduction blocking for ``TiledReduction`` (tile_schedule.py): where a tile's weight panel
(the reduction's steps times the S x W columns of the tile) does not stay in L1, the first
reduction loop is split, and the row tiles run inside each chunk of it.

Without it, each register tile walks the whole reduction for its S x W columns: a
960 -> 320 channel 1x1 conv at 7x7 (a 61 KB panel per tile of 16 channels) or the
encoder's 1536-deep matmul (147 KB) re-reads its panel from L2 or L3 for every row tile,
and the tile stalls on it. Split, the loops are

    panel axes (parallel) | reduction chunks | row tiles | steps of a chunk | tile

with a chunk's panel (at most ``CHUNK_BYTES``) in L1 for every row tile, and the
accumulators of all row tiles of the panel in a local buffer (a few KB, on the stack) that
the chunks add to; the epilogue runs once, after the last chunk. The steps loop is marked
for prefetch.py, which has the row tiles fetch the next chunk while they work on this one.
Each output's sum still runs in the same order (chunk after chunk), so results are
bit-identical.

It applies only where it pays: a panel over ``PANEL_BYTES``, at least two row tiles to
share it, and at least ``MIN_TASKS`` panels to run in parallel (the rows are no longer
split across threads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from onnxpress.backends.tvm import prefetch
from onnxpress.backends.tvm.tile_plan import TilePlan

PANEL_BYTES = 32 << 10  # a panel larger than L1 (32 KB on Zen 3 and Skylake-SP)
CHUNK_BYTES = 16 << 10  # half of L1 per chunk: the rows' values and the output share it
MIN_TASKS = 8  # panels the parallel loop needs to keep two cores busy
MAX_ACCUMULATOR_BYTES = 64 << 10  # the local accumulators of one panel's row tiles
MIN_CHUNK_STEPS = 32  # steps a chunk needs to pay for loading and storing its accumulators
PREFETCH = True  # each chunk's steps prefetch the next chunk (prefetch.py)


@dataclass(frozen=True)
class Split:
    """``steps`` of the first reduction loop per chunk; the outer loop of spatial axis
    ``axis`` (a row axis) cut in ``parts`` run in parallel next to the panels when there
    are too few panels for the threads (``axis`` None: no cut)."""

    steps: int
    axis: int | None = None
    parts: int = 1


def plan_split(plan: TilePlan, element_bytes: int = 4) -> Split | None:
    """How to split the reduction of ``plan``'s kernel, or None to leave it whole."""
    if not plan.rows or not plan.contiguous or plan.spatial >= len(plan.extents):
        return None
    extents, columns = plan.extents, plan.width * plan.stack
    reductions = extents[plan.spatial :]
    if plan.stack_axis is None:
        panels = extents[plan.vector] // columns
    else:
        panels = extents[plan.vector] // plan.width * (extents[plan.stack_axis] // plan.stack)
    outer = _outer_extents(plan)
    row_tiles = math.prod(outer.values())
    axis, parts = None, 1
    if panels < MIN_TASKS:  # cut the first row axis that has a divisor making enough tasks
        for candidate, extent in outer.items():
            wanted = -(-MIN_TASKS // panels)
            cuts = [d for d in range(wanted, extent + 1) if extent % d == 0]
            if cuts:
                axis, parts = candidate, cuts[0]
                break
        else:
            return None
    accumulators = math.prod(extents[: plan.spatial]) // (panels * parts) * element_bytes
    if (
        math.prod(reductions) * columns * element_bytes <= PANEL_BYTES
        or row_tiles // parts < 2
        or accumulators > MAX_ACCUMULATOR_BYTES
    ):
        return None
    inner = math.prod(reductions[1:])
    fitting = [
        d
        for d in range(1, reductions[0])
        if reductions[0] % d == 0 and d * inner * columns * element_bytes <= CHUNK_BYTES
    ]
    if not fitting or max(fitting) * inner < MIN_CHUNK_STEPS:
        return None
    return Split(max(fitting), axis, parts)


def _outer_extents(plan: TilePlan) -> dict[int, int]:
    """The outer loops' extents of the spatial axes that are not panel axes, by axis."""
    tiles = dict(plan.rows)
    panel_axes = {plan.vector, plan.stack_axis}
    return {
        axis: -(-plan.extents[axis] // tiles.get(axis, 1))
        for axis in range(plan.spatial)
        if axis not in panel_axes and plan.extents[axis] > 1
    }


def split_reduction(
    sch: Any,
    plan: TilePlan,
    outer: list[Any],
    reductions: list[Any],
    inner: list[Any],
    split: Split,
    ragged: list[Any] | None = None,
) -> tuple[list[Any], Any]:
    """Order the loops of a tile for ``split`` (see the module docstring): returns the
    loops to fuse and parallelize (the accumulators' write-back goes under the last) and
    the chunk loop (where the reduction's init goes). ``outer`` holds the outer loops of
    the spatial axes by axis position; the ``ragged`` ones among them (a row axis not a
    multiple of its tile) run innermost of the row tiles, for the caller to unroll."""
    panel_axes = {plan.vector} | ({plan.stack_axis} if plan.stack_axis is not None else set())
    tasks = [loop for axis, loop in enumerate(outer) if axis in panel_axes]
    rows = []
    for axis, loop in enumerate(outer):
        if axis == split.axis:
            part, rest = sch.split(loop, factors=[split.parts, None])
            tasks.append(part)
            rows.append(rest)
        elif axis not in panel_axes:
            rows.append(loop)
    last = [loop for loop in rows if ragged and loop in ragged]
    rows = [loop for loop in rows if loop not in last] + last
    chunk, step = sch.split(reductions[0], factors=[None, split.steps])
    sch.reorder(*tasks, chunk, *rows, step, *reductions[1:], *inner)
    if PREFETCH:
        sch.annotate(step, prefetch.KEY, split.steps)  # the next chunk, a chunk ahead
        names = ",".join(str(sch.get(loop).loop_var.name) for loop in rows)
        sch.annotate(step, prefetch.ROWS_KEY, names)  # ... shared out among the row tiles
    return tasks, chunk
