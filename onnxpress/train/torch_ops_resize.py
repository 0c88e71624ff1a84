"""Torch handlers for the ONNX ops that grow spatial size: ConvTranspose, Resize, Upsample.

ConvTranspose: torch's conv_transposeNd with no padding, then the ONNX ``pads`` cropped
from each end (so asymmetric pads work); strides, dilations, group, output_padding, and
output_shape or auto_pad SAME_UPPER/SAME_LOWER (output = input * stride without
output_shape), which set the total padding, split with the odd one at the end (UPPER) or
the start (LOWER); auto_pad VALID crops nothing.

Resize/Upsample are separable: each axis whose size changes is resampled on its own, by a
gather of precomputed source indices (nearest) or a weighted sum of two gathers (linear),
so gradients reach X. Source coordinate of output index o on an axis of scale s:
  half_pixel (o+0.5)/s-0.5,  pytorch_half_pixel  the same, 0 when the output has size 1,
  align_corners o*(in-1)/(out-1),  asymmetric o/s.
Nearest rounds it (round_prefer_floor, round_prefer_ceil, floor, ceil) and clamps; linear
clamps it to [0, in-1] and blends the two neighbours. Upsample (opset 7-9) is Resize with
asymmetric coordinates and floor rounding. Cubic, tf_crop_and_resize, antialias and
keep_aspect_ratio_policy other than stretch raise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxpress.train.torch_ops import Handler, NodeArgs, Tensor


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _conv_transpose(a: NodeArgs) -> list[Tensor]:
    x, w, b = a.x(0), a.x(1), a.opt(2)
    spatial = w.dim() - 2
    auto_pad = _text(a.attrs.get("auto_pad", "NOTSET"))
    strides = list(a.attrs.get("strides", [1] * spatial))
    dilations = list(a.attrs.get("dilations", [1] * spatial))
    out_pad = list(a.attrs.get("output_padding", [0] * spatial))
    group = int(a.attrs.get("group", 1))
    kernel = list(w.shape[2:])
    full = [
        strides[k] * (x.shape[2 + k] - 1) + out_pad[k] + (kernel[k] - 1) * dilations[k] + 1
        for k in range(spatial)
    ]
    if "output_shape" in a.attrs or auto_pad.startswith("SAME"):
        wanted = list(a.attrs.get("output_shape", []))[-spatial:] or [
            x.shape[2 + k] * strides[k] for k in range(spatial)
        ]
        total = [full[k] - wanted[k] for k in range(spatial)]
        lower = auto_pad == "SAME_LOWER"
        begin = [(t + 1) // 2 if lower else t // 2 for t in total]
        pads = begin + [t - s for t, s in zip(total, begin, strict=True)]
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    else:
        pads = list(a.attrs.get("pads", [0] * (2 * spatial)))
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    # torch needs output_padding < stride or dilation; a larger one is the same as cropping less
    extra = [max(0, out_pad[k] - max(strides[k], dilations[k]) + 1) for k in range(spatial)]
    torch_pad = [out_pad[k] - extra[k] for k in range(spatial)]
    y = fn(x, w, b, strides, 0, torch_pad, group, dilations)
    if any(extra):
        y = F.pad(y, [v for k in reversed(range(spatial)) for v in (0, extra[k])])
    for k in range(spatial):
        y = y.narrow(2 + k, pads[k], y.shape[2 + k] - pads[k] - pads[k + spatial])
    return [y]


def _source(out_size: int, in_size: int, scale: float, mode: str, device: torch.device) -> Tensor:
    o = torch.arange(out_size, dtype=torch.float64, device=device)
    if mode == "asymmetric":
        return o / scale
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out_size > 1 else torch.zeros_like(o)
    if mode == "align_corners":
        return o * (in_size - 1) / (out_size - 1) if out_size > 1 else torch.zeros_like(o)
    raise ValueError(f"Resize: coordinate_transformation_mode {mode!r} is not supported")


def _nearest_index(source: Tensor, rounding: str, in_size: int) -> Tensor:
    if rounding == "floor":
        index = torch.floor(source)
    elif rounding == "ceil":
        index = torch.ceil(source)
    elif rounding in ("round_prefer_floor", "round_prefer_ceil"):
        half = source - torch.floor(source) == 0.5
        rounded = torch.floor(source + 0.5)
        index = torch.where(
            half, torch.floor(source) if rounding.endswith("floor") else rounded, rounded
        )
    else:
        raise ValueError(f"Resize: nearest_mode {rounding!r} is not supported")
    return index.clamp(0, in_size - 1).long()


def _resample(x: Tensor, axis: int, out_size: int, scale: float, a: NodeArgs, mode: str) -> Tensor:
    in_size = x.shape[axis]
    coordinates = _text(a.attrs.get("coordinate_transformation_mode", "half_pixel"))
    source = _source(out_size, in_size, scale, coordinates, x.device)
    if mode == "nearest":
        rounding = _text(a.attrs.get("nearest_mode", "round_prefer_floor"))
        return x.index_select(axis, _nearest_index(source, rounding, in_size))
    if mode != "linear":
        raise ValueError(f"Resize: mode {mode!r} is not supported")
    source = source.clamp(0, in_size - 1)
    low = torch.floor(source).long()
    high = (low + 1).clamp(max=in_size - 1)
    shape = [1] * x.dim()
    shape[axis] = out_size
    weight = (source - low).to(x.dtype).reshape(shape)
    return x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight


def _resize_to(x: Tensor, sizes: list[int], scales: list[float], a: NodeArgs, mode: str) -> Tensor:
    for axis in range(x.dim()):
        if sizes[axis] != x.shape[axis] or scales[axis] != 1.0:
            x = _resample(x, axis, sizes[axis], scales[axis], a, mode)
    return x


def _resize(a: NodeArgs) -> list[Tensor]:
    x = a.x(0)
    if int(a.attrs.get("antialias", 0)):
        raise ValueError("Resize: antialias is not supported")
    if _text(a.attrs.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise ValueError("Resize: keep_aspect_ratio_policy other than stretch is not supported")
    axes = [int(v) % x.dim() for v in a.attrs.get("axes", range(x.dim()))]
    scales_in, sizes_in = a.opt(2), a.opt(3)
    scales = [1.0] * x.dim()
    sizes = list(x.shape)
    if sizes_in is not None and sizes_in.numel():
        for axis, size in zip(axes, sizes_in.tolist(), strict=True):
            sizes[axis], scales[axis] = int(size), int(size) / x.shape[axis]
    elif scales_in is not None and scales_in.numel():
        for axis, scale in zip(axes, scales_in.tolist(), strict=True):
            scales[axis], sizes[axis] = float(scale), math.floor(x.shape[axis] * float(scale))
    else:
        raise ValueError("Resize: neither scales nor sizes is given")
    mode = _text(a.attrs.get("mode", "nearest"))
    return [_resize_to(x, sizes, scales, a, mode)]


def _upsample(a: NodeArgs) -> list[Tensor]:
    x = a.x(0)
    scales = [float(s) for s in (a.x(1).tolist() if len(a.inputs) > 1 else a.attrs["scales"])]
    sizes = [math.floor(d * s) for d, s in zip(x.shape, scales, strict=True)]
    mode = _text(a.attrs.get("mode", "nearest"))
    attrs = {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    as_resize = NodeArgs("Upsample", a.inputs, attrs)
    return [
        _resize_to(
            x, sizes, scales, as_resize, "linear" if mode in ("linear", "bilinear") else mode
        )
    ]


# Float inputs that give sizes, not weights: the converter keeps them as constants.
SIZE_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}
HANDLERS: dict[str, Handler] = {
    "ConvTranspose": _conv_transpose,
    "Resize": _resize,
    "Upsample": _upsample,
}
