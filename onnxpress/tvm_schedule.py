"""Untuned CPU schedules: TVM's CPU pipeline with default schedules applied to each kernel.

TVM 0.27's ``cpu_generic`` pipeline legalizes and fuses ops but leaves every kernel as a
naive single-threaded loop nest. This pipeline inserts, after fusion,
``dlight.ApplyDefaultSchedule`` with dlight's CPU rules (GEMV, Reduction) and then
``LoopParallel``: a fallback that parallelizes the leading spatial loops of every kernel
still unscheduled, vectorizes the innermost loop of injective blocks and, in reductions
(matmul, conv), moves the innermost spatial loop under the reduction loops as vector lanes. Rules that do
not apply leave the kernel as it was, so the result is always the plain pipeline or better.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

VECTOR_LANES = 8  # fp32 lanes of AVX2 / two NEON registers
MIN_PARALLEL_WORK = 4096  # iterations below which a kernel stays single-threaded


def _loop_parallel_rule() -> Any:
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    class LoopParallel(dl.ScheduleRule):
        """Parallelize leading spatial loops; vectorize the inner loop of injective blocks."""

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc):
                return None
            for vector_reductions in (True, False):
                try:
                    sch = s_tir.Schedule(func)
                    root = sch.get_sblock("root") if _has_root(sch) else None
                    blocks = sch.get_child_blocks(root) if root is not None else []
                    changed = False
                    for block in blocks:
                        changed |= _schedule_block(sch, block, vector_reductions)
                except Exception as exc:  # a rule that does not fit: try the simpler one
                    logger.debug("LoopParallel(%s) skipped a kernel: %s", vector_reductions, exc)
                    continue
                return sch if changed else None
            return None

    return LoopParallel()


def _has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
    except Exception:
        return False
    return True


def _lanes(extent: int) -> int:
    """Vector width for a loop: VECTOR_LANES when it divides the extent, else its largest
    divisor in [4, 2 * VECTOR_LANES] (28 -> 14, 14 -> 14), else 0 (not vectorized)."""
    if extent % VECTOR_LANES == 0:
        return VECTOR_LANES
    for lanes in range(2 * VECTOR_LANES, 3, -1):
        if extent % lanes == 0:
            return lanes
    return 0


def _schedule_block(sch: Any, block: Any, vector_reductions: bool) -> bool:
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if not loops or len(kinds) != len(loops):
        return False
    extents = [int(sch.get(loop).extent) for loop in loops]
    spatial = 0
    while spatial < len(kinds) and kinds[spatial] == 0:  # IterVar.DataPar
        spatial += 1
    total = 1
    for extent in extents:
        total *= extent
    changed = False
    injective = spatial == len(loops)
    lanes = _lanes(extents[-1])
    if injective and spatial >= 1 and lanes:
        outer, inner = sch.split(loops[-1], factors=[None, lanes])
        sch.vectorize(inner)
        loops = [*loops[:-1], outer]
        changed = True
    reduction = (
        not injective
        and spatial >= 2
        and all(k == 2 for k in kinds[spatial:])  # IterVar.CommReduce
        and _lanes(extents[spatial - 1])
    )
    if vector_reductions and reduction:
        # (spatial..., j, reductions...) -> (spatial..., j_outer, reductions..., j_inner):
        # the inner spatial loop becomes a vector lane loop under the reduction loops.
        lanes = _lanes(extents[spatial - 1])
        outer, inner = sch.split(loops[spatial - 1], factors=[None, lanes])
        sch.reorder(outer, *loops[spatial:], inner)
        sch.decompose_reduction(block, loops[spatial])
        sch.vectorize(inner)
        loops = [*loops[: spatial - 1], outer, *loops[spatial:]]
        changed = True
    lead = loops[: max(1, spatial - 1)] if spatial > 1 else loops[:spatial]
    if lead and total >= MIN_PARALLEL_WORK:
        fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        sch.parallel(fused)
        changed = True
    return changed


def cpu_pipeline(target: Any) -> Any:
    """A relax pipeline for an llvm target: cpu_generic plus default schedules."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0, name="OnnxpressCpuPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                [
                    *cpu_generic.library_dispatch_passes(target),
                    *cpu_generic.legalize_passes(target),
                    dl.ApplyDefaultSchedule(
                        dl.cpu.GEMV(), dl.cpu.Reduction(), _loop_parallel_rule()
                    ),
                    *cpu_generic.dataflow_lower_passes(target),
                    *cpu_generic.finalize_passes(target),
                ]
            )
            return seq(mod)

    _ = relax
    return _pipeline
