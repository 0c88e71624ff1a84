"""Untuned register-tiled CPU schedule for conv2d / matmul / batch-matmul kernels, the conv
weight layout it wants (``conv_kernel_layout_pass``, see schedule.py) and the target's
vector lanes and registers.

dlight rule ``TiledReduction``, for a kernel whose one reduction block is
``out[s...] += a[...] * b[...]`` (a legalized conv2d, matmul or batch matmul), with
producers (padding, transposes) and consumers (bias, activation, residual) around it:

    pick v: the spatial axis to vectorize, one that every input indexes at most in its last
        dimension (whole vectors never straddle a group: checked with the arith analyzer);
        widest vector first, then row reuse, then unit-stride loads (IHWO conv:
        out-channel; matmul: column; depthwise: output column).
    pick rows: the innermost other spatial axis that the vector loads do not depend on
        (conv: output column, then row for small images; matmul: row).
    loops:  other spatial..., rows/P, v/W  |  reductions (small kernel windows unrolled)
            |  rows%P (unrolled), v%W (vector)
    a local P x W accumulator tile (v innermost): one vector load + P broadcasts + P FMAs
    a step; copy-only producers inlined, elementwise consumers inlined into the
    write-back; outer spatial loops parallel when there are enough multiply-adds.

W: the target's lanes (AVX-512 16, AVX2 8, SSE/NEON 4), else a divisor of the axis; P: up
to half the vector registers less two (LLVM keeps loads of the unrolled window live too).
Each output's reduction order is unchanged, so results match the naive kernel. A kernel
that does not fit returns None (next rule).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MIN_PARALLEL_MACS = 1 << 20  # multiply-adds below which a kernel stays single-threaded
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


def conv_kernel_layout_pass(lanes: int) -> Any:
    """The relax pass ``ConvKernelLayout`` (see the module docstring)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not _wants_ihwo(call, lanes):
                return call
            attrs = call.attrs
            return relax.op.nn.conv2d(
                call.args[0],
                relax.op.permute_dims(call.args[1], [1, 2, 3, 0]),
                strides=attrs.strides,
                padding=attrs.padding,
                dilation=attrs.dilation,
                groups=attrs.groups,
                data_layout="NCHW",
                kernel_layout="IHWO",
                out_layout="NCHW",
                out_dtype=attrs.out_dtype,
            )

    @tvm.transform.module_pass(opt_level=0, name="ConvKernelLayout")
    def _pass(mod: Any, _ctx: Any) -> Any:
        rewriter = _Rewriter(mod)
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return _pass


def _wants_ihwo(call: Any, lanes: int) -> bool:
    if getattr(call.op, "name", "") != "relax.nn.conv2d":
        return False
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return False
    weight = call.args[1].ty
    shape = getattr(weight, "shape", None)
    if shape is None or len(shape) != 4 or not str(weight.dtype).startswith("float"):
        return False
    try:
        per_group = int(shape[0]) // int(attrs.groups)
    except TypeError:  # symbolic channel count
        return False
    return any(per_group % width == 0 for width in (lanes, lanes // 2, lanes // 4) if width >= 4)


def vector_width(extent: int, lanes: int) -> int:
    """Vector width for an axis: lanes, lanes/2 or lanes/4 (at least 4) when it divides
    ``extent`` (odd widths split into several registers: 28 -> 4, not 14), else another
    divisor in [lanes/4, lanes], else the whole axis when shorter than ``lanes``; else 0."""
    for width in (lanes, lanes // 2, lanes // 4):
        if width >= 4 and extent % width == 0:
            return width
    for width in range(lanes, max(4, lanes // 4) - 1, -1):
        if extent % width == 0:
            return width
    return extent if 4 <= extent < lanes else 0


def row_tile(extent: int, limit: int) -> int:
    """Rows per register tile: the largest divisor of ``extent`` up to ``limit`` when it is
    at least half of ``min(extent, limit)``, else ``min(extent, limit)`` (a ragged tail)."""
    cap = max(1, min(extent, limit))
    best = max(d for d in range(1, cap + 1) if extent % d == 0)
    return best if 2 * best >= cap else cap


@dataclass(frozen=True)
class TilePlan:
    """Where the register tile goes: spatial axis ``vector`` in ``width`` lanes, and
    ``rows``: (axis, tile) pairs, innermost first, whose tiles multiply to the rows of
    accumulators; axes are positions in the block's loops."""

    extents: tuple[int, ...]
    spatial: int  # the first ``spatial`` loops are spatial, the rest reductions
    vector: int
    width: int
    contiguous: bool
    rows: tuple[tuple[int, int], ...]

    @property
    def macs(self) -> int:
        return math.prod(self.extents)


def plan_tile(sch: Any, block: Any, lanes: int, registers: int) -> TilePlan | None:
    """The TilePlan of a ``out[s...] += a * b`` reduction block, or None if it does not fit."""
    stmt = sch.get(block)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    spatial = kinds.index(2) if 2 in kinds else len(kinds)
    if stmt.init is None or spatial in (0, len(kinds)) or set(kinds[spatial:]) != {2}:
        return None
    if len(stmt.writes) != 1 or not str(stmt.writes[0].source.dtype).startswith("float"):
        return None
    loops = sch.get_loops(block)
    try:
        extents = tuple(int(sch.get(loop).extent) for loop in loops)
        if extents != tuple(int(iv.dom.extent) for iv in stmt.iter_vars):
            return None
    except TypeError:  # symbolic extents
        return None
    out_index = [rng.min for rng in stmt.writes[0].region]
    axes = [iv.var for iv in stmt.iter_vars]
    if len(out_index) != spatial or any(
        not e.same_as(v) for e, v in zip(out_index, axes[:spatial], strict=True)
    ):
        return None
    best: tuple[tuple[int, bool, bool, int], TilePlan] | None = None
    for axis in range(spatial - 1, -1, -1):
        width = vector_width(extents[axis], lanes)
        strides = lane_strides(stmt.reads, axes[axis], extents[axis], width) if width else None
        if strides is None:
            continue
        contiguous = all(stride in (0, 1) for stride in strides)
        varying = [r for r in stmt.reads if _uses(r, axes[axis])]
        others = [a for a in range(spatial - 1, -1, -1) if a != axis and extents[a] > 1]
        reuse = [a for a in others if not any(_uses(r, axes[a]) for r in varying)]
        rows = _row_tiles(extents, reuse or others[:1], max(2, registers // 2 - 2))
        key = (width, bool(reuse), contiguous, axis)
        if best is None or key > best[0]:
            best = (key, TilePlan(extents, spatial, axis, width, contiguous, rows))
    return best[1] if best is not None else None


def _row_tiles(
    extents: tuple[int, ...], axes: list[int], limit: int
) -> tuple[tuple[int, int], ...]:
    """Tile the first axis (row_tile), and when it fits whole, a divisor of the next one
    with what is left of ``limit`` (a 2-D tile of output pixels for small images)."""
    if not axes:
        return ()
    first = row_tile(extents[axes[0]], limit)
    rows = [(axes[0], first)]
    if first == extents[axes[0]] and len(axes) > 1 and limit // first >= 2:
        second = max(d for d in range(1, limit // first + 1) if extents[axes[1]] % d == 0)
        if second > 1:
            rows.append((axes[1], second))
    return tuple(rows)


def _uses(read: Any, var: Any) -> bool:
    from tvm import tirx

    return any(v.same_as(var) for rng in read.region for v in tirx.analysis.undefined_vars(rng.min))


def lane_strides(reads: Any, var: Any, extent: int, width: int) -> list[int] | None:
    """For vector lanes ``var = o * width + i``, per read: 0 if no lane varies it, else the
    lane stride of its last index (-1 if not constant); None if some read varies with the
    lanes before its last dimension."""
    from tvm import tirx
    from tvm.ir import Range
    from tvm.sym import Analyzer

    dtype = str(var.ty.dtype)
    outer, inner = tirx.Var("o", dtype), tirx.Var("i", dtype)

    def lanes_at(offset: int) -> Analyzer:
        analyzer = Analyzer()
        zero = tirx.const(0, dtype)
        analyzer.bind(outer, Range.from_min_extent(zero, tirx.const(extent // width, dtype)))
        analyzer.bind(inner, Range.from_min_extent(zero, tirx.const(width, dtype)))
        analyzer.bind(var, outer * tirx.const(width, dtype) + inner + tirx.const(offset, dtype))
        return analyzer

    base, step = lanes_at(0), lanes_at(1)
    strides = []
    for read in reads:
        index = [rng.min for rng in read.region]
        varying = [
            any(v.same_as(inner) for v in tirx.analysis.undefined_vars(base.simplify(e)))
            for e in index
        ]
        if any(varying[:-1]):
            return None
        stride = Analyzer().simplify(step.simplify(index[-1]) - base.simplify(index[-1]))
        constant = int(stride) if isinstance(stride, tirx.IntImm) else -1
        strides.append(constant if varying[-1] else 0)
    return strides


def schedule_tile(sch: Any, block: Any, plan: TilePlan) -> None:
    """Apply a TilePlan to its reduction block (see the module docstring)."""
    _inline_copies(sch, block)
    loops = sch.get_loops(block)
    spatial, reductions = loops[: plan.spatial], loops[plan.spatial :]
    acc = sch.cache_write(block, 0, "local")
    _inline_consumers(sch, acc)
    v_outer, v_inner = sch.split(spatial[plan.vector], factors=[None, plan.width])
    outer = list(spatial)
    outer[plan.vector] = v_outer
    inner = [v_inner]
    for axis, tile in plan.rows:
        r_outer, r_inner = sch.split(spatial[axis], factors=[None, tile])
        outer[axis] = r_outer
        inner.insert(0, r_inner)
    sch.reorder(*outer, *reductions, *inner)
    # the accumulator tile: other axes first, then the rows, then the vector lanes
    tiled = [axis for axis, _ in reversed(plan.rows)] + [plan.vector]
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
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if plan.macs >= MIN_PARALLEL_MACS:
        sch.parallel(fused)
    init = sch.decompose_reduction(block, reductions[0])
    _vectorize_tail(sch, init, plan.width, unroll=True)
    _vectorize_tail(sch, acc, plan.width, unroll=False)  # unrolled: slower builds, no gain


def _permutation(order: list[int]) -> Any:
    return lambda *axes: tuple(axes[a] for a in order)


def _vectorize_tail(sch: Any, block: Any, width: int, unroll: bool) -> None:
    """Vectorize the innermost tile loop of an init / write-back block (under the fused
    outer loop) when it has ``width`` iterations; unroll the others if ``unroll``."""
    loops = sch.get_loops(block)[1:]
    if not loops:
        return
    if int(sch.get(loops[-1]).extent) == width:
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


def _inline_consumers(sch: Any, producer: Any) -> None:
    """Inline the elementwise consumers of the write-back block into it, one at a time."""
    while True:
        consumers = sch.get_consumers(producer)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception as exc:  # a consumer that reshapes or broadcasts: leave it
            logger.debug("epilogue not inlined: %s", exc)
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


def one_reduction(func: Any) -> tuple[Any, list[Any], Any] | None:
    """(schedule, the root's blocks, its one reduction block) of a PrimFunc, else None."""
    from tvm import s_tir, tirx

    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    reductions = [b for b in blocks if sch.get(b).init is not None]
    return (sch, blocks, reductions[0]) if len(reductions) == 1 else None


def tiled_reduction_rule(lanes: int, registers: int) -> Any:
    """The dlight rule ``TiledReduction`` (see the module docstring)."""
    from tvm.s_tir import dlight as dl

    class TiledReduction(dl.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                found = one_reduction(func)
                if found is None:
                    return None
                sch, blocks, reduction = found
                names = [sch.get(b).name_hint for b in blocks]
                plan = plan_tile(sch, reduction, lanes, registers)
                if plan is None:
                    return None
                main = sch.get(reduction).name_hint
                schedule_tile(sch, reduction, plan)
                left = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
                for name in names:  # padding, and epilogues not inlined into the write-back
                    if name != main and name in left:
                        schedule_elementwise(sch, sch.get_sblock(name), lanes)
            except Exception as exc:
                logger.debug("TiledReduction skipped a kernel: %s", exc, exc_info=True)
                return None
            return sch

    return TiledReduction()
