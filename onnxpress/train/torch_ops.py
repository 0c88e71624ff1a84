"""Torch implementations of ONNX ops for ``onnxpress.train.torch_convert``: one function per op type.

Each handler takes a ``NodeArgs`` (input tensors, attributes) and returns the node's
outputs. Shapes, axes and other integer inputs arrive as integer tensors and are read with
``.tolist()``. Quantize/Dequantize are fake-quant: values stay float, round() passes the
gradient straight through, and scales receive gradients (LSQ-style). Semantics follow the
ONNX spec at opsets 13–21 for the attributes the handlers read; anything else raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class NodeArgs:
    op_type: str
    inputs: list[Tensor | None]
    attrs: dict[str, Any]
    # DequantizeLinear of a float latent weight: how far its integers may leave the zero point
    latent: int | None = None

    def x(self, index: int = 0) -> Tensor:
        value = self.inputs[index] if index < len(self.inputs) else None
        if value is None:
            raise ValueError(f"{self.op_type}: input {index} is missing")
        return value

    def opt(self, index: int) -> Tensor | None:
        return self.inputs[index] if index < len(self.inputs) else None

    def ints(self, index: int) -> list[int]:
        return [int(v) for v in self.x(index).reshape(-1).tolist()]


Handler = Callable[[NodeArgs], list[Tensor]]
HANDLERS: dict[str, Handler] = {}


def registrar(table: dict[str, Handler]) -> Callable[..., Callable[[Handler], Handler]]:
    """A decorator factory ``op(*names)`` that files a handler in ``table`` under each name."""

    def op(*names: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            for name in names:
                table[name] = fn
            return fn

        return register

    return op


op = registrar(HANDLERS)


def _unary(fn: Callable[[Tensor], Tensor]) -> Handler:
    return lambda a: [fn(a.x())]


for _name, _fn in {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Identity": lambda t: t,
    "Dropout": lambda t: t,
}.items():
    HANDLERS[_name] = _unary(_fn)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    return lambda a: [fn(a.x(0), a.x(1))]


for _name, _bin in {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Pow": torch.pow,
}.items():
    HANDLERS[_name] = _binary(cast(Callable[[Tensor, Tensor], Tensor], _bin))


@op("LeakyRelu")
def _leaky(a: NodeArgs) -> list[Tensor]:
    return [F.leaky_relu(a.x(), float(a.attrs.get("alpha", 0.01)))]


@op("Gelu")
def _gelu(a: NodeArgs) -> list[Tensor]:
    return [F.gelu(a.x(), approximate=a.attrs.get("approximate", b"none").decode())]


@op("Clip")
def _clip(a: NodeArgs) -> list[Tensor]:
    low, high = a.opt(1), a.opt(2)
    return [torch.clamp(a.x(), None if low is None else low, None if high is None else high)]


@op("Softmax", "LogSoftmax")
def _softmax(a: NodeArgs) -> list[Tensor]:
    fn = torch.softmax if a.op_type == "Softmax" else torch.log_softmax
    return [fn(a.x(), dim=int(a.attrs.get("axis", -1)))]


def _pads(a: NodeArgs, x: Tensor, kernel: list[int]) -> list[int]:
    """ONNX pads [begin..., end...] for ``x``'s spatial dims, ``auto_pad`` resolved.

    SAME_UPPER / SAME_LOWER pad so that out = ceil(in / stride), the odd pixel at the end
    (UPPER) or the beginning (LOWER); VALID pads nothing.
    """
    spatial = len(kernel)
    mode = a.attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode == "NOTSET":
        return list(a.attrs.get("pads", [0] * (2 * spatial)))
    if mode == "VALID":
        return [0] * (2 * spatial)
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"{a.op_type}: auto_pad={mode!r} is not an ONNX padding mode")
    strides = list(a.attrs.get("strides", [1] * spatial))
    dilations = list(a.attrs.get("dilations", [1] * spatial))
    begin, end = [], []
    for axis in range(spatial):
        size = int(x.shape[2 + axis])
        out = -(-size // strides[axis])
        extent = (kernel[axis] - 1) * dilations[axis] + 1
        total = max((out - 1) * strides[axis] + extent - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


def _padded(x: Tensor, pads: list[int], value: float = 0.0) -> tuple[Tensor, list[int]]:
    """Pad asymmetrically in advance when begin != end; returns the symmetric remainder."""
    n = len(pads) // 2
    if pads[:n] == pads[n:]:
        return x, pads[:n]
    torch_pads: list[int] = []
    for axis in reversed(range(n)):
        torch_pads += [pads[axis], pads[axis + n]]
    return F.pad(x, torch_pads, value=value), [0] * n


@op("Conv")
def _conv(a: NodeArgs) -> list[Tensor]:
    x, w, b = a.x(0), a.x(1), a.opt(2)
    spatial = w.dim() - 2
    x, pads = _padded(x, _pads(a, x, list(w.shape[2:])))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return [
        fn(
            x,
            w,
            b,
            list(a.attrs.get("strides", [1] * spatial)),
            pads,
            list(a.attrs.get("dilations", [1] * spatial)),
            int(a.attrs.get("group", 1)),
        )
    ]


@op("Gemm")
def _gemm(a: NodeArgs) -> list[Tensor]:
    x, w, c = a.x(0), a.x(1), a.opt(2)
    x = x.t() if a.attrs.get("transA", 0) else x
    w = w.t() if a.attrs.get("transB", 0) else w
    y = float(a.attrs.get("alpha", 1.0)) * (x @ w)
    return [y if c is None else y + float(a.attrs.get("beta", 1.0)) * c]


@op("MatMul")
def _matmul(a: NodeArgs) -> list[Tensor]:
    return [torch.matmul(a.x(0), a.x(1))]


@op("BatchNormalization")
def _batchnorm(a: NodeArgs) -> list[Tensor]:
    return [
        F.batch_norm(
            a.x(0), a.x(3), a.x(4), a.x(1), a.x(2), False, 0.0, float(a.attrs.get("epsilon", 1e-5))
        )
    ]


@op("LayerNormalization")
def _layernorm(a: NodeArgs) -> list[Tensor]:
    x = a.x(0)
    axis = int(a.attrs.get("axis", -1)) % x.dim()
    return [
        F.layer_norm(x, list(x.shape[axis:]), a.x(1), a.opt(2), float(a.attrs.get("epsilon", 1e-5)))
    ]


@op("MaxPool", "AveragePool")
def _pool(a: NodeArgs) -> list[Tensor]:
    kernel = list(a.attrs["kernel_shape"])
    spatial = len(kernel)
    is_max = a.op_type == "MaxPool"
    raw_pads = _pads(a, a.x(), kernel)
    x, pads = _padded(a.x(), raw_pads, float("-inf") if is_max else 0.0)
    strides = list(a.attrs.get("strides", [1] * spatial))
    ceil = bool(a.attrs.get("ceil_mode", 0))
    include_pad = bool(a.attrs.get("count_include_pad", 0))
    if not is_max and not include_pad and x is not a.x():
        # padded in advance: divide by the count of real pixels, not the window size
        mean = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        ones, _ = _padded(torch.ones_like(a.x()[:1, :1]), raw_pads)
        total = mean(x, kernel, strides, pads, ceil, True)
        return [total / mean(ones, kernel, strides, pads, ceil, True)]
    if is_max:
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        return [fn(x, kernel, strides, pads, list(a.attrs.get("dilations", [1] * spatial)), ceil)]
    avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    return [avg(x, kernel, strides, pads, ceil, bool(a.attrs.get("count_include_pad", 0)))]


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    dims = list(range(2, x.dim()))
    if a.op_type == "GlobalAveragePool":
        return [x.mean(dim=dims, keepdim=True)]
    return [x.amax(dim=dims, keepdim=True)]


@op("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    axes = (
        list(a.attrs["axes"]) if "axes" in a.attrs else (a.ints(1) if a.opt(1) is not None else [])
    )
    keep = bool(a.attrs.get("keepdims", 1))
    if not axes:
        axes = list(range(x.dim()))
    fn = cast(
        Callable[..., Tensor],
        {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax}[a.op_type],
    )
    return [fn(x, dim=axes, keepdim=keep)]


@op("Concat")
def _concat(a: NodeArgs) -> list[Tensor]:
    return [torch.cat([t for t in a.inputs if t is not None], dim=int(a.attrs["axis"]))]


@op("Reshape")
def _reshape(a: NodeArgs) -> list[Tensor]:
    x, shape = a.x(), a.ints(1)
    if not a.attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@op("Flatten")
def _flatten(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    axis = int(a.attrs.get("axis", 1)) % max(x.dim(), 1)
    return [x.reshape(int(torch.tensor(x.shape[:axis]).prod()), -1)]


@op("Transpose")
def _transpose(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    perm = list(a.attrs.get("perm", reversed(range(x.dim()))))
    return [x.permute(perm)]


@op("Unsqueeze")
def _unsqueeze(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    axes = list(a.attrs["axes"]) if "axes" in a.attrs else a.ints(1)
    rank = x.dim() + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(axis)
    return [x]


@op("Squeeze")
def _squeeze(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    axes = (
        list(a.attrs["axes"]) if "axes" in a.attrs else (a.ints(1) if a.opt(1) is not None else [])
    )
    if not axes:
        return [x.squeeze()]
    return [x.squeeze(tuple(ax % x.dim() for ax in axes))]


@op("Split")
def _split(a: NodeArgs) -> list[Tensor]:
    x, axis = a.x(), int(a.attrs.get("axis", 0))
    sizes = (
        list(a.attrs["split"])
        if "split" in a.attrs
        else (a.ints(1) if a.opt(1) is not None else None)
    )
    if sizes is None:
        parts = int(a.attrs.get("num_outputs", 0)) or 1
        chunk = -(-x.shape[axis] // parts)
        return list(torch.split(x, chunk, dim=axis))
    return list(torch.split(x, sizes, dim=axis))


@op("Gather")
def _gather(a: NodeArgs) -> list[Tensor]:
    x, indices = a.x(0), a.x(1).long()
    axis = int(a.attrs.get("axis", 0)) % x.dim()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    flat = torch.index_select(x, axis, indices.reshape(-1))
    shape = [*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :]]
    return [flat.reshape(shape)]


@op("Constant")
def _constant(a: NodeArgs) -> list[Tensor]:
    from onnx import numpy_helper

    if "value" not in a.attrs:
        raise ValueError("Constant: only the 'value' attribute is supported")
    return [torch.from_numpy(numpy_helper.to_array(a.attrs["value"]).copy())]


@op("Shape")
def _shape(a: NodeArgs) -> list[Tensor]:
    shape = list(a.x().shape)
    start, end = int(a.attrs.get("start", 0)), a.attrs.get("end")
    return [torch.tensor(shape[start : None if end is None else int(end)], dtype=torch.int64)]


@op("ConstantOfShape")
def _constant_of_shape(a: NodeArgs) -> list[Tensor]:
    from onnx import numpy_helper

    value = a.attrs.get("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).copy()) if value is not None else None
    dtype = fill.dtype if fill is not None else torch.float32
    number = fill.reshape(-1)[0].item() if fill is not None else 0.0
    return [torch.full(a.ints(0), number, dtype=dtype)]


@op("Cast")
def _cast(a: NodeArgs) -> list[Tensor]:
    from onnx import helper

    np_dtype = helper.tensor_dtype_to_np_dtype(int(a.attrs["to"]))
    return [a.x().to(torch.from_numpy(np.zeros(0, np_dtype)).dtype)]


@op("Slice")
def _slice(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    starts, ends = a.ints(1), a.ints(2)
    axes = a.ints(3) if a.opt(3) is not None else list(range(len(starts)))
    steps = a.ints(4) if a.opt(4) is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step != 1:
            raise ValueError("Slice: only step 1 is supported")
        size = x.shape[axis]
        index[axis % x.dim()] = slice(max(-size, min(start, size)), max(-size, min(end, size)))
    return [x[tuple(index)]]


@op("Expand")
def _expand(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    return [x * torch.ones(a.ints(1), dtype=x.dtype)]
