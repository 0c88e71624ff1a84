"""Dilated convolutions whose taps mostly read padding, one 1x1 convolution per tap over the
output region it reaches: the Relax pass ``DilatedTapRegions``.

DeepLab's ASPP runs 3x3 convolutions with dilations 12, 24 and 36 on a feature map of
32 x 32 (a 256² input at output stride 8). A tap 24 pixels off reads the zero padding for
every output pixel closer than 24 to that side, so the blocked conv kernel multiplied
zeros for most of its work: about 25% of the dilation-24 branch's multiply-adds were
useful (48 ms of DeepLabV3-ResNet50's 358; docs/BENCHMARKS.md, run 25). For a stride-1
convolution this pass writes the sum over taps directly,

    out = sum over taps (ky, kx) of  pad(conv1x1(x[rows(ky), cols(kx)], w[:, :, ky, kx]))

where rows(ky) is the input rows that tap reads for the output rows [lo, hi) whose reads
are in range, and pad puts the region back in place with zeros around it. A tap that
reaches no output pixel is dropped; a tap that reaches every pixel reads the whole input
(for the dilation-36 branch only the centre tap is left: a 1x1 convolution). It applies
when the useful share of the multiply-adds is below ``MAX_USEFUL`` (the pads and adds
cost a pass over the output per tap), to float32 conv2d calls in NCHW / OIHW with static
shapes, constant weights, one group and stride 1. The sum runs in another order than the
convolution's (tap by tap, not channel by channel over all taps).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxpress.backends.tvm.conv_as_conv2d import constant_conv_shapes
from onnxpress.backends.tvm.fast_math import op_rewriting_pass

__all__ = ["MAX_USEFUL", "dilated_tap_regions_pass", "tap_ranges"]

MAX_USEFUL = 0.6  # rewrite when at most this share of the multiply-adds reads the input


def tap_ranges(size: int, out: int, taps: int, dilation: int, pad: int) -> list[tuple[int, int]]:
    """Per tap k of one axis (stride 1): the output range [lo, hi) whose input index
    ``o + k * dilation - pad`` lies in [0, size); (0, 0) when there is none."""
    ranges = []
    for k in range(taps):
        shift = k * dilation - pad
        lo, hi = max(0, -shift), min(out, size - shift)
        ranges.append((lo, hi) if hi > lo else (0, 0))
    return ranges


def _plan(call: Any) -> tuple[np.ndarray, list[int], list[int], list[int]] | None:
    """(weight, input shape, output shape, padding) when ``call`` is rewritten, else None."""
    shapes = constant_conv_shapes(call, "OIHW")
    if shapes is None:
        return None
    attrs = call.attrs
    dilation = [int(d) for d in attrs.dilation]
    if int(attrs.groups) != 1 or [int(s) for s in attrs.strides] != [1, 1] or dilation == [1, 1]:
        return None
    in_shape, w_shape, out_shape = shapes
    padding = [int(p) for p in attrs.padding]
    rows = tap_ranges(in_shape[2], out_shape[2], w_shape[2], dilation[0], padding[0])
    cols = tap_ranges(in_shape[3], out_shape[3], w_shape[3], dilation[1], padding[1])
    useful = sum(hi - lo for lo, hi in rows) * sum(hi - lo for lo, hi in cols)
    if useful > MAX_USEFUL * w_shape[2] * w_shape[3] * out_shape[2] * out_shape[3]:
        return None
    return call.args[1].value.numpy(), in_shape, out_shape, padding


def _tap_sum(
    builder: Any, call: Any, plan: tuple[np.ndarray, list[int], list[int], list[int]]
) -> Any:
    from tvm import relax

    w, in_shape, out_shape, padding = plan
    dilation = [int(d) for d in call.attrs.dilation]
    _, _, height, width = out_shape
    rows = tap_ranges(in_shape[2], height, w.shape[2], dilation[0], padding[0])
    cols = tap_ranges(in_shape[3], width, w.shape[3], dilation[1], padding[1])
    total = None
    for ky, (top, bottom) in enumerate(rows):
        for kx, (left, right) in enumerate(cols):
            if bottom == top or right == left:
                continue  # the tap reads padding only
            y0, x0 = top + ky * dilation[0] - padding[0], left + kx * dilation[1] - padding[1]
            region = (y0, x0, y0 + bottom - top, x0 + right - left)
            source = call.args[0]
            if region != (0, 0, in_shape[2], in_shape[3]):
                source = builder.emit(
                    relax.op.strided_slice(
                        source, axes=[2, 3], begin=list(region[:2]), end=list(region[2:])
                    )
                )
            tap = relax.const(np.ascontiguousarray(w[:, :, ky : ky + 1, kx : kx + 1]))
            part = builder.emit(relax.op.nn.conv2d(source, tap))
            if (top, left, bottom, right) != (0, 0, height, width):
                widths = [0, 0, 0, 0, top, height - bottom, left, width - right]
                part = builder.emit(relax.op.nn.pad(part, widths))
            total = part if total is None else builder.emit(relax.op.add(total, part))
    if total is None:  # no tap reaches the output: zeros
        return relax.const(np.zeros(out_shape, np.float32))
    return total


def _rewrite(builder: Any, call: Any) -> Any | None:
    plan = _plan(call)
    return None if plan is None else _tap_sum(builder, call, plan)


def dilated_tap_regions_pass() -> Any:
    """The relax module pass ``DilatedTapRegions`` (see the module docstring)."""
    return op_rewriting_pass("DilatedTapRegions", "relax.nn.conv2d", _rewrite)
