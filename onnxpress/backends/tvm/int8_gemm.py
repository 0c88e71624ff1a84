"""The packed-GEMM path of the int8 lowering (int8.py): an activation in the kernel's operand
type, the GEMM call on padded sizes, and a convolution through im2col (a 1x1 conv whose
channels-last rows fill the register tiles goes to the GEMM as it is)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

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
    channels = round_up(in_channels, GROUP)
    depth = kh * kw * channels
    padded_w = np.zeros((out_channels, kh, kw, channels), np.int8)
    padded_w[..., :in_channels] = w.transpose(0, 2, 3, 1)
    weight_kn = padded_w.reshape(out_channels, depth).T  # the kernel's K order
    isa = kernel_for(weight_kn)
    data, zero = as_operand(builder, act, isa.a_dtype)
    # NHWC, padded spatially and on channels with the zero point (float 0; the extra
    # channels meet zero weights); fused by Relax into the producer's epilogue.
    top, left, bottom, right = window.padding
    data = builder.emit(relax.op.permute_dims(data, [0, 2, 3, 1]))
    if any(window.padding) or channels != in_channels:
        widths = [0, 0, top, bottom, left, right, 0, channels - in_channels]
        data = builder.emit(relax.op.nn.pad(data, widths, pad_value=float(zero)))
    rows = batch * out_h * out_w
    rows_p = round_up(rows, tiles(isa, out_channels, rows)[0])
    n, h, w_, c = (int(d) for d in data.ty.shape)
    pointwise = (kh, kw, *window.strides) == (1, 1, 1, 1) and (h, w_) == (out_h, out_w)
    if pointwise and rows_p == rows:  # the NHWC rows are the GEMM's operand
        flat = builder.emit(relax.op.reshape(data, [rows, depth]))
        acc = gemm(builder, flat, rows, depth, weight_kn, isa)
        acc = builder.emit(relax.op.reshape(acc, [batch, out_h, out_w, out_channels]))
        return builder.emit(relax.op.permute_dims(acc, [0, 3, 1, 2])), zero
    kernel = im2col(
        (n, h, w_, c),
        (kh, kw),
        window.strides,
        window.dilation,
        (out_h, out_w),
        rows_p,
        isa.a_dtype,
    )
    gvar = builder.add_func(kernel, "onnxpress_int8_im2col")
    patches = builder.emit(
        relax.call_tir(gvar, [data], relax.TensorType((rows_p, kh, kw, channels), isa.a_dtype))
    )
    flat = builder.emit(relax.op.reshape(patches, [rows_p, depth]))
    acc = gemm(builder, flat, rows_p, depth, weight_kn, isa)
    if rows_p != rows:
        acc = builder.emit(relax.op.strided_slice(acc, axes=[0], begin=[0], end=[rows]))
    acc = builder.emit(relax.op.reshape(acc, [batch, out_h, out_w, out_channels]))
    return builder.emit(relax.op.permute_dims(acc, [0, 3, 1, 2])), zero
