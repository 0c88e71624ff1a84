"""Winograd convolution for 3x3, stride-1 float convolutions in the blocked layout.

``F(m x m, 3 x 3)`` computes an m x m tile of output from an (m+2) x (m+2) tile of input
with (m+2)^2 multiplications per input and output channel, where a direct convolution
needs 9 m^2: 2.25x fewer for m = 2, 4x fewer for m = 4 (Lavin and Gray, "Fast Algorithms
for Convolutional Neural Networks", 2016). Three kernels:

1. input transform: ``V[e, u, p, c] = (B^T d_{p,c} B)[e, u]`` for each tile ``p`` (batch,
   tile row, tile column) and input channel ``c`` of the blocked input (padding read as
   zero), in two separable steps with the constant matrix unrolled into adds;
2. a batched GEMM over input channels, one per transform point (e, u):
   ``M[e, u, kb, p, ki] = sum_c V[e, u, p, c] * U[e, u, kb, c, ki]``, with
   ``U = G g G^T`` computed here with numpy at compile time and packed in output-channel
   blocks: the register-tiled reduction of tile_schedule.py runs it unchanged;
3. output transform ``Y[n, kb, y, x, ki] = (A^T M_{p,kb,ki} A)[y % m, x % m]``, separable
   like the input transform, blocked like the direct convolution's output, so bias,
   activations and residual adds fuse after it.

The transform matrices use the interpolation points 0, +-1 (m = 2) and 0, +-1, +-2
(m = 4) and infinity. Winograd reassociates the sum with larger intermediate values:
measured on random 3x3 convolutions, max |diff| / max |ref| against a direct fp32
convolution is ~1e-6 for m = 2 and ~5e-6 to 1.3e-5 for m = 4 at 64-512 channels, inside
the compile-time check's 1e-4.

The input-transform and output-transform kernels carry the block annotation
``WINOGRAD_ANNOTATION`` (``"rows"``, ``"input"``; ``"columns"``, ``"output"``), which winograd_schedule.py's rule
looks for. Pure TE and numpy; TVM is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpress.backends.tvm.blocked_kernels import ConvGeometry, blocks

WINOGRAD_ANNOTATION = "onnxpress_winograd"  # "rows", "input" (1); "columns", "output" (3)
TILE_ANNOTATION = "onnxpress_winograd_tile"  # m, on the output transform
MIN_CHANNELS = 16  # fewer input or output channels: the transforms cost more than they save

# (B^T, G, A^T) for F(2x2, 3x3) and F(4x4, 3x3)
TRANSFORMS: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float),
    ),
    4: (
        np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            float,
        ),
        np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ]
        ),
        np.array(
            [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
            float,
        ),
    ),
}


def winograd_tile(
    geometry: ConvGeometry,
    kernel: tuple[int, int],
    channels: tuple[int, int],
    out_hw: tuple[int, int],
) -> int:
    """The output tile m for a convolution with ``kernel`` (KH, KW), ``channels`` (in, out)
    and output size ``out_hw``, or 0 when Winograd does not apply: 3x3, stride 1, no
    dilation, at least MIN_CHANNELS channels each way. m = 4 for outputs of at least
    12 x 12 (4x fewer multiplications), else m = 2, whose transformed weights are 2.25x
    smaller where few tiles share them (ResNet's 7 x 7 stage)."""
    if kernel != (3, 3) or geometry.strides != (1, 1) or geometry.dilation != (1, 1):
        return 0
    if min(channels) < MIN_CHANNELS or min(out_hw) < 2:
        return 0
    return 4 if min(out_hw) >= 12 else 2


def pack_winograd_weight(
    weight: np.ndarray, m: int, in_channels: int, out_block: int
) -> np.ndarray:
    """OIHW 3x3 weights transformed, ``G g G^T``, in float64, and packed as
    ``[m+2, m+2, O / B, I', B]`` (B = ``out_block``; I' = ``in_channels``, the input's
    channels padded to whole blocks), zero for padded channels."""
    out, inp = weight.shape[:2]
    g = TRANSFORMS[m][1]
    padded = np.zeros((blocks(out, out_block) * out_block, in_channels, 3, 3))
    padded[:out, :inp] = weight
    transformed = np.einsum("ai,ocij,bj->abco", g, padded, g)  # [a, a, I', O]
    alpha = m + 2
    shaped = transformed.reshape(alpha, alpha, in_channels, -1, out_block)
    return np.ascontiguousarray(shaped.transpose(0, 1, 3, 2, 4)).astype(weight.dtype)


def select_by_index(index: Any, values: list[Any]) -> Any:
    """``values[index]`` for an index that an unrolled loop makes constant."""
    from tvm import tirx

    out = values[-1]
    for i in range(len(values) - 2, -1, -1):
        out = tirx.Select(index == i, values[i], out)
    return out


def combine(coefficients: Any, terms: list[Any], dtype: str = "float32") -> Any:
    """``sum(c * t)`` over the nonzero coefficients, +-1 as adds and subtracts; the
    constants in ``dtype`` (integer transforms: int8_winograd.py)."""
    from tvm import tirx

    integer = not dtype.startswith("float")
    total = None
    for coefficient, term in zip(np.ravel(coefficients), terms, strict=True):
        if coefficient == 0:
            continue
        if coefficient in (1, -1):
            value = term if coefficient == 1 else -term
        else:
            value = term * tirx.const(int(coefficient) if integer else float(coefficient), dtype)
        total = value if total is None else total + value
    return total if total is not None else tirx.const(0, dtype)


def _tiles(out_hw: tuple[int, int], m: int) -> tuple[int, int]:
    return -(-out_hw[0] // m), -(-out_hw[1] // m)


def winograd_input(data: Any, geometry: ConvGeometry, m: int, out_hw: tuple[int, int]) -> Any:
    """``V[e, u, p, c]`` (kernel 1) of blocked ``data`` [N, CB, H, W, B]; tile ``p`` covers
    input rows ``ty*m - top ...`` and columns ``tx*m - left ...``, zero outside the image."""
    from tvm import te, tirx

    batch, cblocks, height, width, block = (int(d) for d in data.shape)
    bt = TRANSFORMS[m][0]
    alpha = m + 2
    rows, cols = _tiles(out_hw, m)
    top, left = geometry.padding[0], geometry.padding[1]
    zero = tirx.const(0.0, data.dtype)

    def read(p: Any, c: Any, i: int, j: int) -> Any:
        n, ty, tx = p // (rows * cols), p // cols % rows, p % cols
        y, x = ty * m + i - top, tx * m + j - left
        inside = te.all(y >= 0, y < height, x >= 0, x < width)
        return te.if_then_else(inside, data[n, c // block, y, x, c % block], zero)

    shape = (alpha, alpha, batch * rows * cols, cblocks * block)
    half = te.compute(
        shape,
        lambda e, j, p, c: select_by_index(
            e, [combine(bt[r], [read(p, c, i, j) for i in range(alpha)]) for r in range(alpha)]
        ),
        name="winograd_rows",
        attrs={WINOGRAD_ANNOTATION: "rows"},
    )
    return te.compute(
        shape,
        lambda e, u, p, c: select_by_index(
            u, [combine(bt[r], [half[e, j, p, c] for j in range(alpha)]) for r in range(alpha)]
        ),
        name="winograd_input",
        attrs={WINOGRAD_ANNOTATION: "input"},
    )


def winograd_gemm(transformed: Any, weight: Any) -> Any:
    """``M[e, u, kb, p, ki] = sum_c V[e, u, p, c] * U[e, u, kb, c, ki]`` (kernel 2)."""
    from tvm import te

    alpha, _, tiles, channels = (int(d) for d in transformed.shape)
    out_blocks, out_block = int(weight.shape[2]), int(weight.shape[4])
    rc = te.reduce_axis((0, channels), "rc")
    return te.compute(
        (alpha, alpha, out_blocks, tiles, out_block),
        lambda e, u, kb, p, ki: te.sum(
            transformed[e, u, p, rc] * weight[e, u, kb, rc, ki], axis=rc
        ),
        name="winograd_gemm",
    )


def winograd_output(product: Any, batch: int, out_hw: tuple[int, int], m: int) -> Any:
    """``Y[n, kb, y, x, ki]`` (kernel 3): the output tiles of ``product`` (kernel 2's
    ``M``), cut to ``out_hw`` when m does not divide it."""
    from tvm import te

    alpha, _, out_blocks, _, out_block = (int(d) for d in product.shape)
    at = TRANSFORMS[m][2]
    rows, cols = _tiles(out_hw, m)

    half = te.compute(
        (alpha, m, out_blocks, rows * cols * batch, out_block),
        lambda e, s, kb, p, ki: select_by_index(
            s, [combine(at[r], [product[e, u, kb, p, ki] for u in range(alpha)]) for r in range(m)]
        ),
        name="winograd_columns",
        attrs={WINOGRAD_ANNOTATION: "columns"},
    )

    def body(n: Any, kb: Any, y: Any, x: Any, ki: Any) -> Any:
        p = n * rows * cols + y // m * cols + x // m
        values = [half[e, x % m, kb, p, ki] for e in range(alpha)]
        return select_by_index(y % m, [combine(at[r], values) for r in range(m)])

    shape = (batch, out_blocks, out_hw[0], out_hw[1], out_block)
    attrs = {WINOGRAD_ANNOTATION: "output", TILE_ANNOTATION: m}
    return te.compute(shape, body, name="winograd_output", attrs=attrs)


def emit_winograd(
    builder: Any, source: Any, weight: np.ndarray, geometry: ConvGeometry, m: int,
    out_shape: tuple[int, ...], out_block: int,
) -> Any:  # fmt: skip
    """Emit the three kernels for a convolution of blocked ``source`` with OIHW ``weight``
    into a Relax ``builder``; returns the blocked output variable."""
    from tvm import relax

    in_block = int(source.ty.shape[4])
    in_channels = int(source.ty.shape[1]) * in_block
    packed = relax.const(pack_winograd_weight(weight, m, in_channels, out_block))
    out_hw = (out_shape[2], out_shape[3])
    transformed = builder.emit_te(
        lambda x: winograd_input(x, geometry, m, out_hw),
        source,
        primfunc_name_hint="winograd_input",
    )
    product = builder.emit_te(
        winograd_gemm, transformed, packed, primfunc_name_hint="winograd_gemm"
    )
    return builder.emit_te(
        lambda t: winograd_output(t, out_shape[0], out_hw, m),
        product,
        primfunc_name_hint="winograd_output",
    )
