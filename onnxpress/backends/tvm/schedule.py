"""Untuned CPU schedules: TVM's CPU pipeline with default schedules applied to each kernel.

TVM 0.27's ``cpu_generic`` pipeline legalizes and fuses ops but leaves every kernel as a
naive single-threaded loop nest. This pipeline

0. ``BlockedLayout`` (blocked_layout.py), after ``ConvAsConv2d`` (conv_as_conv2d.py: Conv1d
   and Conv3d as conv2d), ``SinkSqueeze`` (height_one.py: the ops between Conv1d layers on
   their 4-D tensors), ``TransposedAsPhases`` (transposed_phases.py: a strided transposed
   conv as one conv2d over its output phases), ``DilatedTapRegions`` (dilated_taps.py: a
   dilated conv whose taps mostly read padding as one 1x1 conv per tap over the region it
   reaches) and folding constants: float convolutions and
   the ops between them in NCHWc (with ``blocked``, the default), 3x3 stride-1 convs as
   Winograd kernels (winograd.py); what it leaves in NCHW goes on through step 1;
1. ``ConvKernelLayout`` (tile_schedule.py), before legalization:

       conv2d(x[N,C,H,W], w[O,I,KH,KW], OIHW) -> conv2d(x, permute_dims(w) : [I,KH,KW,O], IHWO)

   when a vector of output channels fits inside one group (``O / groups`` divisible by at
   least a quarter of the fp32 lanes), so that TiledReduction loads output channels as
   one vector; FoldConstant transposes constant weights once, at compile time. Depthwise
   and narrow-group convolutions keep OIHW;
2. after fusion, applies ``dlight.ApplyDefaultSchedule`` with, in order:
   ``WinogradTransforms`` (winograd_schedule.py: the input and output transforms of
   Winograd convolutions, with whatever epilogue fusion put beside them),
   ``Deinterleaved`` (strided_schedule.py: a padded input read with strided vector lanes,
   as in stride-2 depthwise convs, stored de-interleaved, then TiledReduction),
   ``TiledReduction`` (tile_schedule.py: register-tiled, vectorized, parallel conv2d /
   matmul / batch-matmul kernels), ``RowReduction`` (a sum over an input's trailing axes,
   e.g. global average pooling: W partial sums in a vector via rfactor, rows in parallel;
   it was a scalar chain of dependent adds), dlight's CPU ``GEMV`` and ``Reduction``,
   ``TiledTranspose`` (transpose_schedule.py: an elementwise kernel reading a tensor
   transposed, as int8 GEMM epilogues and layout changes do, tiled so its reads stay in
   cache), and ``LoopParallel``: a fallback that inlines elementwise chains, vectorizes the innermost
   loop of elementwise blocks, moves the innermost spatial loop of a reduction under the
   reduction loops as vector lanes, and parallelizes the outer spatial loops of big kernels.

Vector widths and register counts come from the target's CPU features (AVX-512 16 fp32
lanes, AVX2 8, SSE/NEON 4). Rules that do not apply leave the kernel to the next rule, and
every schedule keeps each output's arithmetic, so results match the unscheduled pipeline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from onnxpress.backends.tvm.attention_schedule import fused_attention_pass
from onnxpress.backends.tvm.blocked_layout import blocked_layout_pass
from onnxpress.backends.tvm.conv_as_conv2d import conv_as_conv2d_pass
from onnxpress.backends.tvm.conv_packed import conv_kernel_layout_pass, legalize_passes
from onnxpress.backends.tvm.depthwise_schedule import depthwise_rule
from onnxpress.backends.tvm.dilated_taps import dilated_tap_regions_pass
from onnxpress.backends.tvm.fast_math import fast_math_pass
from onnxpress.backends.tvm.height_one import sink_squeeze_pass
from onnxpress.backends.tvm.inline import inline_elementwise
from onnxpress.backends.tvm.int8_gemm import epilogue_rule
from onnxpress.backends.tvm.sibling_matmul import sibling_matmul_pass
from onnxpress.backends.tvm.strided_schedule import deinterleaved_rule
from onnxpress.backends.tvm.tile_schedule import (
    MIN_PARALLEL_MACS,
    reverse_inline,
    schedule_elementwise,
    tiled_reduction_rule,
    vector_lanes,
    vector_registers,
    vector_width,
)
from onnxpress.backends.tvm.transpose_schedule import tiled_transpose_rule
from onnxpress.backends.tvm.transposed_phases import transposed_as_phases_pass
from onnxpress.backends.tvm.winograd_schedule import winograd_rule

logger = logging.getLogger(__name__)


def _loop_parallel_rule(lanes: int) -> Any:
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    class LoopParallel(dl.ScheduleRule):
        """Inline elementwise chains, vectorize inner loops, parallelize big kernels."""

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc):
                return None
            for vector_reductions in (True, False):
                try:
                    sch = s_tir.Schedule(func)
                    changed = inline_elementwise(sch)
                    for block in sch.get_child_blocks(sch.get_sblock("root")):
                        if sch.get(block).init is None:
                            changed |= schedule_elementwise(sch, block, lanes)
                        else:
                            changed |= _schedule_reduction(sch, block, lanes, vector_reductions)
                except Exception as exc:  # a rule that does not fit: try the simpler one
                    logger.debug("LoopParallel(%s) skipped a kernel: %s", vector_reductions, exc)
                    continue
                return sch if changed else None
            return None

    return LoopParallel()


def _schedule_reduction(sch: Any, block: Any, lanes: int, vector_reductions: bool) -> bool:
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    if not loops or len(kinds) != len(loops):
        return False
    extents = [int(sch.get(loop).extent) for loop in loops]
    spatial = kinds.index(2) if 2 in kinds else len(kinds)
    if spatial == 0 or any(k != 2 for k in kinds[spatial:]):
        return False
    total = math.prod(extents)
    changed = False
    width = vector_width(extents[spatial - 1], lanes) if spatial >= 2 else 0
    inner = None
    if vector_reductions and width:
        # (spatial..., j, reductions...) -> (spatial..., j_outer, reductions..., j_inner):
        # the inner spatial loop becomes a vector lane loop under the reduction loops.
        outer, inner = sch.split(loops[spatial - 1], factors=[None, width])
        sch.reorder(outer, *loops[spatial:], inner)
        sch.vectorize(inner)
        loops = [*loops[: spatial - 1], outer, *loops[spatial:]]
        changed = True
    lead = loops[: max(1, spatial - 1)]
    if total >= MIN_PARALLEL_MACS:
        sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
        changed = True
    if inner is not None:
        init = sch.decompose_reduction(block, loops[spatial])
        sch.vectorize(sch.get_loops(init)[-1])
    return changed


def _row_reduction_rule(lanes: int) -> Any:
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    class RowReduction(dl.ScheduleRule):
        """A sum over an input's trailing axes (global average pooling, the squeeze of
        squeeze-excitation): the run is fused, split into W lanes, and ``rfactor`` keeps W
        partial sums in a vector that the final block adds up."""

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc):
                return None
            try:
                sch = s_tir.Schedule(func)
                return sch if _row_reduction(sch, lanes) else None
            except Exception as exc:  # a reduction of another shape: the next rule
                logger.debug("RowReduction skipped a kernel: %s", exc)
                return None

    return RowReduction()


def _row_reduction(sch: Any, lanes: int) -> bool:
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if sch.get(b).init is not None]
    if len(reductions) != 1:
        return False
    block = reductions[0]
    stmt = sch.get(block)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    spatial = kinds.index(2) if 2 in kinds else len(kinds)
    loops = sch.get_loops(block)
    if spatial == len(kinds) or set(kinds[spatial:]) != {2} or len(loops) != len(kinds):
        return False
    extents = [int(iv.dom.extent) for iv in stmt.iter_vars]
    inputs = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
    reduced = [iv.var for iv in stmt.iter_vars[spatial:]]
    if len(inputs) != 1 or not _trailing(inputs[0], reduced, extents[spatial:]):
        return False
    run = math.prod(extents[spatial:])
    width = vector_width(run, lanes)
    if not width or run == width:
        return False
    fused = sch.fuse(*loops[spatial:]) if len(loops) - spatial > 1 else loops[spatial]
    _, lane = sch.split(fused, factors=[None, width])
    partial = sch.rfactor(lane, factor_axis=spatial)
    rf_loops = sch.get_loops(partial)  # spatial..., run / W, W (the lanes, innermost)
    outer = sch.fuse(*rf_loops[:spatial]) if spatial > 1 else rf_loops[0]
    if math.prod(extents) >= MIN_PARALLEL_MACS // 4:
        sch.parallel(outer)
    sch.vectorize(sch.get_loops(partial)[-1])
    init = sch.decompose_reduction(partial, sch.get_loops(partial)[1])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.reverse_compute_at(block, outer)
    for consumer in sch.get_consumers(block):  # mean's divide
        reverse_inline(sch, block, consumer)
    return True


def _trailing(read: Any, reduced: list[Any], extents: list[int]) -> bool:
    """Whether ``read`` indexes its last dimensions with exactly the reduction variables, in
    order and over the whole dimension: the reduced values are one contiguous run."""
    index = [rng.min for rng in read.region]
    shape = [int(d) for d in read.source.shape]
    tail = index[len(index) - len(reduced) :]
    return (
        len(index) >= len(reduced)
        and all(e.same_as(v) for e, v in zip(tail, reduced, strict=True))
        and shape[len(shape) - len(extents) :] == extents
    )


def schedule_rules(target: Any) -> list[Any]:
    """The dlight rules of the pipeline for an llvm target, first match wins."""
    from tvm.s_tir import dlight as dl

    lanes = vector_lanes(target)
    return [
        epilogue_rule(lanes),
        winograd_rule(lanes),
        depthwise_rule(lanes, vector_registers(target)),
        deinterleaved_rule(lanes, vector_registers(target)),
        tiled_reduction_rule(lanes, vector_registers(target)),
        _row_reduction_rule(lanes),
        _with_reduction(dl.cpu.GEMV()),
        _only_big_kernels(_with_reduction(dl.cpu.Reduction())),
        tiled_transpose_rule(lanes),
        _loop_parallel_rule(lanes),
    ]


def _restricted(rule: Any, accepts: Callable[[Any], bool]) -> Any:
    """``rule`` for the block kernels whose schedule ``accepts``; None for the others."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    class Restricted(dl.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc):
                return None
            try:
                accepted = accepts(s_tir.Schedule(func))
            except Exception as exc:  # no root block: a hand-written kernel
                logger.debug("not a block kernel: %s", exc)
                return None
            return rule.apply(func, target, tunable) if accepted else None

    return Restricted()


def _with_reduction(rule: Any) -> Any:
    """``rule`` restricted to kernels with a reduction block. dlight's GEMV and Reduction
    inline every spatial block before they look at the kernel, which a long elementwise
    chain that reads each value twice cannot afford (inline.py); a kernel without a
    reduction is neither's to schedule."""

    def has_reduction(sch: Any) -> bool:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        return any(sch.get(block).init is not None for block in blocks)

    return _restricted(rule, has_reduction)


def _only_big_kernels(rule: Any) -> Any:
    """``rule`` restricted to kernels with at least MIN_PARALLEL_MACS loop iterations in
    one block: dlight's CPU Reduction parallelizes unconditionally, which costs more than
    it saves on a kernel of a few microseconds."""
    return _restricted(rule, lambda sch: _largest_block(sch) >= MIN_PARALLEL_MACS)


def _largest_block(sch: Any) -> int:
    """The most loop iterations of any block of the kernel (symbolic extents count as big)."""
    largest = 0
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        extents = [sch.get(loop).extent for loop in sch.get_loops(block)]
        if not all(hasattr(extent, "value") for extent in extents):
            return MIN_PARALLEL_MACS
        largest = max(largest, math.prod(int(extent.value) for extent in extents))
    return largest


def layout_passes(target: Any, *, blocked: bool = True) -> list[Any]:
    """The first passes of cpu_lowering_passes: batch norm decomposed into elementwise ops
    (so it fuses into the conv before it and runs blocked), constants folded, and with
    ``blocked`` the BlockedLayout pass."""
    import tvm

    transform = tvm.relax.transform
    layout = [blocked_layout_pass(vector_lanes(target))] if blocked else []
    return [
        transform.DecomposeOpsForInference(),
        transform.CanonicalizeBindings(),  # batch_norm(...)[0] -> its first output
        conv_as_conv2d_pass(),  # conv1d, conv3d: the blocked layout takes them as conv2d
        sink_squeeze_pass(),  # ... and the ops between Conv1d layers as 4-D
        transform.CanonicalizeBindings(),  # the cancelled expand_dims: aliases
        transform.DeadCodeElimination(),
        transform.FoldConstant(),
        # strided transposed convs as a conv2d per output phase; after the folding, so the
        # float weights of a QDQ model's transposed convs (kept float by int8.py) qualify
        transposed_as_phases_pass(),
        dilated_tap_regions_pass(),  # ASPP-like dilated convs: one 1x1 conv per tap region
        transform.CanonicalizeBindings(),
        *layout,
    ]


def cpu_lowering_passes(target: Any, *, blocked: bool = True) -> list[Any]:
    """Layouts, fast math, legalization and fusion for an llvm target, before scheduling:
    the kernels the default schedules (and MetaSchedule, tune.py) see. ``blocked``: convs
    and the ops between them in NCHWc (blocked_layout.py); else NCHW throughout, with
    conv_packed.py's kernels (what the blocked pass leaves in NCHW always gets those)."""
    import tvm

    lanes = vector_lanes(target)
    return [
        *layout_passes(target, blocked=blocked),
        sibling_matmul_pass(),  # first: the attention reads q and v from the merged product
        fused_attention_pass(lanes),
        tvm.relax.transform.DeadCodeElimination(),
        fast_math_pass(),
        conv_kernel_layout_pass(lanes),
        *legalize_passes(lanes, vector_registers(target)),
    ]


def cpu_pipeline(target: Any, *, blocked: bool = True) -> Any:
    """A relax pipeline for an llvm target: cpu_generic plus default schedules
    (``blocked``: see cpu_lowering_passes)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight as dl

    rules = schedule_rules(target)

    @tvm.transform.module_pass(opt_level=0, name="OnnxpressCpuPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                [
                    *cpu_generic.library_dispatch_passes(target),
                    *cpu_lowering_passes(target, blocked=blocked),
                    dl.ApplyDefaultSchedule(*rules),
                    *cpu_generic.dataflow_lower_passes(target),
                    *cpu_generic.finalize_passes(target),
                ]
            )
            return seq(mod)

    return _pipeline
