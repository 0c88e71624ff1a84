"""The packed-GEMM path of the int8 lowering (int8.py): an activation in the kernel's operand
type, the GEMM call on padded sizes, a convolution through im2col (a 1x1 conv whose
channels-last rows fill the register tiles goes to the GEMM as it is), and the schedule of
the kernel Relax fuses from a GEMM and its requantizing epilogue.

The epilogue: int8_kernels.packed_gemm is marked output-elementwise-fusable, and
layout_sink.py leaves the model's epilogue (zero-point correction, scale, bias, activation,
residual add, the next quantize) on the GEMM's own [rows, channels] output, so Relax fuses
the two into one kernel: the tensorized GEMM, then one loop nest per elementwise op over an
int32 intermediate the size of the output. The rule ``FusedEpilogue`` inlines the chain into
its last op and computes that op under the GEMM's parallel tile loop, right after the tile's
sums: the int32 tile is read back from registers and L1 instead of from a buffer of the
whole output (onnxruntime's QLinearConv does the same), and the kernel writes only the 8-bit
(or int16) result. The buffer then shrinks to one tile (TVM's buffer compaction) and the
epilogue's column loop is vectorized. A kernel where that does not fit keeps the chain as
separate parallel, vectorized loops after the GEMM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from onnxpress.backends.tvm.inline import inline_elementwise
from onnxpress.backends.tvm.int8_kernels import (
    GROUP,
    DotIsa,
    im2col,
    pack_weight,
    packed_gemm,
    round_up,
    tiles,
)
from onnxpress.backends.tvm.int8_patterns import Dequantized, Window
from onnxpress.backends.tvm.tile_schedule import schedule_elementwise

logger = logging.getLogger(__name__)


def as_operand(builder: Any, act: Dequantized, dtype: str) -> tuple[Any, int]:
    """The activation in the kernel's operand type and its zero point (uint8 <->
    int8 by a shift of 128, which moves the zero point with it; int16 holds both)."""
    from tvm import relax

    zero = int(act.zero_point.reshape(-1)[0])
    if act.dtype == dtype:
        return act.data, zero
    if dtype == "int16":
        return builder.emit(relax.op.astype(act.data, dtype)), zero
    shift = 128 if dtype == "uint8" else -128
    wide = builder.emit(relax.op.astype(act.data, "int16"))
    shifted = relax.op.add(wide, relax.const(shift, "int16"))
    return builder.emit(relax.op.astype(shifted, dtype)), zero + shift


def gemm(
    builder: Any, rows_expr: Any, rows: int, depth: int, weight_kn: np.ndarray, isa: DotIsa
) -> Any:
    """int32 [rows, n] = rows_expr ([rows, depth], the ISA's operand type) . weight_kn
    (int8 [depth, n]), in the packed dot-product kernel."""
    from tvm import relax

    cols = weight_kn.shape[1]
    rows_p, depth_p, cols_p = (
        round_up(rows, tiles(isa, cols, rows)[0]),
        round_up(depth, GROUP),
        round_up(cols, isa.lanes),
    )
    if (rows_p, depth_p) != (rows, depth):
        pad = [0, rows_p - rows, 0, depth_p - depth]
        rows_expr = builder.emit(relax.op.nn.pad(rows_expr, pad, pad_value=0.0))
    func = packed_gemm(isa, rows_p, depth_p, cols_p)
    gvar = builder.add_func(func, "onnxpress_int8_gemm")
    acc = builder.emit(
        relax.call_tir(
            gvar,
            [rows_expr, relax.const(pack_weight(isa, weight_kn))],
            relax.TensorType((rows_p, cols_p), "int32"),
        )
    )
    if (rows_p, cols_p) != (rows, cols):
        acc = builder.emit(relax.op.strided_slice(acc, axes=[0, 1], begin=[0, 0], end=[rows, cols]))
    return acc


def conv_gemm(
    builder: Any,
    act: Dequantized,
    w: np.ndarray,
    window: Window,
    out_shape: list[int],
    kernel_for: Callable[[np.ndarray], DotIsa],
) -> tuple[Any, int]:
    """int32 NCHW conv output through pad -> im2col -> packed dot-product GEMM, and
    the zero point of the operand it multiplied."""
    from tvm import relax

    batch, out_channels, out_h, out_w = out_shape
    _, in_channels, kh, kw = w.shape
    # the kernel's K order: (kh, kw, c) over the real channels, zero taps up to the depth
    # multiple (a 3-channel 7x7 stem: 147 -> 148 deep, not 7x7x4 = 196)
    taps = kh * kw * in_channels
    depth = round_up(taps, GROUP)
    padded_w = np.zeros((out_channels, depth), np.int8)
    padded_w[:, :taps] = w.transpose(0, 2, 3, 1).reshape(out_channels, taps)
    weight_kn = padded_w.T
    isa = kernel_for(weight_kn)
    data, zero = as_operand(builder, act, isa.a_dtype)
    # NHWC, padded spatially with the zero point; fused by Relax into the producer's
    # epilogue.
    top, left, bottom, right = window.padding
    data = builder.emit(relax.op.permute_dims(data, [0, 2, 3, 1]))
    if any(window.padding):
        widths = [0, 0, top, bottom, left, right, 0, 0]
        data = builder.emit(relax.op.nn.pad(data, widths, pad_value=float(zero)))
    rows = batch * out_h * out_w
    rows_p = round_up(rows, tiles(isa, out_channels, rows)[0])
    n, h, w_, c = (int(d) for d in data.ty.shape)
    pointwise = (kh, kw, *window.strides) == (1, 1, 1, 1) and (h, w_) == (out_h, out_w)
    if pointwise and rows_p == rows:  # the NHWC rows are the GEMM's operand
        flat = builder.emit(relax.op.reshape(data, [rows, c]))
        acc = gemm(builder, flat, rows, c, weight_kn[:c], isa)
        acc = builder.emit(relax.op.reshape(acc, [batch, out_h, out_w, out_channels]))
        return builder.emit(relax.op.permute_dims(acc, [0, 3, 1, 2])), zero
    kernel = im2col(
        (n, h, w_, c),
        (kh, kw),
        window.strides,
        window.dilation,
        (out_h, out_w),
        rows_p,
        depth,
        isa.a_dtype,
    )
    gvar = builder.add_func(kernel, "onnxpress_int8_im2col")
    flat = builder.emit(
        relax.call_tir(gvar, [data], relax.TensorType((rows_p, depth), isa.a_dtype))
    )
    acc = gemm(builder, flat, rows_p, depth, weight_kn, isa)
    if rows_p != rows:
        acc = builder.emit(relax.op.strided_slice(acc, axes=[0], begin=[0], end=[rows]))
    acc = builder.emit(relax.op.reshape(acc, [batch, out_h, out_w, out_channels]))
    return builder.emit(relax.op.permute_dims(acc, [0, 3, 1, 2])), zero


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
