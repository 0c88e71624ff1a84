"""Untuned register-tiled CPU schedule for conv2d / matmul / batch-matmul kernels and the
target's vector lanes and registers (the conv weight layout it wants:
``conv_packed.conv_kernel_layout_pass``).

dlight rule ``TiledReduction``, for a kernel whose one reduction block is
``out[s...] += a[...] * b[...]`` (a legalized conv2d, matmul or batch matmul), with
producers (padding, transposes) and consumers (bias, activation, residual) around it:

    plan: the vector axis v in W lanes, S vectors side by side, P rows (tile_plan.py);
    loops:  other spatial..., rows/P, v/(S*W)  |  reductions (small kernel windows
            unrolled)  |  rows%P (unrolled), S (unrolled), v%W (vector)
    a local P x S*W accumulator tile (v innermost): S vector loads + P broadcasts + S*P
    FMAs a step; copy-only producers inlined, elementwise consumers inlined into the
    write-back, which runs one accumulator vector at a time (scattered stores when v is
    not the output's last axis: cheaper than reading the tile transposed, which cost as
    much as a 64-deep reduction); outer spatial loops parallel when there are enough
    multiply-adds.

W: the target's lanes (AVX-512 16, AVX2 8, SSE/NEON 4), else a divisor of the axis; P: for
one vector, 14 of 32 registers and 10 of 16 (LLVM keeps loads of the unrolled window live
too); S*P up to three quarters of them for a stack, with at least 8 accumulators
(FMA chains) where a tile can have them.
Each output's reduction order is unchanged, so results match the naive kernel. A kernel
that does not fit returns None (next rule).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from onnxpress.backends.tvm.inline import inline_elementwise
from onnxpress.backends.tvm.reduction_split import plan_split, split_reduction
from onnxpress.backends.tvm.tile_plan import (
    MAX_UNROLLED_RAGGED,
    TilePlan,
    lane_strides,
    plan_tile,
    row_tile,
    vector_width,
)

__all__ = [
    "MIN_PARALLEL_MACS",
    "TilePlan",
    "inline_consumers",
    "lane_strides",
    "one_reduction",
    "plan_tile",
    "reduction_rule",
    "reverse_inline",
    "row_tile",
    "schedule_elementwise",
    "schedule_leftovers",
    "schedule_tile",
    "tiled_reduction_rule",
    "vector_lanes",
    "vector_registers",
    "vector_width",
]

logger = logging.getLogger(__name__)

MIN_PARALLEL_MACS = 1 << 20  # multiply-adds below which a kernel stays single-threaded
MIN_PARALLEL_GEMV = 1 << 17  # the same for a tile without rows: each weight read once
MIN_PARALLEL_ELEMENTS = 1 << 16  # same for elementwise blocks (pad, unfused epilogues)
MAX_UNROLLED_WINDOW = 16  # reduction window (kh * kw) unrolled inside the tile


def vector_lanes(target: Any, element_bits: int = 32) -> int:
    """Lanes of one SIMD register on an llvm target: AVX-512 512 bits, AVX/AVX2 256,
    anything else (SSE, NEON, unknown) 128."""
    from tvm.target import codegen

    bits = 128
    try:
        if codegen.target_has_features("avx512f", target):
            bits = 512
        elif codegen.target_has_features("avx", target):
            bits = 256
    except Exception as exc:  # a target LLVM cannot describe: keep 128-bit vectors
        logger.debug("no CPU features for %s: %s", target, exc)
    return max(1, bits // element_bits)


def vector_registers(target: Any) -> int:
    """Architectural vector registers: 32 with AVX-512 or on AArch64, else 16."""
    from tvm.target import codegen

    try:
        if codegen.target_has_features("avx512f", target):
            return 32
    except Exception:
        return 16
    triple = str(target.attrs.get("mtriple", "")) if hasattr(target, "attrs") else ""
    return 32 if triple.startswith(("aarch64", "arm64")) else 16


def schedule_tile(sch: Any, block: Any, plan: TilePlan) -> None:
    """Apply a TilePlan to its reduction block (see the module docstring)."""
    _inline_copies(sch, block)
    inline_elementwise(sch)  # an epilogue DAG (x * sigmoid(x)) becomes one chain
    loops = sch.get_loops(block)
    spatial, reductions = loops[: plan.spatial], loops[plan.spatial :]
    acc = sch.cache_write(block, 0, "global")
    inline_consumers(sch, acc)
    outer = list(spatial)
    if plan.stack > 1 and plan.stack_axis is None:
        v_outer, v_stack, v_inner = sch.split(
            spatial[plan.vector], factors=[None, plan.stack, plan.width]
        )
        inner = [v_stack, v_inner]
    else:
        v_outer, v_inner = sch.split(spatial[plan.vector], factors=[None, plan.width])
        inner = [v_inner]
    if plan.stack > 1 and plan.stack_axis is not None:
        s_outer, s_inner = sch.split(spatial[plan.stack_axis], factors=[None, plan.stack])
        outer[plan.stack_axis] = s_outer
        inner.insert(0, s_inner)
    outer[plan.vector] = v_outer
    ragged = []
    for axis, tile in plan.rows:
        r_outer, r_inner = sch.split(spatial[axis], factors=[None, tile])
        outer[axis] = r_outer
        inner.insert(0, r_inner)
        if plan.extents[axis] % tile:
            ragged.append(r_outer)
    split = plan_split(plan)
    if split:  # the weight panel does not stay in L1: reduction_split.py
        if split.axis is not None and outer[split.axis] in ragged:  # cut for the threads
            ragged = []
        outer, first = split_reduction(sch, plan, outer, reductions, inner, split, ragged)
        reductions = reductions[1:]
    else:
        outer, first = _vector_blocks_first(outer, plan), reductions[0]
        # a ragged row tile (17 columns in tiles of 10) guards each of its rows with a
        # condition on its outer loop: that loop stays out of the fused parallel index,
        # innermost of the outer loops, and unrolled where it is short, so each copy of
        # the reduction has its conditions folded (a 1x1 conv at 17 x 17: 2.3x
        # onnxruntime's time -> 1.8x; squeezenet1_1 14% faster, BENCHMARKS run 21)
        if len(ragged) == len(outer):  # nothing else to run in parallel
            ragged = []
        outer = [loop for loop in outer if loop not in ragged] + ragged
        sch.reorder(*outer, *reductions, *inner)
    # the accumulator tile: other axes first, then the rows, then the vector lanes
    stacked = [plan.stack_axis] if plan.stack > 1 and plan.stack_axis is not None else []
    tiled = [axis for axis, _ in reversed(plan.rows)] + stacked + [plan.vector]
    order = [a for a in range(plan.spatial) if a not in tiled] + tiled
    if order != list(range(plan.spatial)):
        sch.transform_layout(block, ("write", 0), _permutation(order))
    sch.reverse_compute_at(acc, outer[-1])
    sch.vectorize(v_inner)
    for loop in inner[:-1]:
        sch.unroll(loop)
    for depth in range(1, len(reductions) + 1):  # the kernel window, innermost first
        if math.prod(plan.extents[-depth:]) > MAX_UNROLLED_WINDOW:
            break
        sch.unroll(reductions[-depth])
    parallel = outer if split else outer[: len(outer) - len(ragged)]
    fused = sch.fuse(*parallel) if len(parallel) > 1 else parallel[0]
    if plan.macs >= (MIN_PARALLEL_MACS if plan.rows else MIN_PARALLEL_GEMV):
        sch.parallel(fused)
    init = sch.decompose_reduction(block, first)
    # the loops above an init / write-back block's tile loops
    tiles = 1 if split else 1 + len(ragged)
    _vectorize_tail(sch, init, plan.width, unroll=split is None, outer=tiles)
    if plan.vector == plan.spatial - 1 or not _write_back_by_vectors(sch, acc, plan, tiles):
        _vectorize_tail(sch, acc, plan.width, unroll=False, outer=tiles)  # unrolled: no gain
    for loop in ragged:  # a few tiles: one copy of the reduction each, the conditions folded
        if int(sch.get(loop).extent) <= MAX_UNROLLED_RAGGED:
            sch.unroll(loop)


def _vector_blocks_first(outer: list[Any], plan: TilePlan) -> list[Any]:
    """The outer tile loops with the vector axis' blocks ahead of the row axes' blocks
    when the vector side of the tile is the longer one (S*W > P): each operand panel that
    varies with the inner of the two outer loops is then re-read fewer times (a 1x1 conv
    as a GEMM: the image is read once and the small weight panel many times, instead of
    the image once per row block of output channels)."""
    row_axes = sorted(axis for axis, _ in plan.rows)
    rows = math.prod(tile for _, tile in plan.rows)
    if not row_axes or row_axes[0] > plan.vector or plan.width * plan.stack <= rows:
        return outer
    moved = [loop for index, loop in enumerate(outer) if index != plan.vector]
    moved.insert(row_axes[0], outer[plan.vector])
    return moved


def _write_back_by_vectors(sch: Any, acc: Any, plan: TilePlan, outer: int = 1) -> bool:
    """Write the tile back one accumulator vector at a time (the vector axis innermost,
    W lanes) when that axis is not the output's last: the register tile is read in its
    own order and the epilogue (bias, residual, activation) runs on whole vectors; the
    stores scatter W lanes. Returns False (nothing changed) if the loops do not fit."""
    loops = sch.get_loops(acc)[outer:]
    extents = [int(sch.get(loop).extent) for loop in loops]
    span = plan.width * plan.stack
    matches = [i for i, e in enumerate(extents) if e == span]
    if len(matches) != 1:  # none, or a row loop of the same length: do not guess
        return False
    position = matches[0]
    vector = loops[position]
    outer, lanes = sch.split(vector, factors=[None, plan.width])
    rest = [loop for i, loop in enumerate(loops) if i != position]
    sch.reorder(outer, *rest, lanes)
    sch.vectorize(lanes)
    return True


def _permutation(order: list[int]) -> Any:
    return lambda *axes: tuple(axes[a] for a in order)


def _vectorize_tail(sch: Any, block: Any, width: int, unroll: bool, outer: int = 1) -> None:
    """Vectorize the innermost tile loop of an init / write-back block (under the ``outer``
    outer loops) when it has ``width`` iterations; unroll the others if ``unroll``."""
    loops = sch.get_loops(block)[outer:]
    if not loops:
        return
    extent = int(sch.get(loops[-1]).extent)
    if extent % width == 0:
        if extent > width:  # a stacked tile: several vectors
            sch.split(loops[-1], factors=[None, width])
            loops = sch.get_loops(block)[outer:]
        sch.vectorize(loops[-1])
        loops = loops[:-1]
    for loop in loops if unroll else []:
        sch.unroll(loop)


def _inline_copies(sch: Any, block: Any) -> None:
    """Inline producers that only copy (a zero-width "padding" of a 1x1 or unpadded conv)."""
    from tvm.ir.expr import TensorLoad
    from tvm.tirx.stmt import BufferStore

    for producer in sch.get_producers(block):
        body = sch.get(producer).body
        if isinstance(body, BufferStore) and isinstance(body.value, TensorLoad):
            try:
                sch.compute_inline(producer)
            except Exception as exc:  # read by other blocks too
                logger.debug("copy not inlined: %s", exc)


def reverse_inline(sch: Any, producer: Any, consumer: Any) -> bool:
    """``sch.reverse_compute_inline(consumer)`` into ``producer`` where it is sound; whether
    it was done. TVM 0.27 also inlines a consumer that reads only part of the producer's
    output (a Slice after a conv: wav2vec2's SamePad) and then stores every producer
    iteration through the consumer's indices, past the end of each output row; such a
    consumer (fewer iterations than the elements the producer writes) stays a block."""
    writes = sch.get(producer).writes
    extents = [iv.dom.extent for iv in sch.get(consumer).iter_vars]
    if not writes or not all(hasattr(e, "value") for e in extents):
        return False
    shape = writes[0].source.shape
    if not all(hasattr(d, "value") for d in shape):
        return False
    if math.prod(int(e.value) for e in extents) != math.prod(int(d.value) for d in shape):
        return False
    try:
        sch.reverse_compute_inline(consumer)
    except Exception as exc:  # a consumer that reshapes or broadcasts: leave it
        logger.debug("epilogue not inlined: %s", exc)
        return False
    return True


def inline_consumers(sch: Any, producer: Any) -> None:
    """Inline the elementwise consumers of the write-back block into it, one at a time."""
    while True:
        consumers = sch.get_consumers(producer)
        if len(consumers) != 1 or not reverse_inline(sch, producer, consumers[0]):
            return


def schedule_elementwise(sch: Any, block: Any, lanes: int) -> bool:
    """Parallelize the outer loops and vectorize the inner loop of a spatial block."""
    loops = sch.get_loops(block)
    if not loops or any(int(iv.iter_type) != 0 for iv in sch.get(block).iter_vars):
        return False
    try:
        extents = [int(sch.get(loop).extent) for loop in loops]
    except TypeError:
        return False
    total = math.prod(extents)
    changed = False
    width = vector_width(extents[-1], lanes)
    if width:
        outer, inner = sch.split(loops[-1], factors=[None, width])
        sch.vectorize(inner)
        loops = [*loops[:-1], outer]
        changed = True
    if total >= MIN_PARALLEL_ELEMENTS and len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
        changed = True
    return changed


def schedule_leftovers(sch: Any, names: list[str], main: str, lanes: int) -> None:
    """Schedule as elementwise the blocks of ``names`` (the kernel's blocks before a rule
    scheduled its reduction ``main``) still at the root: padding, and epilogues that could
    not be inlined into the write-back."""
    left = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    for name in names:
        if name != main and name in left:
            schedule_elementwise(sch, sch.get_sblock(name), lanes)


def one_reduction(func: Any) -> tuple[Any, list[Any], Any] | None:
    """(schedule, the root's blocks, its one reduction block) of a PrimFunc, else None."""
    from tvm import s_tir, tirx

    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    reductions = [b for b in blocks if sch.get(b).init is not None]
    return (sch, blocks, reductions[0]) if len(reductions) == 1 else None


def reduction_rule(name: str, schedule: Callable[[Any, Any], bool], lanes: int) -> Any:
    """A dlight rule (class ``name``) for a kernel whose one reduction block
    ``schedule(sch, block)`` schedules (False: not this rule's kernel, next rule); blocks
    left at the root then are scheduled as elementwise (``schedule_leftovers``)."""
    from tvm.s_tir import dlight as dl

    class Rule(dl.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                found = one_reduction(func)
                if found is None:
                    return None
                sch, blocks, reduction = found
                names = [sch.get(b).name_hint for b in blocks]
                main = sch.get(reduction).name_hint
                if not schedule(sch, reduction):
                    return None
                schedule_leftovers(sch, names, main, lanes)
            except Exception as exc:
                logger.debug("%s skipped a kernel: %s", name, exc, exc_info=True)
                return None
            return sch

    Rule.__name__ = Rule.__qualname__ = name
    return Rule()


def tiled_reduction_rule(lanes: int, registers: int) -> Any:
    """The dlight rule ``TiledReduction`` (see the module docstring)."""

    def schedule(sch: Any, block: Any) -> bool:
        plan = plan_tile(sch, block, lanes, registers)
        if plan is None:
            return False
        schedule_tile(sch, block, plan)
        return True

    return reduction_rule("TiledReduction", schedule, lanes)
