"""Integer depthwise and grouped convolutions computed exactly in float registers: depthwise
in the blocked layout that the fp32 rule ``DepthwiseRows`` (depthwise_schedule.py)
schedules (``emit``), grouped as a float conv that the float schedules take (``emit_grouped``),
and so are image stems (a few input channels) on AVX2, where the int16 kernel's im2col and
padded depth cost more than the float conv (``stem``).

A depthwise conv has no dot product to hand to vpdpbusd: each output channel sums its own
kh x kw taps. Relax's int32 conv2d (the lowering's former path) widened every byte and
multiplied in int32 (vpmulld), and TiledReduction scheduled it as a generic reduction:
mobilenet_v2's 144-channel 56x56 one took 0.19 ms against 0.06 ms for the fp32 kernel. Here
each 8-bit activation is converted to float and multiplied by the float image of its int8
weight. Every product is an integer of magnitude at most 255 * 128 = 32640 and every
partial sum of ``taps`` of them at most taps * 32640, so while that stays below 2**24
(``MAX_EXACT_TAPS`` = 514 taps; a 3x3 window has 9) each float sum is the exact integer sum,
whatever the order, and its cast back to int32 is exact too:

    out[n, cb, y, x, l] = int32(sum_{ky, kx} float(in[n, y*s + ky*d, x*s + kx*d, cb*L + l])
                                               * float(w[cb*L + l, 0, ky, kx]))

``in`` is NHWC; a window position outside the image reads the zero point through a
condition on the read (a padded copy, a kernel of its own once the producer's epilogue
moved into its GEMM, cost half as much as the depthwise conv: mobilenet_v2's 96-channel
112x112 one 0.23 ms for the copy). Channels that are not a multiple of L, the target's
float vector lanes, are padded with a copy, spatial padding with them. The sums are blocked [n, C / L, oh, ow, L] in registers
and written channels-last [n, oh, ow, C]: Relax fuses the requantizing epilogue after the
kernel (layout_sink.py moves the transposes out of its way), and DepthwiseRows inlines it
into the write-back of each vector of sums, so the int32 sums never reach memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpress.backends.tvm.depthwise_schedule import KERNEL
from onnxpress.backends.tvm.grouped_kernels import pack_depthwise_weight
from onnxpress.backends.tvm.int8_patterns import Window

PRODUCT_BOUND = 255 * 128  # largest |a * w| for 8-bit activations and int8 weights
MAX_EXACT_TAPS = (1 << 24) // PRODUCT_BOUND  # taps whose float sum stays exact


def output_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Output rows (or columns) of a window over ``size`` already padded input rows."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def fits(weight: np.ndarray) -> bool:
    """Whether a depthwise or grouped weight ``[C, C_in / groups, KH, KW]`` sums few enough
    products per output for exact float sums."""
    _, per_group, kh, kw = weight.shape
    return per_group * kh * kw <= MAX_EXACT_TAPS


def depthwise_float_exact(
    data_shape: tuple[int, ...],
    data_dtype: str,
    weight_shape: tuple[int, ...],
    strides: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    zero: int = 0,
) -> Any:
    """The PrimFunc: NHWC ``data`` (8-bit), float weights ``[C / L, KH, KW, L]``
    (``pack_depthwise_weight``) -> int32 ``[n, oh, ow, C]`` (summed in blocks ``[n, C / L, oh,
    ow, L]``). ``padding`` (top, left, bottom, right): window positions outside ``data``
    read the zero point ``zero`` (a condition on the read, no padded copy)."""
    from tvm import te, tirx

    batch, height, width, _ = data_shape
    blocks, kh, kw, lanes = weight_shape
    (sy, sx), (dy, dx) = strides, dilation
    top, left, bottom, right = padding
    oh = output_size(height + top + bottom, kh, sy, dy)
    ow = output_size(width + left + right, kw, sx, dx)
    # int64 extents, as Relax's kernels have: FuseTIR joins this kernel with the epilogue
    # that follows only where their buffers agree
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    data = te.placeholder(tuple(map(i64, data_shape)), data_dtype, name="data")
    weight = te.placeholder(tuple(map(i64, weight_shape)), "float32", name="weight")
    ry = te.reduce_axis((i64(0), i64(kh)), "ry")
    rx = te.reduce_axis((i64(0), i64(kw)), "rx")

    def body(n: Any, cb: Any, y: Any, x: Any, lane: Any) -> Any:
        iy, ix = y * sy + ry * dy - top, x * sx + rx * dx - left
        value = data[n, iy, ix, cb * lanes + lane].astype("float32")
        inside = [c for c, side in ((iy >= 0, top), (ix >= 0, left)) if side] + [
            c for c, side in ((iy < height, bottom), (ix < width, right)) if side
        ]
        if inside:
            value = te.if_then_else(te.all(*inside), value, tirx.const(float(zero), "float32"))
        return te.sum(value * weight[cb, ry, rx, lane], axis=[ry, rx])

    sums = te.compute(tuple(map(i64, (batch, blocks, oh, ow, lanes))), body, name=KERNEL)
    # written channels-last: the requantizing epilogue that Relax fuses after it reads the
    # channels in order, and DepthwiseRows inlines it into the write-back of each vector
    exact = te.compute(
        tuple(map(i64, (batch, oh, ow, blocks * lanes))),
        lambda n, y, x, c: sums[n, c // lanes, y, x, c % lanes].astype("int32"),
        name="depthwise_int32",
    )
    return te.create_prim_func([data, weight, exact]).without_attr("global_symbol")


def emit(builder: Any, data: Any, zero: int, weight: np.ndarray, window: Window, lanes: int) -> Any:
    """NCHW int32 ``depthwise(data, weight)`` for NHWC 8-bit ``data`` (a Relax expression
    whose window padding reads the zero point ``zero``; channels padded up to a multiple of
    ``lanes`` with a copy) and int8 ``weight [C, 1, KH, KW]`` that ``fits``."""
    from tvm import relax

    channels, _, kh, kw = weight.shape
    extra = -channels % lanes
    top, left, bottom, right = window.padding
    padding: tuple[int, int, int, int] = (top, left, bottom, right)
    if extra:  # channels padded to whole vectors: a padded copy, spatial padding with it
        widths = [0, 0, top, bottom, left, right, 0, extra]
        data = builder.emit(relax.op.nn.pad(data, widths, pad_value=float(zero)))
        padding = (0, 0, 0, 0)
    packed = pack_depthwise_weight(weight.astype(np.float32), lanes)
    shape = tuple(int(d) for d in data.ty.shape)
    (sy, sx), (dy, dx) = window.strides, window.dilation
    out_h = output_size(shape[1] + padding[0] + padding[2], kh, sy, dy)
    out_w = output_size(shape[2] + padding[1] + padding[3], kw, sx, dx)
    out_shape = (shape[0], out_h, out_w, channels + extra)
    func = depthwise_float_exact(
        shape, str(data.ty.dtype), packed.shape, window.strides, window.dilation, padding, zero
    )
    gvar = builder.add_func(func, "onnxpress_int8_depthwise")
    nhwc = builder.emit(
        relax.call_tir(gvar, [data, relax.const(packed)], relax.TensorType(out_shape, "int32"))
    )
    # handed on as NCHW: the transpose sinks through the requantization and cancels against
    # the next integer layer's (layout_sink.py)
    if extra:
        nhwc = builder.emit(relax.op.strided_slice(nhwc, axes=[3], begin=[0], end=[channels]))
    return builder.emit(relax.op.permute_dims(nhwc, [0, 3, 1, 2]))


def emit_grouped(
    builder: Any, data: Any, zero: int, weight: np.ndarray, window: Window, groups: int
) -> Any:
    """NCHW int32 sums of a grouped conv (ResNeXt, RegNet; depthwise on targets without a
    dot-product kernel) of NCHW 8-bit ``data`` and int8 ``weight`` that ``fits``, as a float
    conv of the 8-bit values: exact by the same bound, and run by the float schedules
    (blocked layout) instead of Relax's int32 grouped conv (regnet_y_400mf int8 2.6x
    onnxruntime's time with it)."""
    from tvm import relax

    top, left, bottom, right = window.padding
    values = builder.emit(relax.op.astype(data, "float32"))
    if any(window.padding):
        widths = [0, 0, 0, 0, top, bottom, left, right]
        values = builder.emit(relax.op.nn.pad(values, widths, pad_value=float(zero)))
    sums = builder.emit(
        relax.op.nn.conv2d(
            values,
            relax.const(weight.astype(np.float32)),
            strides=window.strides,
            padding=(0, 0),
            dilation=window.dilation,
            groups=groups,
        )
    )
    return builder.emit(relax.op.astype(sums, "int32"))
