"""The requantizing epilogue of an int8 GEMM, computed tile by tile inside the GEMM kernel.

int8_kernels.packed_gemm is marked output-elementwise-fusable, and layout_sink.py leaves the
model's epilogue (zero-point correction, scale, bias, activation, residual add, the next
quantize) on the GEMM's own [rows, channels] output, so Relax fuses the two into one kernel:
the tensorized GEMM, then one loop nest per elementwise op over an int32 intermediate the
size of the output. This rule inlines the elementwise chain into its last op and computes
that op under the GEMM's parallel tile loop, right after the tile's sums: the int32 tile is
read back from registers and L1 instead of from a buffer of the whole output (onnxruntime's
QLinearConv does the same), and the kernel writes only the 8-bit (or int16) result. The
buffer then shrinks to one tile (TVM's buffer compaction) and the epilogue's column loop is
vectorized. A kernel where that does not fit (an op that reads its input elsewhere than its
own element) keeps the chain as separate parallel, vectorized loops after the GEMM.
"""

from __future__ import annotations

import logging
from typing import Any

from onnxpress.backends.tvm.tile_schedule import inline_elementwise, schedule_elementwise

logger = logging.getLogger(__name__)

GEMM_BLOCKS = ("C_init", "C_update")  # the blocks of packed_gemm after decompose/tensorize


def _names(sch: Any) -> list[str]:
    return [str(sch.get(b).name_hint) for b in sch.get_child_blocks(sch.get_sblock("root"))]


def has_packed_gemm(sch: Any) -> bool:
    """Whether the kernel holds one packed GEMM (its init and tensorized update blocks)."""
    names = _names(sch)
    return all(sum(n.startswith(prefix) for n in names) == 1 for prefix in GEMM_BLOCKS)


def _is_gemm(name: str) -> bool:
    return name.startswith(GEMM_BLOCKS)


def fuse_epilogue(sch: Any, lanes: int) -> bool:
    """Compute the elementwise ops after the GEMM in ``sch`` inside its tile loop; False
    (``sch`` may be partly changed: discard it) where the kernel does not fit."""
    others = [n for n in _names(sch) if not _is_gemm(n)]
    if not others:
        return False
    for name in others[:-1]:
        sch.compute_inline(sch.get_sblock(name))
    names = _names(sch)
    if _is_gemm(names[-1]):
        return False
    last = sch.get_sblock(names[-1])
    update = sch.get_sblock(next(n for n in names if n.startswith(GEMM_BLOCKS[1])))
    sch.reverse_compute_at(last, sch.get_loops(update)[0], preserve_unit_loops=False)
    loops = sch.get_loops(last)[1:]
    if loops:
        extent = int(sch.get(loops[-1]).extent)
        if extent % lanes == 0 and extent > lanes:
            _, inner = sch.split(loops[-1], factors=[None, lanes])
            sch.vectorize(inner)
        elif extent <= lanes * 4:
            sch.vectorize(loops[-1])
    return True


def separate_epilogue(sch: Any, lanes: int) -> bool:
    """The fallback: the GEMM as scheduled, the chain after it inlined into as few loop
    nests as it allows, each parallel and vectorized."""
    inline_elementwise(sch)
    for name in _names(sch):
        if not _is_gemm(name):
            schedule_elementwise(sch, sch.get_sblock(name), lanes)
    return True


def epilogue_rule(lanes: int) -> Any:
    """The dlight rule for kernels Relax fused from a packed GEMM and its epilogue."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    class FusedEpilogue(dl.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or not has_packed_gemm(s_tir.Schedule(func)):
                return None
            for schedule in (fuse_epilogue, separate_epilogue):
                sch = s_tir.Schedule(func)
                try:
                    if schedule(sch, lanes):
                        return sch
                except Exception as exc:  # a kernel that does not fit: the next way
                    logger.debug("%s skipped a kernel: %s", schedule.__name__, exc)
            return None

    return FusedEpilogue()
