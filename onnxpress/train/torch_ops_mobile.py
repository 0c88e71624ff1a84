"""Torch implementations of the further float ops that mobile and OCR backbones use.

Activations (HardSigmoid, HardSwish, PRelu, Elu, Selu, Celu, Softplus, Softsign, Mish,
ThresholdedRelu), variadic Max/Min/Sum/Mean, comparisons and Where, rounding and
trigonometry, the remaining reductions and ArgMax/ArgMin, Instance/Group/Lp normalization,
Pad, Tile, DepthToSpace/SpaceToDepth, Einsum, Range, CumSum and GatherElements. Semantics
follow the ONNX spec (opsets 13-21) for the attributes read here; ``onnxpress.train.
torch_convert`` merges ``HANDLERS`` with those of ``torch_ops`` and ``torch_ops_qdq``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from onnxpress.train.torch_ops import Handler, NodeArgs, Tensor, registrar

HANDLERS: dict[str, Handler] = {}
op = registrar(HANDLERS)


def _alpha(a: NodeArgs, default: float) -> float:
    return float(a.attrs.get("alpha", default))


_ACTIVATIONS: dict[str, Callable[[NodeArgs, Tensor], Tensor]] = {
    "HardSigmoid": lambda a, x: torch.clamp(
        _alpha(a, 0.2) * x + float(a.attrs.get("beta", 0.5)), 0.0, 1.0
    ),
    "HardSwish": lambda a, x: F.hardswish(x),
    "Elu": lambda a, x: F.elu(x, _alpha(a, 1.0)),
    "Celu": lambda a, x: F.celu(x, _alpha(a, 1.0)),
    "Selu": lambda a, x: (
        float(a.attrs.get("gamma", 1.05070102214813232421875))
        * torch.where(x > 0, x, _alpha(a, 1.67326319217681884765625) * (torch.exp(x) - 1))
    ),
    "Softplus": lambda a, x: F.softplus(x),
    "Softsign": lambda a, x: F.softsign(x),
    "Mish": lambda a, x: F.mish(x),
    "ThresholdedRelu": lambda a, x: torch.where(x > _alpha(a, 1.0), x, torch.zeros_like(x)),
    "Floor": lambda a, x: torch.floor(x),
    "Ceil": lambda a, x: torch.ceil(x),
    "Round": lambda a, x: torch.round(x),  # half to even, as ONNX
    "Sign": lambda a, x: torch.sign(x),
    "Sin": lambda a, x: torch.sin(x),
    "Cos": lambda a, x: torch.cos(x),
    "Tan": lambda a, x: torch.tan(x),
    "Asin": lambda a, x: torch.asin(x),
    "Acos": lambda a, x: torch.acos(x),
    "Atan": lambda a, x: torch.atan(x),
    "Sinh": lambda a, x: torch.sinh(x),
    "Cosh": lambda a, x: torch.cosh(x),
    "Asinh": lambda a, x: torch.asinh(x),
    "Acosh": lambda a, x: torch.acosh(x),
    "Atanh": lambda a, x: torch.atanh(x),
    "Shrink": lambda a, x: torch.where(
        x < -float(a.attrs.get("lambd", 0.5)),
        x + float(a.attrs.get("bias", 0.0)),
        torch.where(
            x > float(a.attrs.get("lambd", 0.5)),
            x - float(a.attrs.get("bias", 0.0)),
            torch.zeros_like(x),
        ),
    ),
    "Not": lambda a, x: torch.logical_not(x),
    "IsNaN": lambda a, x: torch.isnan(x),
}


def _activation(fn: Callable[[NodeArgs, Tensor], Tensor]) -> Handler:
    return lambda a: [fn(a, a.x())]


for _name, _fn in _ACTIVATIONS.items():
    HANDLERS[_name] = _activation(_fn)


@op("PRelu")
def _prelu(a: NodeArgs) -> list[Tensor]:
    x = a.x(0)
    return [torch.where(x < 0, a.x(1) * x, x)]


_VARIADIC: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Max": torch.maximum,
    "Min": torch.minimum,
    "Sum": torch.add,
    "Mean": torch.add,
}


@op(*_VARIADIC)
def _variadic(a: NodeArgs) -> list[Tensor]:
    values = [t for t in a.inputs if t is not None]
    out = functools.reduce(_VARIADIC[a.op_type], values)
    return [out / len(values) if a.op_type == "Mean" else out]


_COMPARE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}


@op(*_COMPARE)
def _compare(a: NodeArgs) -> list[Tensor]:
    return [_COMPARE[a.op_type](a.x(0), a.x(1))]


@op("Where")
def _where(a: NodeArgs) -> list[Tensor]:
    return [torch.where(a.x(0).bool(), a.x(1), a.x(2))]


@op("Mod")
def _mod(a: NodeArgs) -> list[Tensor]:
    fn = torch.fmod if a.attrs.get("fmod", 0) else torch.remainder
    return [fn(a.x(0), a.x(1))]


def _axes(a: NodeArgs, rank: int) -> list[int] | None:
    """Reduction axes from the attribute or input 1; None: all (or none with noop)."""
    if "axes" in a.attrs:
        axes = list(a.attrs["axes"])
    elif a.opt(1) is not None and a.x(1).numel():
        axes = a.ints(1)
    else:
        return [] if a.attrs.get("noop_with_empty_axes", 0) else None
    return sorted(axis % rank for axis in axes)


_REDUCE: dict[str, Callable[[Tensor, list[int], bool], Tensor]] = {
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
}


@op(*_REDUCE, "ReduceProd")
def _reduce(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    axes = _axes(a, x.dim())
    keep = bool(a.attrs.get("keepdims", 1))
    if axes == []:
        return [x]
    dims = list(range(x.dim())) if axes is None else axes
    if a.op_type == "ReduceProd":
        out = x
        for axis in sorted(dims, reverse=True):
            out = torch.prod(out, dim=axis, keepdim=keep)
        return [out]
    return [_REDUCE[a.op_type](x, dims, keep)]


@op("ArgMax", "ArgMin")
def _arg(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    axis = int(a.attrs.get("axis", 0)) % x.dim()
    keep = bool(a.attrs.get("keepdims", 1))
    if a.attrs.get("select_last_index", 0):
        flipped = torch.flip(x, [axis])
        index = (torch.argmax if a.op_type == "ArgMax" else torch.argmin)(flipped, axis, keep)
        return [x.shape[axis] - 1 - index]
    return [(torch.argmax if a.op_type == "ArgMax" else torch.argmin)(x, axis, keep)]


@op("InstanceNormalization")
def _instance_norm(a: NodeArgs) -> list[Tensor]:
    eps = float(a.attrs.get("epsilon", 1e-5))
    return [F.instance_norm(a.x(0), weight=a.x(1), bias=a.x(2), eps=eps)]


@op("GroupNormalization")
def _group_norm(a: NodeArgs) -> list[Tensor]:
    x, scale, bias = a.x(0), a.x(1), a.x(2)
    groups = int(a.attrs["num_groups"])
    channels = x.shape[1]
    if scale.numel() != channels:  # opset 18: one scale and bias per group
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    eps = float(a.attrs.get("epsilon", 1e-5))
    return [F.group_norm(x, groups, scale, bias, eps)]


@op("LpNormalization")
def _lp_norm(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    p = int(a.attrs.get("p", 2))
    return [x / torch.norm(x, p=p, dim=int(a.attrs.get("axis", -1)), keepdim=True)]


@op("Pad")
def _pad(a: NodeArgs) -> list[Tensor]:
    x = a.x(0)
    pads = list(a.attrs["pads"]) if "pads" in a.attrs else a.ints(1)
    value = a.opt(2)
    fill = float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0
    fill = float(a.attrs.get("value", fill))
    count = len(pads) // 2
    axes = a.ints(3) if a.opt(3) is not None else list(range(count))
    begin = {axis % x.dim(): pads[i] for i, axis in enumerate(axes)}
    end = {axis % x.dim(): pads[i + count] for i, axis in enumerate(axes)}
    mode = a.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode == "constant":
        torch_pads: list[int] = []
        for axis in reversed(range(x.dim())):
            torch_pads += [begin.get(axis, 0), end.get(axis, 0)]
        return [F.pad(x, torch_pads, value=fill)]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    for axis in range(x.dim()):  # one axis at a time: torch pads only trailing dims here
        if begin.get(axis, 0) or end.get(axis, 0):
            moved = torch.movedim(x, axis, -1)
            flat = moved.reshape(-1, 1, moved.shape[-1])
            flat = F.pad(flat, [begin.get(axis, 0), end.get(axis, 0)], mode=torch_mode)
            x = torch.movedim(flat.reshape(*moved.shape[:-1], flat.shape[-1]), -1, axis)
    return [x]


@op("Tile")
def _tile(a: NodeArgs) -> list[Tensor]:
    return [a.x(0).repeat(*a.ints(1))]


@op("DepthToSpace")
def _depth_to_space(a: NodeArgs) -> list[Tensor]:
    x, block = a.x(), int(a.attrs["blocksize"])
    n, c, h, w = x.shape
    mode = a.attrs.get("mode", b"DCR")
    if (mode.decode() if isinstance(mode, bytes) else mode) == "CRD":
        return [F.pixel_shuffle(x, block)]
    y = x.reshape(n, block, block, c // block**2, h, w).permute(0, 3, 4, 1, 5, 2)
    return [y.reshape(n, c // block**2, h * block, w * block)]


@op("SpaceToDepth")
def _space_to_depth(a: NodeArgs) -> list[Tensor]:
    x, block = a.x(), int(a.attrs["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * block**2, h // block, w // block)]


@op("Einsum")
def _einsum(a: NodeArgs) -> list[Tensor]:
    equation = a.attrs["equation"]
    text = equation.decode() if isinstance(equation, bytes) else str(equation)
    return [torch.einsum(text.replace(" ", ""), *[t for t in a.inputs if t is not None])]


@op("Range")
def _range(a: NodeArgs) -> list[Tensor]:
    start, limit, delta = (a.x(i).reshape(()) for i in range(3))
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


@op("CumSum")
def _cumsum(a: NodeArgs) -> list[Tensor]:
    x = a.x(0)
    axis = a.ints(1)[0] % x.dim()
    reverse, exclusive = a.attrs.get("reverse", 0), a.attrs.get("exclusive", 0)
    y = torch.flip(x, [axis]) if reverse else x
    out = torch.cumsum(y, axis)
    if exclusive:
        out = out - y
    return [torch.flip(out, [axis]) if reverse else out]


@op("GatherElements")
def _gather_elements(a: NodeArgs) -> list[Tensor]:
    x, index = a.x(0), a.x(1).long()
    axis = int(a.attrs.get("axis", 0)) % x.dim()
    index = torch.where(index < 0, index + x.shape[axis], index)
    return [torch.gather(x, axis, index)]


@op("Hardmax")
def _hardmax(a: NodeArgs) -> list[Tensor]:
    x = a.x()
    axis = int(a.attrs.get("axis", -1)) % x.dim()
    return [F.one_hot(torch.argmax(x, axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)]


@op("TopK")
def _topk(a: NodeArgs) -> list[Tensor]:
    x = a.x(0)
    axis = int(a.attrs.get("axis", -1)) % x.dim()
    largest = bool(a.attrs.get("largest", 1))
    values, indices = torch.topk(x, a.ints(1)[0], axis, largest, sorted=True)
    return [values, indices]


@op("LRN")
def _lrn(a: NodeArgs) -> list[Tensor]:
    size = int(a.attrs["size"])
    alpha, beta = float(a.attrs.get("alpha", 1e-4)), float(a.attrs.get("beta", 0.75))
    return [F.local_response_norm(a.x(), size, alpha, beta, float(a.attrs.get("bias", 1.0)))]


@op("Trilu")
def _trilu(a: NodeArgs) -> list[Tensor]:
    k = a.ints(1)[0] if a.opt(1) is not None else 0
    fn = torch.triu if a.attrs.get("upper", 1) else torch.tril
    return [fn(a.x(0), k)]
