"""Strided transposed convolutions as one convolution per output phase: the Relax pass
``TransposedAsPhases``.

A transposed convolution with stride s writes output row ``q * s + r`` from input rows
``q - m`` and kernel rows ``r + m * s`` only (m = 0, 1, ...): for each phase ``r`` of the
output it is an ordinary convolution with ``K = ceil(k / s)`` taps. This pass (run after
constant folding, before the blocked layout: schedule.layout_passes, so the folded float
weights of a QDQ model's transposed convs, which int8.py keeps float, qualify too)
computes all ``s_h * s_w`` phases as one conv2d whose output channels are (channel,
phase row, phase column),

    phases = conv2d(x, W2, padding K - 1)              # [N, O * sh * sw, H + Kh - 1, W + Kw - 1]
    W2[(o, ry, rx), c, a, b] = w[c, o, ry + (Kh - 1 - a) * sh, rx + (Kw - 1 - b) * sw]

(zero where the kernel index passes k; reordered at compile time), interleaves the phases
into the full output (reshape, transpose, reshape: a pixel shuffle) and crops the padding.
The conv2d then takes the blocked path (blocked_layout.py). TVM's own form dilates the
input with zeros and runs the full k x k kernel over it: for the 4 x 4, stride-2 upsampling
of pose and decoder heads three quarters of its multiply-adds were by zero, and the kernel
ran at 13-27 GMAC/s (a pose model's three deconvolutions took 13.2 of its 21.8 ms; run 25).

Applies to float32 conv2d_transpose calls in NCHW / IOHW with static shapes, constant
weights, one group, dilation 1, and a stride above 1 (stride 1 is a plain convolution of
the flipped kernel, which this form also covers). Left alone: a kernel equal to its stride
without padding (one tap per output pixel: the blocked ``upsample_nchwc``), grouped,
dilated or symbolic ones, and output padding beyond what the phases cover.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from onnxpress.backends.tvm.conv_as_conv2d import constant_conv_shapes
from onnxpress.backends.tvm.fast_math import op_rewriting_pass

__all__ = ["phase_weight", "transposed_as_phases_pass"]


def phase_weight(w: np.ndarray, strides: tuple[int, int]) -> np.ndarray:
    """The conv2d weight [O * sh * sw, C, Kh, Kw] of a transposed convolution's weight
    ``w`` [C, O, kh, kw] (see the module docstring)."""
    channels, outputs, kh, kw = w.shape
    sh, sw = strides
    taps_h, taps_w = math.ceil(kh / sh), math.ceil(kw / sw)
    out = np.zeros((outputs, sh, sw, channels, taps_h, taps_w), w.dtype)
    for ry in range(sh):
        for rx in range(sw):
            for a in range(taps_h):
                for b in range(taps_w):
                    y, x = ry + (taps_h - 1 - a) * sh, rx + (taps_w - 1 - b) * sw
                    if y < kh and x < kw:
                        out[:, ry, rx, :, a, b] = w[:, :, y, x].T
    return out.reshape(outputs * sh * sw, channels, taps_h, taps_w)


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def _plan(call: Any) -> tuple[np.ndarray, list[int], list[int]] | None:
    """(constant weight, input shape, output shape) when ``call`` is rewritten, else None."""
    shapes = constant_conv_shapes(call, "IOHW")
    if shapes is None:
        return None
    attrs = call.attrs
    if int(attrs.groups) != 1 or _ints(attrs.dilation) != [1, 1]:
        return None
    in_shape, w_shape, out_shape = shapes
    strides, padding = _ints(attrs.strides), _ints(attrs.padding)
    if strides == w_shape[2:] and not any(padding) and not any(_ints(attrs.output_padding)):
        return None  # one tap per output pixel: the blocked upsample kernel
    for axis in (0, 1):
        k, s = w_shape[2 + axis], strides[axis]
        covered = (in_shape[2 + axis] + math.ceil(k / s) - 1) * s
        if padding[axis] + out_shape[2 + axis] > covered:
            return None  # output padding past the phases' rows
    return call.args[1].value.numpy(), in_shape, out_shape


def _phases(
    builder: Any, call: Any, w: np.ndarray, in_shape: list[int], out_shape: list[int]
) -> Any:
    from tvm import relax

    attrs = call.attrs
    sh, sw = _ints(attrs.strides)
    top, left = _ints(attrs.padding)[:2]
    _, outputs, kh, kw = w.shape
    taps_h, taps_w = math.ceil(kh / sh), math.ceil(kw / sw)
    kernel = relax.const(phase_weight(w, (sh, sw)))
    conv = builder.emit(
        relax.op.nn.conv2d(
            call.args[0], kernel, padding=(taps_h - 1, taps_w - 1, taps_h - 1, taps_w - 1)
        )
    )
    n, rows, cols = in_shape[0], in_shape[2] + taps_h - 1, in_shape[3] + taps_w - 1
    split = builder.emit(relax.op.reshape(conv, [n, outputs, sh, sw, rows, cols]))
    moved = builder.emit(relax.op.permute_dims(split, [0, 1, 4, 2, 5, 3]))
    full = builder.emit(relax.op.reshape(moved, [n, outputs, rows * sh, cols * sw]))
    height, width = out_shape[2:]
    return relax.op.strided_slice(
        full, axes=[2, 3], begin=[top, left], end=[top + height, left + width]
    )


def _rewrite(builder: Any, call: Any) -> Any | None:
    plan = _plan(call)
    return None if plan is None else _phases(builder, call, *plan)


def transposed_as_phases_pass() -> Any:
    """The relax module pass ``TransposedAsPhases`` (see the module docstring)."""
    return op_rewriting_pass("TransposedAsPhases", "relax.nn.conv2d_transpose", _rewrite)
