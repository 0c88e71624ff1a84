"""The kernels of the blocked (NCHWc) layout: convolutions that read and write channel
blocks, the conversions in and out of it, and the compile-time packing of their constants.

A blocked tensor ``x[n, cb, h, w, ci]`` holds channel ``cb * B + ci`` of the NCHW tensor
``[n, C, h, w]``; channels past C (when B does not divide C) are padding. A convolution in
this layout (``conv2d_nchwc``) vectorizes its B output channels, one whole vector per output
pixel, and broadcasts one input value per pixel row and step of the reduction: the register
tile of ``TiledReduction`` (tile_schedule.py) with no strided or scattered access, whatever
the stride, the kernel size or the image width. A depthwise conv (``depthwise_nchwc``,
grouped_kernels.py) vectorizes the channels of the block too, so a stride-2 depthwise conv
reads whole vectors where NCHW read lanes two floats apart. Padding is a condition on the
read inside the kernel (``padded_read``), not a padded copy of the input, except under
tall windows (``conv2d_nchwc``): the copy of a 96 x 112 x 112 input cost four times the
depthwise conv itself.

Padded channels: packed weights and biases are zero there, so a convolution writes zeros,
and a convolution's packed weights are zero for padded input channels, so whatever finite
value an elementwise op leaves in them never reaches a real channel (blocked_layout.py only
lets ops through that keep finite values finite).

Pure TE and numpy; TVM is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def channel_block(channels: int, lanes: int) -> int:
    """The block of a tensor with ``channels`` channels: the target's lanes, padded when
    they do not divide it (24 channels in two blocks of 16: three quarters of each vector
    used, where blocks of 8 would use half of a 16-lane register); a narrower block only
    for tensors with at most half as many channels as lanes."""
    block = lanes
    while block // 2 >= 4 and channels <= block // 2:
        block //= 2
    return block


def blocks(channels: int, block: int) -> int:
    return -(-channels // block)


@dataclass(frozen=True)
class ConvGeometry:
    """Strides, padding (top, left, bottom, right) and dilation of a 2-D convolution."""

    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, attrs: Any) -> ConvGeometry:
        """The geometry of a Relax conv2d's attributes."""
        sy, sx = (int(v) for v in attrs.strides)
        top, left, bottom, right = (int(v) for v in attrs.padding)
        dy, dx = (int(v) for v in attrs.dilation)
        return cls((sy, sx), (top, left, bottom, right), (dy, dx))

    def output(self, height: int, width: int, kh: int, kw: int) -> tuple[int, int]:
        (sy, sx), (top, left, bottom, right), (dy, dx) = self.strides, self.padding, self.dilation
        return (
            (height + top + bottom - dy * (kh - 1) - 1) // sy + 1,
            (width + left + right - dx * (kw - 1) - 1) // sx + 1,
        )


def pack_conv_weight(weight: np.ndarray, in_channels: int, out_block: int) -> np.ndarray:
    """OIHW weights as ``[O / B, I', KH, KW, B]`` (B = ``out_block``; I' = ``in_channels``,
    the reduction extent of the input: its channels, padded to whole blocks when blocked),
    zero for padded input and output channels."""
    out, inp, kh, kw = weight.shape
    padded = np.zeros((blocks(out, out_block) * out_block, in_channels, kh, kw), weight.dtype)
    padded[:out, :inp] = weight
    shaped = padded.reshape(-1, out_block, in_channels, kh, kw)
    return np.ascontiguousarray(shaped.transpose(0, 2, 3, 4, 1))


def pack_channels(values: np.ndarray, block: int, fill: float = 0.0) -> np.ndarray:
    """A constant broadcast against NCHW (rank <= 4, dim 1 of its rank-4 form = C) in the
    blocked layout: ``[d0, C / B, d2, d3, B]``, padded channels set to ``fill``."""
    shape: list[int] = [1] * (4 - values.ndim) + [int(d) for d in values.shape]
    four = values.reshape(shape)
    n, channels, h, w = shape
    padded = np.full((n, blocks(channels, block) * block, h, w), fill, values.dtype)
    padded[:, :channels] = four
    return np.ascontiguousarray(padded.reshape(n, -1, block, h, w).transpose(0, 1, 3, 4, 2))


MIN_COPIED_WINDOW_ROWS = 5  # window rows from which a blocked input is padded into a copy


def copy_padded(
    data: Any, geometry: ConvGeometry, window_rows: int, blocked: bool
) -> tuple[Any, ConvGeometry]:
    """``data`` and ``geometry`` for a conv reading it: padded into a copy (the geometry
    then without padding) for an NCHW input or a window of ``MIN_COPIED_WINDOW_ROWS`` rows
    or more (see ``conv2d_nchwc``), else as they are (padding tested in the kernel)."""
    from tvm import topi

    if not any(geometry.padding) or (blocked and window_rows < MIN_COPIED_WINDOW_ROWS):
        return data, geometry
    top, left, bottom, right = geometry.padding
    lanes = [0] if blocked else []
    data = topi.nn.pad(data, [0, 0, top, left, *lanes], [0, 0, bottom, right, *lanes])
    return data, ConvGeometry(geometry.strides, (0, 0, 0, 0), geometry.dilation)


def padded_read(tensor: Any, geometry: ConvGeometry, index: Any, y: Any, x: Any) -> Any:
    """``tensor[index(y, x)]`` for an input row ``y`` and column ``x`` of the padded image,
    zero outside the image; conditions only for the sides that have padding."""
    from tvm import te, tirx

    top, left, bottom, right = geometry.padding
    height, width = (int(d) for d in tensor.shape[2:4])
    conditions = []
    if top:
        conditions.append(y >= top)
    if bottom:
        conditions.append(y < height + top)
    if left:
        conditions.append(x >= left)
    if right:
        conditions.append(x < width + left)
    value = tensor[index(y - top, x - left)]
    if not conditions:
        return value
    return te.if_then_else(te.all(*conditions), value, tirx.const(0.0, tensor.dtype))


def conv2d_nchwc(data: Any, weight: Any, geometry: ConvGeometry, in_block: int) -> Any:
    """``out[n, ob, y, x, oi] = sum_{c, ky, kx} in[n, c, y*s + ky*d, x*s + kx*d] *
    w[ob, c, ky, kx, oi]``; ``data`` blocked by ``in_block`` ([N, CB, H, W, in_block]) or
    NCHW when ``in_block`` is 0; ``weight`` from ``pack_conv_weight``. An NCHW input (a
    stem of a few channels) is padded into a copy first: cheap for so few channels, and
    the window loop then has no bounds tests (ResNet's 7x7 stem: 0.71 -> 0.52 ms). So is a
    blocked input under a window of ``MIN_COPIED_WINDOW_ROWS`` rows or more: the output
    rows are an outer loop, so the tests on them are never folded (inception_v3's 5x5 conv
    at 35 x 35: 2.9 -> 1.5 ms; its 7x1 convs at 17 x 17 1.2x faster). Other blocked inputs
    are read in place (a copy cost more than the tests: 64 channels at 56x56, 3x3: 0.49 ms
    with a copy, 0.46 without; a 1x7 conv at 17 x 17, whose column tests fold in its
    unrolled tiles, 1.58 -> 1.80 ms)."""
    from tvm import te

    out_blocks, channels, kh, kw, out_block = (int(d) for d in weight.shape)
    batch, height, width = int(data.shape[0]), int(data.shape[2]), int(data.shape[3])
    oh, ow = geometry.output(height, width, kh, kw)
    data, geometry = copy_padded(data, geometry, kh, blocked=bool(in_block))
    (sy, sx), (dy, dx) = geometry.strides, geometry.dilation
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    if in_block and channels % in_block == 0:
        # the input channels as (block, lane): no divisions in the reduction loop, and the
        # lane loop a constant-stride one the schedule unrolls (same summation order)
        rb = te.reduce_axis((0, channels // in_block), "rb")
        ri = te.reduce_axis((0, in_block), "ri")

        def blocked(n: Any, ob: Any, y: Any, x: Any, oi: Any) -> Any:
            def index(iy: Any, ix: Any) -> Any:
                return (n, rb, iy, ix, ri)

            value = padded_read(data, geometry, index, y * sy + ry * dy, x * sx + rx * dx)
            products = value * weight[ob, rb * in_block + ri, ry, rx, oi]
            return te.sum(products, axis=[rb, ri, ry, rx])

        shape = (batch, out_blocks, oh, ow, out_block)
        return te.compute(shape, blocked, name="conv2d_nchwc")
    rc = te.reduce_axis((0, channels), "rc")

    def body(n: Any, ob: Any, y: Any, x: Any, oi: Any) -> Any:
        if in_block:

            def index(iy: Any, ix: Any) -> Any:
                return (n, rc // in_block, iy, ix, rc % in_block)
        else:

            def index(iy: Any, ix: Any) -> Any:
                return (n, rc, iy, ix)

        value = padded_read(data, geometry, index, y * sy + ry * dy, x * sx + rx * dx)
        return te.sum(value * weight[ob, rc, ry, rx, oi], axis=[rc, ry, rx])

    return te.compute((batch, out_blocks, oh, ow, out_block), body, name="conv2d_nchwc")


def upsample_nchwc(data: Any, weight: Any, in_block: int) -> Any:
    """A transposed conv whose kernel equals its stride (no padding, no overlap: U-Net's
    upsampling), ``out[n, ob, y, x, oi] = sum_c in[n, c, y / KH, x / KW] *
    w[ob, c, y % KH, x % KW, oi]``; ``data`` blocked by ``in_block`` or NCHW when 0,
    ``weight`` from ``pack_conv_weight`` of the [O, I, KH, KW] kernel."""
    from tvm import te

    out_blocks, channels, kh, kw, out_block = (int(d) for d in weight.shape)
    batch, height, width = int(data.shape[0]), int(data.shape[2]), int(data.shape[3])
    rc = te.reduce_axis((0, channels), "rc")

    def body(n: Any, ob: Any, y: Any, x: Any, oi: Any) -> Any:
        iy, ix = y // kh, x // kw
        if in_block:
            value = data[n, rc // in_block, iy, ix, rc % in_block]
        else:
            value = data[n, rc, iy, ix]
        return te.sum(value * weight[ob, rc, y % kh, x % kw, oi], axis=rc)

    shape = (batch, out_blocks, height * kh, width * kw, out_block)
    return te.compute(shape, body, name="upsample_nchwc")


def max_pool_nchwc(
    data: Any, pool: tuple[int, int], geometry: ConvGeometry, out_hw: tuple[int, int]
) -> Any:
    """Max pooling of blocked data into ``out_hw`` (Relax's output size, ceil mode
    included), windows outside the image ignored (read as the lowest float) by a condition
    on the read, like the convolutions: TOPI's pool copied a padded input first, which
    took longer than the pooling (ResNet's first max-pool)."""
    from tvm import te, tirx

    batch, cblocks, height, width, block = (int(d) for d in data.shape)
    (sy, sx), (top, left, _, _), (dy, dx) = geometry.strides, geometry.padding, geometry.dilation
    oh, ow = out_hw
    ry = te.reduce_axis((0, pool[0]), "ry")
    rx = te.reduce_axis((0, pool[1]), "rx")
    lowest = tirx.min_value(data.dtype)

    def body(n: Any, cb: Any, y: Any, x: Any, ci: Any) -> Any:
        iy, ix = y * sy + ry * dy - top, x * sx + rx * dx - left
        conditions = []
        if top:
            conditions.append(iy >= 0)
        if (oh - 1) * sy + (pool[0] - 1) * dy - top >= height:
            conditions.append(iy < height)
        if left:
            conditions.append(ix >= 0)
        if (ow - 1) * sx + (pool[1] - 1) * dx - left >= width:
            conditions.append(ix < width)
        value = data[n, cb, iy, ix, ci]
        if conditions:
            value = te.if_then_else(te.all(*conditions), value, lowest)
        return te.max(value, axis=[ry, rx])

    return te.compute((batch, cblocks, oh, ow, block), body, name="max_pool_nchwc")


def to_blocked(data: Any, block: int) -> Any:
    """NCHW ``[N, C, H, W]`` -> ``[N, C / B, H, W, B]``, padded channels zero."""
    from tvm import te, tirx

    batch, channels, height, width = (int(d) for d in data.shape)

    def body(n: Any, cb: Any, y: Any, x: Any, ci: Any) -> Any:
        c = cb * block + ci
        if channels % block == 0:
            return data[n, c, y, x]
        return te.if_then_else(c < channels, data[n, c, y, x], tirx.const(0, data.dtype))

    shape = (batch, blocks(channels, block), height, width, block)
    return te.compute(shape, body, name="to_blocked")


def from_blocked(data: Any, channels: int) -> Any:
    """``[N, C / B, H, W, B]`` -> NCHW ``[N, C, H, W]`` (padded channels dropped)."""
    from tvm import te

    batch, _, height, width, block = (int(d) for d in data.shape)
    return te.compute(
        (batch, channels, height, width),
        lambda n, c, y, x: data[n, c // block, y, x, c % block],
        name="from_blocked",
    )
