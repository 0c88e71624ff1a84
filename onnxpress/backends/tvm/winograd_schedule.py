"""The dlight rule ``WinogradTransforms``: schedules the input and output transforms of
winograd.py, found by their block annotation, in whatever kernel fusion put them.

Relax's FuseOps fuses an output transform with its elementwise epilogue (bias, activation,
residual add) and, when that result feeds only the next Winograd convolution, with the
next input transform as well: one kernel may hold an output transform, its epilogue, a
layout conversion and an input transform. The rule

- output transform ``Y[n, kb, y, x, ki]``: rows and columns split into tiles of m (ragged
  tiles masked), tile loops outermost and parallel, the m x m positions of a tile
  unrolled (each ``Select`` on ``y % m``, ``x % m`` then folds to one sum of products),
  the block's lanes vectorized; elementwise consumers inlined into its store, one at a
  time, while each has a single consumer chain;
- input transform: the two separable steps per tile and vector of input channels, the
  first (``winograd_rows``) in registers under the second, both unrolled over the
  transform points; tiles and channel vectors parallel;
- any other block (a layout conversion, an epilogue that did not inline): parallel
  outer loops and a vectorized inner loop (tile_schedule.schedule_elementwise).

The batched GEMM between them is a plain reduction kernel: TiledReduction schedules it.
"""

from __future__ import annotations

import logging
from typing import Any

from onnxpress.backends.tvm.tile_plan import vector_width
from onnxpress.backends.tvm.tile_schedule import reverse_inline, schedule_elementwise
from onnxpress.backends.tvm.winograd import TILE_ANNOTATION, WINOGRAD_ANNOTATION

logger = logging.getLogger(__name__)


def _role(sch: Any, block: Any) -> str | None:
    value = sch.get(block).annotations.get(WINOGRAD_ANNOTATION)
    return None if value is None else str(value)


def _inline_epilogue(sch: Any, block: Any) -> None:
    """Inline the elementwise chain that consumes ``block`` into its store."""
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1 or _role(sch, consumers[0]) is not None:
            return
        if not reverse_inline(sch, block, consumers[0]):  # a layout change, a broadcast
            return


def schedule_output(sch: Any, block: Any, lanes: int) -> None:
    """Tile loops of m x m positions (see the module docstring)."""
    m = int(sch.get(block).annotations[TILE_ANNOTATION])
    _inline_epilogue(sch, block)
    n, kb, y, x, ki = sch.get_loops(block)
    ty, yi = sch.split(y, factors=[None, m])
    tx, xi = sch.split(x, factors=[None, m])
    sch.reorder(n, kb, ty, tx, yi, xi, ki)
    (columns,) = [b for b in sch.get_producers(block) if _role(sch, b) == "columns"]
    sch.compute_at(columns, tx)
    sch.set_scope(columns, 0, "global")
    for loop in sch.get_loops(columns)[4:-1]:
        sch.unroll(loop)
    _vectorize(sch, sch.get_loops(columns)[-1], lanes)
    sch.unroll(yi)
    sch.unroll(xi)
    _vectorize(sch, ki, lanes)
    sch.parallel(sch.fuse(n, kb, ty))


def schedule_input(sch: Any, rows: Any, block: Any, lanes: int) -> None:
    """Both separable steps per tile and channel vector (see the module docstring)."""
    e, u, p, c = sch.get_loops(block)
    width = vector_width(int(sch.get(c).extent), lanes) or int(sch.get(c).extent)
    co, ci = sch.split(c, factors=[None, width])
    sch.reorder(p, co, e, u, ci)
    sch.compute_at(rows, co)
    sch.set_scope(rows, 0, "global")
    row_e, row_j, row_c = sch.get_loops(rows)[2:]
    sch.unroll(row_e)
    sch.unroll(row_j)
    sch.vectorize(row_c)
    sch.unroll(e)
    sch.unroll(u)
    sch.vectorize(ci)
    sch.parallel(sch.fuse(p, co))


def _vectorize(sch: Any, loop: Any, lanes: int) -> None:
    extent = int(sch.get(loop).extent)
    if extent <= lanes:
        sch.vectorize(loop)
        return
    _, inner = sch.split(loop, factors=[None, vector_width(extent, lanes) or lanes])
    sch.vectorize(inner)


def schedule_winograd(sch: Any, lanes: int) -> bool:
    """Schedule every Winograd transform in ``sch``, then the blocks left; False when the
    kernel holds none."""
    root = sch.get_sblock("root")
    names = {sch.get(b).name_hint: _role(sch, b) for b in sch.get_child_blocks(root)}
    if not any(names.values()):
        return False
    for name, role in names.items():
        if role == "output":
            schedule_output(sch, sch.get_sblock(name), lanes)
    for name, role in names.items():
        if role == "input":
            block = sch.get_sblock(name)
            (rows,) = [b for b in sch.get_producers(block) if _role(sch, b) == "rows"]
            schedule_input(sch, rows, block, lanes)
    left = {sch.get(b).name_hint for b in sch.get_child_blocks(root)}
    for name, role in names.items():
        if role is None and name in left:
            schedule_elementwise(sch, sch.get_sblock(name), lanes)
    return True


def has_transform(func: Any) -> bool:
    """Whether a TIR function holds a Winograd input or output transform. tune.py leaves
    such kernels to this rule: MetaSchedule spends minutes sampling each batch of
    candidates for their unrolled, padded expressions and finds nothing faster."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    return any(_role(sch, b) for b in sch.get_child_blocks(sch.get_sblock("root")))


def winograd_rule(lanes: int) -> Any:
    """The dlight rule ``WinogradTransforms`` (see the module docstring)."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    class WinogradTransforms(dl.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc):
                return None
            try:
                sch = s_tir.Schedule(func)
                return sch if schedule_winograd(sch, lanes) else None
            except Exception as exc:
                logger.debug("WinogradTransforms skipped a kernel: %s", exc, exc_info=True)
                return None

    return WinogradTransforms()
