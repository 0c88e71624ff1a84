"""Strided vector loads made contiguous: the dlight rule ``Deinterleaved``, tried before
``TiledReduction`` (tile_schedule.py).

A depthwise conv with stride s keeps OIHW weights, so TiledReduction vectorizes its output
columns, and its padded input is read at ``pad[n, c, s*y + ky, s*x + kx]``: lanes s floats
apart, which LLVM assembles one float at a time (MobileNetV2's first stride-2 depthwise conv
ran at 0.8 GFLOP/s, 15% of the model). When such a read comes from a block of the same
kernel (the padding) whose last axis is a multiple of s, this rule stores that buffer
de-interleaved:

    pad[n, c, h, w]  ->  pad'[n, c, h, w % s, w // s]

so the conv reads ``pad'[n, c, s*y + ky, kx % s, x + kx // s]``: consecutive columns are
consecutive floats. The padding block writes the new layout once (a strided write per
element, as cheap as before); each output's arithmetic is unchanged, so results are
bit-identical. The transformed kernel is then scheduled by TiledReduction.
"""

from __future__ import annotations

import logging
from typing import Any

from onnxpress.backends.tvm.tile_schedule import (
    lane_strides,
    one_reduction,
    plan_tile,
    tiled_reduction_rule,
)

logger = logging.getLogger(__name__)


def deinterleave_strided_reads(sch: Any, block: Any, lanes: int, registers: int) -> bool:
    """De-interleave the producers of ``block``'s strided vector reads; True if any was."""
    plan = plan_tile(sch, block, lanes, registers)
    if plan is None or plan.contiguous:
        return False
    stmt = sch.get(block)
    var = stmt.iter_vars[plan.vector].var
    strides = lane_strides(stmt.reads, var, plan.extents[plan.vector], plan.width)
    producers = [p for p in sch.get_producers(block) if len(sch.get(p).writes) == 1]
    changed = False
    for read, stride in zip(stmt.reads, strides or [], strict=True):
        found = [p for p in producers if sch.get(p).writes[0].source.same_as(read.source)]
        if stride < 2 or not found or int(read.source.shape[-1]) % stride:
            continue
        sch.transform_layout(found[0], ("write", 0), _split_last(stride))
        changed = True
    return changed


def _split_last(step: int) -> Any:
    """The index map (..., w) -> (..., w % step, w // step)."""

    def index_map(*axes: Any) -> tuple[Any, ...]:
        return (*axes[:-1], axes[-1] % step, axes[-1] // step)

    return index_map


def deinterleaved_rule(lanes: int, registers: int) -> Any:
    """The dlight rule ``Deinterleaved`` (see the module docstring); None when no read of
    the kernel's one reduction is strided across vector lanes."""
    from tvm.s_tir import dlight as dl

    tiled = tiled_reduction_rule(lanes, registers)

    class Deinterleaved(dl.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                found = one_reduction(func)
                if found is None:
                    return None
                sch, _, reduction = found
                if not deinterleave_strided_reads(sch, reduction, lanes, registers):
                    return None
                transformed = sch.mod["main"]
            except Exception as exc:
                logger.debug("Deinterleaved skipped a kernel: %s", exc, exc_info=True)
                return None
            return tiled.apply(transformed, target, tunable)

    return Deinterleaved()
