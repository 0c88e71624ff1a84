"""Torch handlers for QuantizeLinear/DequantizeLinear (fake-quant) and GRU.

QDQ pairs become fake-quant: Q computes clamp(round(x/s) + zp) in float with round()'s
gradient passed straight through, DQ computes (q - zp)·s, so scales get LSQ-style
gradients. A DequantizeLinear whose input is an integer weight (``NodeArgs.latent``) reads a
float latent weight and fake-quantizes it first. GRU follows the ONNX spec (gates z, r, h;
``linear_before_reset``), forward direction and default activations only.
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


def _gru(a: NodeArgs) -> list[Tensor]:
    if a.attrs.get("direction", b"forward") != b"forward" or a.attrs.get("layout", 0):
        raise ValueError("GRU: only direction=forward, layout=0 is supported")
    if "activations" in a.attrs or a.opt(4) is not None or "clip" in a.attrs:
        raise ValueError("GRU: custom activations, clip and sequence_lens are not supported")
    x, w, r = a.x(0), a.x(1)[0], a.x(2)[0]
    hidden = r.shape[-1]
    bias = a.opt(3)
    if bias is None:
        bias = x.new_zeros(1, 6 * hidden)
    wb, rb = bias[0, : 3 * hidden], bias[0, 3 * hidden :]
    h0 = a.opt(5)
    h = h0[0] if h0 is not None else x.new_zeros(x.shape[1], hidden)
    before_reset = bool(a.attrs.get("linear_before_reset", 0))
    gates_x = torch.matmul(x, w.t()) + wb
    wz, wr, wh = torch.split(r, hidden, dim=0)
    steps = []
    for t in range(x.shape[0]):
        xz, xr, xh = torch.split(gates_x[t], hidden, dim=-1)
        rz, rr, rh = torch.split(rb, hidden)
        z = torch.sigmoid(xz + h @ wz.t() + rz)
        reset = torch.sigmoid(xr + h @ wr.t() + rr)
        if before_reset:
            candidate = torch.tanh(xh + reset * (h @ wh.t() + rh))
        else:
            candidate = torch.tanh(xh + (reset * h) @ wh.t() + rh)
        h = (1 - z) * candidate + z * h
        steps.append(h)
    y = torch.stack(steps).unsqueeze(1)
    return [y, h.unsqueeze(0)]


HANDLERS: dict[str, Handler] = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "GRU": _gru,
}
