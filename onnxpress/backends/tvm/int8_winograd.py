"""Exact integer Winograd F(2x2, 3x3) and F(4x4, 3x3) for quantized 3x3 stride-1 convolutions
(int8.py).

On x86 AVX2 without VNNI a layer whose weights could saturate vpmaddubsw's int16 pair sums
runs on the exact int16 kernel (vpmaddwd: 16 products per instruction). With AVX-512 VNNI,
vpdpwssd sums int16 pairs into int32 lanes (32 products per instruction, half of vpdpbusd's
64), so only F(4x4) pays there (resnet18's 56 x 56 and 28 x 28 layers: 0.26 -> 0.20 ms
each). Winograd's minimal
filtering computes an m x m output tile from an (m+2) x (m+2) input tile with (m+2)^2
products per channel pair instead of 9 m^2 (2.25x fewer for m = 2, 4x for m = 4), and stays
exact in integers when the transforms are scaled to integers:

    d = x - zero point          (int16, |d| <= 255; padding is the zero point, so d = 0)
    V = B^T d B                 (m = 2: |V| <= 4 * 255; m = 4: <= 10 * 10 * 255 = 25500)
    U = Gs g Gs^T               (Gs: G with each row scaled to integers, at compile time;
                                 m = 2: |U| <= 3 * 3 * 128; m = 4: <= 7 * 7 * 128)
    M[t] = sum_c V[t, c] U[t, c]    (vpmaddwd GEMM per transform point t, int32)
    Y = (As^T M As) / S         (As = A scaled by the inverse row scales of Gs, made
                                 integer; S = 4 for m = 2, 576 = 9 * 64 for m = 4)

V and U fit int16, so every vpmaddwd product pair is exact. M and the output transform run
in int32 arithmetic, which wraps; the result S * Y is still right modulo 2^32. For m = 2,
dividing by 4 is a shift; for m = 4, multiplying by the inverse of 9 modulo 2^32 leaves
64 * Y, then a shift by 6. Both recover Y exactly when 2^k * Y fits int32 (k = 2 or 6),
i.e. 2^k * 255 * sum|w| < 2^31 for every output channel, which ``fits`` checks. So Y is
the exact int32 accumulator of the direct kernel, zero point already subtracted, for any
weights (no saturation risk). Three kernels: the input transform (NHWC int16, padded in
Relax), the batched GEMM (int8_kernels.packed_gemm with a batch of (m+2)^2), the output
transform to NHWC int32; the float epilogue follows as for the im2col path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxpress.backends.tvm.int8_kernels import (
    GROUP,
    DotIsa,
    pack_weight,
    packed_gemm,
    round_up,
    tiles,
    with_int16_weights,
)
from onnxpress.backends.tvm.winograd import TRANSFORMS, combine, select_by_index

ACTIVATION_BOUND = 255  # |x - zero point| for 8-bit activations
WEIGHT_BOUND = 128  # |w| for int8 weights
MIN_CHANNELS = 16  # fewer: the transforms cost more than they save
MIN_F4_OUTPUT = 12  # smaller outputs (7 x 7): F(4x4)'s ragged tiles waste what it saves
# Each F(4x4) weight (36 int16 per 3x3 tap set, 2.25x F(2x2)'s bytes) is used once per tile
# row of its GEMM. With fewer rows the layer streams its weights from memory faster than it
# multiplies them: resnet18's 14 x 14 layers at batch 1 (16 tiles, 4.7 MB per conv) ran 2%
# faster as F(2x2) (BENCHMARKS run 21), and the library is 8 MB smaller.
MIN_F4_ROWS = 32


@dataclass(frozen=True)
class Transform:
    """Integer F(m x m, 3 x 3): ``bt`` (m+2 square), ``g`` ((m+2) x 3, rows scaled to
    integers), ``at`` (m x (m+2), scaled to match), and ``scale``: As^T M As = scale * Y."""

    m: int
    bt: np.ndarray
    g: np.ndarray
    at: np.ndarray
    scale: int

    @property
    def size(self) -> int:
        return self.m + 2

    @property
    def points(self) -> int:
        return self.size**2

    @property
    def shift(self) -> int:
        """The power of two in ``scale`` (the bits the wrapped result loses)."""
        return (self.scale & -self.scale).bit_length() - 1

    @property
    def odd_inverse(self) -> int:
        """The inverse of scale's odd part modulo 2^32, as an int32 constant."""
        inverse = pow(self.scale >> self.shift, -1, 2**32)
        return inverse - 2**32 if inverse >= 2**31 else inverse


def _integer(m: int) -> Transform:
    """winograd.py's float F(m x m, 3 x 3) made integer: each row of G times the smallest
    integer that makes it integral, A^T's columns divided by the same and the whole times
    their least common multiple L, so As^T M As = L^2 Y."""
    bt, g, at = TRANSFORMS[m]
    factors = [
        next(f for f in range(1, 1000) if np.allclose(row * f, np.rint(row * f))) for row in g
    ]
    lcm = int(np.lcm.reduce(factors))
    scaled_at = at * (lcm / np.array(factors, float))
    return Transform(
        m,
        bt=np.rint(bt).astype(np.int64),
        g=np.rint(g * np.array(factors, float)[:, None]).astype(np.int64),
        at=np.rint(scaled_at).astype(np.int64),
        scale=lcm * lcm,
    )


# m = 2: G's rows are 1, 1/2, 1/2, 1 times integers (scale 4); m = 4 (points 0, +-1, +-2,
# infinity): 1/4, 1/6, 1/6, 1/24, 1/24, 1 (scale 24^2 = 576 = 9 * 64)
F2, F4 = _integer(2), _integer(4)
for _t in (F2, F4):  # the int16 operands of the vpmaddwd GEMM
    assert np.abs(_t.bt).sum(axis=1).max() ** 2 * ACTIVATION_BOUND < 2**15
    assert np.abs(_t.g).sum(axis=1).max() ** 2 * WEIGHT_BOUND < 2**15


def fits(
    w: np.ndarray, strides: tuple[int, int], dilation: tuple[int, int], transform: Transform = F2
) -> bool:
    """Whether a conv with int8 weights ``w`` [O, I, kh, kw] can run as exact ``transform``."""
    out_channels, in_channels, kh, kw = w.shape
    if (kh, kw) != (3, 3) or strides != (1, 1) or dilation != (1, 1):
        return False
    if min(in_channels, out_channels) < MIN_CHANNELS:
        return False
    largest = int(np.abs(w.astype(np.int64)).sum(axis=(1, 2, 3)).max())
    return 2**transform.shift * ACTIVATION_BOUND * largest < 2**31


def choose(
    w: np.ndarray, strides: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int],
    batch: int = 1, f2: bool = True,
) -> Transform | None:  # fmt: skip
    """F(4x4) where the output has enough tiles and the weights keep it exact, else (with
    ``f2``) F(2x2) where they keep that exact, else None (the direct kernel)."""
    tiles_f4 = batch * -(-out_hw[0] // F4.m) * -(-out_hw[1] // F4.m)
    large = min(out_hw) >= MIN_F4_OUTPUT and tiles_f4 >= MIN_F4_ROWS
    if large and fits(w, strides, dilation, F4):
        return F4
    return F2 if f2 and fits(w, strides, dilation, F2) else None


def transform_weight(w: np.ndarray, transform: Transform = F2) -> np.ndarray:
    """int8 w [O, I, 3, 3] -> U [points, I, O] int64 (Gs g Gs^T per channel pair)."""
    g = transform.g
    u = np.einsum("ai,ocij,bj->abco", g, w.astype(np.int64), g)
    return u.reshape(transform.points, w.shape[1], w.shape[0])


def _split_vector(sch: Any, loop: Any, extent: int) -> tuple[Any, Any]:
    """(outer, inner) with the inner loop a vector of 16, 8 or 4 lanes, or of all of ``loop``
    (odd channel counts: as scalars, TVM's simplifier folds the inverse of 9 into the
    transform's constants and fails on the int32 overflow)."""
    lanes = next((v for v in (16, 8, 4) if extent % v == 0), extent)
    outer, inner = sch.split(loop, [None, lanes])
    return outer, inner


def _first_step_on_stack(sch: Any, block: str, loop: Any) -> None:
    """Compute a transform's first step (a [size, rows, size, channels] block) under
    ``loop``, for one tile and channel vector, into a stack array
    (tir_passes.stack_scratch_pass): its two point loops unrolled, its channels vectorized."""
    step = sch.get_sblock(block)
    sch.compute_at(step, loop)
    sch.set_scope(step, 0, "global")
    first, _, second, lanes = sch.get_loops(step)[-4:]
    sch.unroll(first)
    sch.unroll(second)
    sch.vectorize(lanes)


def input_transform(
    padded_shape: tuple[int, int, int, int], tile_hw: tuple[int, int], rows: int,
    transform: Transform = F2,
) -> Any:  # fmt: skip
    """PrimFunc: x [N, m*th+2, m*tw+2, C] int16 (zero point subtracted, padded) ->
    V [points, rows, C] int16, row = (n, ty, tx); rows past the real count repeat the last."""
    from tvm import s_tir, te, tirx

    batch, _, _, channels = padded_shape
    th, tw = tile_hw
    m, size, bt = transform.m, transform.size, transform.bt
    used = batch * th * tw
    data = te.placeholder(padded_shape, "int16", name="x")

    # two steps: the columns' combinations W[a, row, j, c] = sum_i bt[a, i] d[i, j], then
    # V[(a, b), row, c] = sum_j bt[b, j] W[a, row, j, c]; W lives on the stack per channel
    # vector (one expression per point compiled 10x slower for F(4x4))
    def column(a: Any, row: Any, j: Any, c: Any) -> Any:
        real = tirx.min(row, used - 1)
        n, ty, tx = real // (th * tw), (real // tw) % th, real % tw
        d = [data[n, ty * m + i, tx * m + j, c] for i in range(size)]
        return select_by_index(a, [combine(bt[r], d, "int16") for r in range(size)])

    w = te.compute((size, rows, size, channels), column, name="winograd_int_columns")

    def point(t: Any, row: Any, c: Any) -> Any:
        terms = [w[t // size, row, j, c] for j in range(size)]
        return select_by_index(t % size, [combine(bt[b], terms, "int16") for b in range(size)])

    v = te.compute((transform.points, rows, channels), point, name="winograd_int_input")
    sch = s_tir.Schedule(te.create_prim_func([data, v]))
    t, row, c = sch.get_loops(sch.get_sblock("winograd_int_input"))
    sch.parallel(row)
    # channels innermost in memory, the points unrolled around one channel vector
    c_outer, c_inner = sch.split(c, [None, 16 if channels % 16 == 0 else GROUP])
    sch.reorder(row, c_outer, t, c_inner)
    sch.unroll(t)
    sch.vectorize(c_inner)
    _first_step_on_stack(sch, "winograd_int_columns", c_outer)
    func = sch.mod["main"].with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)
    return func.without_attr("global_symbol")


def output_transform(
    batch: int, tile_hw: tuple[int, int], out_hw: tuple[int, int], rows: int, cols: int,
    out_channels: int, transform: Transform = F2,
) -> Any:  # fmt: skip
    """PrimFunc: M [points, rows, cols] int32 -> Y [N, oh, ow, O] int32 = (As^T M As) / S,
    the division exact in wrapped int32 arithmetic (see the module docstring)."""
    from tvm import s_tir, te, tirx

    th, tw = tile_hw
    out_h, out_w = out_hw
    m, size, at = transform.m, transform.size, transform.at
    product = te.placeholder((transform.points, rows, cols), "int32", name="M")

    # two steps, as the input transform: Z[r, row, j, k] = sum_i at[r, i] M[(i, j), row, k]
    # on the stack per tile and channel vector, then Y = sum_j at[s, j] Z[r, row, j, k]
    def rows_step(r: Any, row: Any, j: Any, k: Any) -> Any:
        terms = [product[i * size + j, row, k] for i in range(size)]
        return select_by_index(r, [combine(at[a], terms, "int32") for a in range(m)])

    z = te.compute((m, rows, size, cols), rows_step, name="winograd_int_rows")

    def output(n: Any, y: Any, x: Any, k: Any) -> Any:
        row = (n * th + y // m) * tw + x // m
        terms = [z[y % m, row, j, k] for j in range(size)]
        scaled = select_by_index(x % m, [combine(at[b], terms, "int32") for b in range(m)])
        if transform.odd_inverse != 1:
            scaled = scaled * tirx.const(transform.odd_inverse, "int32")
        return tirx.shift_right(scaled, tirx.const(transform.shift, "int32"))

    out = te.compute((batch, out_h, out_w, out_channels), output, name="winograd_int_output")
    sch = s_tir.Schedule(te.create_prim_func([product, out]))
    n, y, x, k = sch.get_loops(sch.get_sblock("winograd_int_output"))
    ty, r = sch.split(y, [None, m])
    tx, s = sch.split(x, [None, m])
    sch.parallel(sch.fuse(n, ty))
    # the m x m outputs of one tile and one channel vector in one block
    k_outer, k_inner = _split_vector(sch, k, out_channels)
    sch.reorder(tx, k_outer, r, s, k_inner)
    sch.unroll(r)
    sch.unroll(s)
    sch.vectorize(k_inner)
    _first_step_on_stack(sch, "winograd_int_rows", k_outer)
    func = sch.mod["main"].with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)
    return func.without_attr("global_symbol")


def emit(
    builder: Any, data: Any, zero: int, w: np.ndarray, padding: tuple[int, ...],
    out_shape: list[int], isa: DotIsa, transform: Transform = F2,
) -> Any:  # fmt: skip
    """Emit the three kernels for quantized NCHW ``data`` (8-bit, zero point ``zero``) and
    int8 weights ``w``; returns the int32 NCHW accumulator with the zero point already
    subtracted (the caller's correction is then 0)."""
    from tvm import relax

    batch, out_channels, out_h, out_w = out_shape
    _, in_channels, height, width = (int(d) for d in data.ty.shape)
    top, left, _, _ = padding
    m, points = transform.m, transform.points
    th, tw = -(-out_h // m), -(-out_w // m)
    channels = round_up(in_channels, GROUP)
    hp, wp = m * th + 2, m * tw + 2
    rows = batch * th * tw
    rows_p = round_up(rows, tiles(isa, out_channels, rows)[0])
    cols_p = round_up(out_channels, isa.lanes)

    nhwc = builder.emit(relax.op.permute_dims(data, [0, 2, 3, 1]))
    widths = [0, 0, top, hp - height - top, left, wp - width - left, 0, channels - in_channels]
    padded = builder.emit(relax.op.nn.pad(nhwc, widths, pad_value=float(zero)))
    wide = builder.emit(relax.op.astype(padded, "int16"))
    centred = builder.emit(relax.op.subtract(wide, relax.const(zero, "int16")))

    forward = builder.add_func(
        input_transform((batch, hp, wp, channels), (th, tw), rows_p, transform),
        "onnxpress_int8_winograd_input",
    )
    v = builder.emit(
        relax.call_tir(forward, [centred], relax.TensorType((points, rows_p, channels), "int16"))
    )
    u = transform_weight(w, transform)
    isa = with_int16_weights(isa)  # |U| exceeds a byte (module docstring)
    packed = np.stack([pack_weight(isa, u[t]) for t in range(points)])
    gemm = builder.add_func(packed_gemm(isa, rows_p, channels, cols_p, batch=points),
                            "onnxpress_int8_winograd_gemm")  # fmt: skip
    m_acc = builder.emit(
        relax.call_tir(
            gemm, [v, relax.const(packed)], relax.TensorType((points, rows_p, cols_p), "int32")
        )
    )
    back = builder.add_func(
        output_transform(batch, (th, tw), (out_h, out_w), rows_p, cols_p, out_channels, transform),
        "onnxpress_int8_winograd_output",
    )
    y = builder.emit(
        relax.call_tir(
            back, [m_acc], relax.TensorType((batch, out_h, out_w, out_channels), "int32")
        )
    )
    return builder.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
