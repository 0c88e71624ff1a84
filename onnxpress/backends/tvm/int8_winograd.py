"""Exact integer Winograd F(2x2, 3x3) for quantized 3x3 stride-1 convolutions (int8.py).

On x86 AVX2 without VNNI a layer whose weights could saturate vpmaddubsw's int16 pair sums
runs on the exact int16 kernel (vpmaddwd: 16 products per instruction). Winograd's minimal
filtering computes a 2x2 output tile from a 4x4 input tile with 16 products per channel
instead of 36, and stays exact in integers when the transforms are scaled to integers:

    d = x - zero point          (int16, |d| <= 255; padding is the zero point, so d = 0)
    V = B^T d B                 (|V| <= 4 * 255 = 1020: int16)
    U = (2G) g (2G)^T           (|U| <= 9 * 128 = 1152: int16, computed at compile time)
    M[t] = sum_c V[t, c] U[t, c]    (vpmaddwd GEMM per transform point t, int32)
    Y = (A^T M A) / 4           (an exact multiple of 4; int32 arithmetic wraps, but the
                                 result, 4 x the zero-point-corrected sum, fits in int32
                                 when 4 * 255 * sum|w| < 2^31 for every output channel,
                                 which ``fits`` checks, so the wrapped value is exact)

So Y is the exact int32 accumulator of the direct kernel, zero point already subtracted,
for any weights (no saturation risk) with 2.25x fewer multiplies. Three kernels: the input
transform (NHWC int16, padded in Relax), the batched GEMM (int8_kernels.packed_gemm with a
batch of 16), the output transform to NHWC int32; the float epilogue follows as for the
im2col path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpress.backends.tvm.int8_kernels import (
    GROUP,
    DotIsa,
    pack_weight,
    packed_gemm,
    round_up,
    tiles,
)
from onnxpress.backends.tvm.winograd import combine, select_by_index

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.int64)
G2 = np.array([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]], np.int64)  # 2 G
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.int64)
POINTS = 16  # 4 x 4 transform points
MIN_CHANNELS = 16  # fewer: the transforms cost more than they save
ACTIVATION_BOUND = 255  # |x - zero point| for 8-bit activations


def fits(w: np.ndarray, strides: tuple[int, int], dilation: tuple[int, int]) -> bool:
    """Whether a conv with int8 weights ``w`` [O, I, kh, kw] can run as exact F(2x2, 3x3)."""
    out_channels, in_channels, kh, kw = w.shape
    if (kh, kw) != (3, 3) or strides != (1, 1) or dilation != (1, 1):
        return False
    if min(in_channels, out_channels) < MIN_CHANNELS:
        return False
    largest = int(np.abs(w.astype(np.int64)).sum(axis=(1, 2, 3)).max())
    return 4 * ACTIVATION_BOUND * largest < 2**31


def transform_weight(w: np.ndarray) -> np.ndarray:
    """int8 w [O, I, 3, 3] -> U [16, I, O] int64 ((2G) g (2G)^T per channel pair)."""
    u = np.einsum("ai,ocij,bj->abco", G2, w.astype(np.int64), G2)
    return u.reshape(POINTS, w.shape[1], w.shape[0])


def _vectorize(sch: Any, loop: Any, extent: int) -> None:
    for lanes in (16, 8, 4):
        if extent % lanes == 0:
            _, inner = sch.split(loop, [None, lanes])
            sch.vectorize(inner)
            return


def input_transform(
    padded_shape: tuple[int, int, int, int], tile_hw: tuple[int, int], rows: int
) -> Any:
    """PrimFunc: x [N, 2*th+2, 2*tw+2, C] int16 (zero point subtracted, padded) ->
    V [16, rows, C] int16, row = (n, ty, tx); rows past the real count repeat the last."""
    from tvm import s_tir, te, tirx

    batch, _, _, channels = padded_shape
    th, tw = tile_hw
    used = batch * th * tw
    data = te.placeholder(padded_shape, "int16", name="x")

    def point(t: Any, row: Any, c: Any) -> Any:
        real = tirx.min(row, used - 1)
        n, ty, tx = real // (th * tw), (real // tw) % th, real % tw
        d = [data[n, ty * 2 + i, tx * 2 + j, c] for i in range(4) for j in range(4)]
        values = [combine(np.outer(BT[a], BT[b]), d, "int16") for a in range(4) for b in range(4)]
        return select_by_index(t, values)

    v = te.compute((POINTS, rows, channels), point, name="winograd_int_input")
    sch = s_tir.Schedule(te.create_prim_func([data, v]))
    t, row, c = sch.get_loops(sch.get_sblock("winograd_int_input"))
    sch.reorder(row, c, t)
    sch.parallel(row)
    sch.unroll(t)
    # channels innermost in memory, the 16 points unrolled around one channel vector
    c_outer, c_inner = sch.split(c, [None, 16 if channels % 16 == 0 else GROUP])
    sch.reorder(row, c_outer, t, c_inner)
    sch.vectorize(c_inner)
    func = sch.mod["main"].with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)
    return func.without_attr("global_symbol")


def output_transform(
    batch: int, tile_hw: tuple[int, int], out_hw: tuple[int, int], rows: int, cols: int,
    out_channels: int,
) -> Any:  # fmt: skip
    """PrimFunc: M [16, rows, cols] int32 -> Y [N, oh, ow, O] int32 = (A^T M A) / 4."""
    from tvm import s_tir, te, tirx

    th, tw = tile_hw
    out_h, out_w = out_hw
    product = te.placeholder((POINTS, rows, cols), "int32", name="M")

    def output(n: Any, y: Any, x: Any, k: Any) -> Any:
        row = (n * th + y // 2) * tw + x // 2
        m = [product[t, row, k] for t in range(POINTS)]
        values = [combine(np.outer(AT[r], AT[s]), m, "int32") for r in range(2) for s in range(2)]
        return tirx.shift_right(
            select_by_index((y % 2) * 2 + x % 2, values), tirx.const(2, "int32")
        )

    out = te.compute((batch, out_h, out_w, out_channels), output, name="winograd_int_output")
    sch = s_tir.Schedule(te.create_prim_func([product, out]))
    n, y, x, k = sch.get_loops(sch.get_sblock("winograd_int_output"))
    ty, r = sch.split(y, [None, 2])
    tx, s = sch.split(x, [None, 2])
    sch.reorder(n, ty, tx, r, s, k)
    sch.parallel(sch.fuse(n, ty))
    sch.unroll(r)
    sch.unroll(s)
    _vectorize(sch, k, out_channels)
    func = sch.mod["main"].with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)
    return func.without_attr("global_symbol")


def emit(
    builder: Any, data: Any, zero: int, w: np.ndarray, padding: tuple[int, ...],
    out_shape: list[int], isa: DotIsa,
) -> Any:  # fmt: skip
    """Emit the three kernels for quantized NCHW ``data`` (8-bit, zero point ``zero``) and
    int8 weights ``w``; returns the int32 NCHW accumulator with the zero point already
    subtracted (the caller's correction is then 0)."""
    from tvm import relax

    batch, out_channels, out_h, out_w = out_shape
    _, in_channels, height, width = (int(d) for d in data.ty.shape)
    top, left, _, _ = padding
    th, tw = -(-out_h // 2), -(-out_w // 2)
    channels = round_up(in_channels, GROUP)
    hp, wp = 2 * th + 2, 2 * tw + 2
    rows = batch * th * tw
    rows_p = round_up(rows, tiles(isa, out_channels, rows)[0])
    cols_p = round_up(out_channels, isa.lanes)

    nhwc = builder.emit(relax.op.permute_dims(data, [0, 2, 3, 1]))
    widths = [0, 0, top, hp - height - top, left, wp - width - left, 0, channels - in_channels]
    padded = builder.emit(relax.op.nn.pad(nhwc, widths, pad_value=float(zero)))
    wide = builder.emit(relax.op.astype(padded, "int16"))
    centred = builder.emit(relax.op.subtract(wide, relax.const(zero, "int16")))

    forward = builder.add_func(input_transform((batch, hp, wp, channels), (th, tw), rows_p),
                               "onnxpress_int8_winograd_input")  # fmt: skip
    v = builder.emit(
        relax.call_tir(forward, [centred], relax.TensorType((POINTS, rows_p, channels), "int16"))
    )
    u = transform_weight(w)
    packed = np.stack([pack_weight(isa, u[t]) for t in range(POINTS)])
    gemm = builder.add_func(packed_gemm(isa, rows_p, channels, cols_p, batch=POINTS),
                            "onnxpress_int8_winograd_gemm")  # fmt: skip
    m = builder.emit(
        relax.call_tir(
            gemm, [v, relax.const(packed)], relax.TensorType((POINTS, rows_p, cols_p), "int32")
        )
    )
    back = builder.add_func(
        output_transform(batch, (th, tw), (out_h, out_w), rows_p, cols_p, out_channels),
        "onnxpress_int8_winograd_output",
    )
    y = builder.emit(
        relax.call_tir(back, [m], relax.TensorType((batch, out_h, out_w, out_channels), "int32"))
    )
    return builder.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
