"""Channel-grouped convolutions in the blocked NCHWc layout (blocked_layout.py): depthwise
(one filter per channel) and grouped convs whose groups line up with channel blocks.

A grouped conv with ``G`` groups of ``I`` input and ``O`` output channels runs on the
blocked input when each output block's channels read whole input blocks: either blocks
within one group (``O`` and ``I`` multiples of the block B: ResNeXt's later stages,
RegNet's 8-channel groups at B = 8), or whole groups within one block (``O`` divides B and
``I == O``: ResNeXt's 4-channel groups at B = 8). Each output block then sums over its own
input window only; a block holding several groups sums over all of their channels, with
zero weights across groups (B / O times the work, all of it in whole vectors). Before, such
convs ran in NCHW between conversions out of and back into the blocked layout:
regnet_y_400mf 14.4 -> 11.1 ms, resnext50_32x4d 82.1 -> 72.0 ms (medians of alternating
calls, BENCHMARKS run 22).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpress.backends.tvm.blocked_kernels import (
    ConvGeometry,
    blocks,
    copy_padded,
    padded_read,
)


def grouped_kernel(
    weight: np.ndarray, groups: int, channels: int, block: int, geometry: ConvGeometry
) -> tuple[np.ndarray, Any, str] | None:
    """(packed weights, ``kernel(data, packed)``, name) of a grouped OIHW conv over
    ``channels`` input channels held in blocks of ``block``: depthwise, or grouped where
    ``group_window`` lines the groups up with blocks; None otherwise."""
    out_channels, in_group = weight.shape[:2]
    if groups == channels and out_channels == groups and in_group == 1:
        packed = pack_depthwise_weight(weight, block)
        return packed, lambda x, k: depthwise_nchwc(x, k, geometry), "depthwise_nchwc"
    out_group = out_channels // groups
    whole = out_channels % block == 0 and channels % block == 0
    # whole groups per block may leave the last block part padding (RegNet's 440 channels
    # in blocks of 16: 27 blocks and 8 channels), read with zero weights like a dense conv's
    padded = block % out_group == 0 and in_group == out_group
    if not group_window(in_group, out_group, block) or not (whole or padded):
        return None
    packed = pack_group_weight(weight, groups, block)
    kernel = lambda x, k: group_conv2d_nchwc(x, k, geometry, out_group)  # noqa: E731
    return packed, kernel, "group_conv2d_nchwc"


def group_window(in_group: int, out_group: int, block: int) -> int:
    """Input channels each output block of a grouped conv reads (its groups' channels), or 0
    when the groups do not line up with blocks of ``block``: whole blocks per group
    (``out_group`` and ``in_group`` multiples of it), or whole groups per block
    (``out_group`` divides it, and ``in_group == out_group``, so the block's groups read
    exactly its own input block)."""
    if out_group % block == 0 and in_group % block == 0:
        return in_group
    if block % out_group == 0 and in_group == out_group:
        return block
    return 0


def pack_group_weight(weight: np.ndarray, groups: int, block: int) -> np.ndarray:
    """Grouped OIHW weights ``[O, I / groups, KH, KW]`` as ``[O / B, window, KH, KW, B]``:
    for each output channel, its group's filter at that group's place in the input window
    of its block (``group_window``), zero elsewhere (the other groups of a block that
    holds several, and padded output channels past O)."""
    out, in_group, kh, kw = weight.shape
    out_group = out // groups
    window = group_window(in_group, out_group, block)
    packed = np.zeros((blocks(out, block), window, kh, kw, block), weight.dtype)
    for o in range(out):
        ob, oi = divmod(o, block)
        offset = (o // out_group) * in_group - (ob * block // out_group) * in_group
        packed[ob, offset : offset + in_group, :, :, oi] = weight[o]
    return packed


def pack_depthwise_weight(weight: np.ndarray, block: int) -> np.ndarray:
    """Depthwise ``[C, 1, KH, KW]`` weights as ``[C / B, KH, KW, B]``, zero for padding."""
    channels, _, kh, kw = weight.shape
    padded = np.zeros((blocks(channels, block) * block, kh, kw), weight.dtype)
    padded[:channels] = weight[:, 0]
    return np.ascontiguousarray(padded.reshape(-1, block, kh, kw).transpose(0, 2, 3, 1))


def group_conv2d_nchwc(data: Any, weight: Any, geometry: ConvGeometry, out_group: int) -> Any:
    """A grouped conv on a blocked input: ``out[n, ob, y, x, oi] = sum_{rb, ri, ky, kx}
    in[n, first(ob) + rb, y*s + ky*d, x*s + kx*d, ri] * w[ob, rb*B + ri, ky, kx, oi]``, where
    ``first(ob)`` is the first input block of the groups of output block ``ob`` and ``w``
    comes from ``pack_group_weight`` (its input window: whole blocks). A block that holds
    several groups sums over all their channels, with zero weights across groups."""
    from tvm import te

    out_blocks, window, kh, kw, block = (int(d) for d in weight.shape)
    batch, height, width = int(data.shape[0]), int(data.shape[2]), int(data.shape[3])
    oh, ow = geometry.output(height, width, kh, kw)
    data, geometry = copy_padded(data, geometry, kh, blocked=True)
    (sy, sx), (dy, dx) = geometry.strides, geometry.dilation
    rb = te.reduce_axis((0, window // block), "rb")
    ri = te.reduce_axis((0, block), "ri")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    window_blocks = window // block

    def body(n: Any, ob: Any, y: Any, x: Any, oi: Any) -> Any:
        first = ob * block // out_group * window_blocks if out_group >= block else ob

        def index(iy: Any, ix: Any) -> Any:
            return (n, first + rb, iy, ix, ri)

        value = padded_read(data, geometry, index, y * sy + ry * dy, x * sx + rx * dx)
        products = value * weight[ob, rb * block + ri, ry, rx, oi]
        return te.sum(products, axis=[rb, ri, ry, rx])

    shape = (batch, out_blocks, oh, ow, block)
    return te.compute(shape, body, name="group_conv2d_nchwc")


def depthwise_nchwc(data: Any, weight: Any, geometry: ConvGeometry) -> Any:
    """``out[n, cb, y, x, ci] = sum_{ky, kx} in[n, cb, y*s + ky*d, x*s + kx*d, ci] *
    w[cb, ky, kx, ci]`` on blocked data; ``weight`` from ``pack_depthwise_weight``."""
    from tvm import te

    batch, cblocks, height, width, block = (int(d) for d in data.shape)
    _, kh, kw, _ = (int(d) for d in weight.shape)
    oh, ow = geometry.output(height, width, kh, kw)
    (sy, sx), (dy, dx) = geometry.strides, geometry.dilation
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")

    def body(n: Any, cb: Any, y: Any, x: Any, ci: Any) -> Any:
        def index(iy: Any, ix: Any) -> Any:
            return (n, cb, iy, ix, ci)

        value = padded_read(data, geometry, index, y * sy + ry * dy, x * sx + rx * dx)
        return te.sum(value * weight[cb, ry, rx, ci], axis=[ry, rx])

    return te.compute((batch, cblocks, oh, ow, block), body, name="depthwise_nchwc")
