"""Torch handlers for QuantizeLinear/DequantizeLinear (fake-quant).

QDQ pairs become fake-quant: Q computes clamp(round(x/s) + zp) in float with round()'s
gradient passed straight through, DQ computes (q - zp)·s, so scales get LSQ-style
gradients. A DequantizeLinear whose input is an integer weight (``NodeArgs.latent``) reads a
float latent weight and fake-quantizes it first. GRU and LSTM are in ``torch_ops_rnn``.
"""

from __future__ import annotations

from typing import Any

import torch

from onnxpress.train.torch_ops import Handler, NodeArgs, Tensor

_QRANGES = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "uint16": (0, 65535),
    "int16": (-32768, 32767),
    "int32": (-(2**31), 2**31 - 1),
}


def qrange(dtype: Any) -> tuple[int, int]:
    """The integer range of a numpy or torch dtype name (uint8, int8, int16, int32)."""
    return _QRANGES[str(dtype).split(".")[-1]]


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _per_axis(t: Tensor, x: Tensor, axis: int) -> Tensor:
    if t.dim() == 1 and t.numel() > 1:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = t.numel()
        return t.reshape(shape)
    return t


def _scale_zp(a: NodeArgs, x: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
    axis = int(a.attrs.get("axis", 1))
    zp = a.opt(2)
    low, high = qrange(zp.dtype) if zp is not None else (0, 255)
    zero = torch.zeros(()) if zp is None else _per_axis(zp.to(torch.float32), x, axis)
    return _per_axis(a.x(1), x, axis), zero, (low, high)


def _quantize(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    scale, zero, (low, high) = _scale_zp(a, x)
    return [torch.clamp(_round_ste(x / scale) + zero, low, high)]


def _dequantize(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    scale, zero, (low, high) = _scale_zp(a, x)
    if a.latent is not None:  # fake-quantize the float latent weight first, within its span
        bound = float(a.latent)
        lower = torch.clamp(zero - bound, min=low)
        upper = torch.clamp(zero + bound, max=high)
        x = torch.maximum(torch.minimum(_round_ste(x / scale) + zero, upper), lower)
    return [(x.to(torch.float32) - zero) * scale]


HANDLERS: dict[str, Handler] = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
}
