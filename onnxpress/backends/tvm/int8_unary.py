"""int8.py's rewrites of ``quantize(f(dequantize(q)))``, where no multiply-add is involved.

* ``f`` = max_pool2d with the input's own scale and zero point: the pool runs on the 8-bit
  integers (max commutes with the monotone dequantize and quantize).
* ``f`` = an elementwise function of one tensor (sigmoid, tanh, exp, erf, GELU, SiLU), with
  per-tensor parameters on both sides: the 8-bit result depends only on the 8-bit input,
  so it becomes a 256-entry table computed at compile time and one gather per element,
  ``table[q]``. EfficientNet's SiLU (``x * sigmoid(x)``, quantized between) spent most
  of its epilogues in the float sigmoid (a polynomial exp and a division) and in the
  divisions of the quantizes around it. The table computes ``f`` in float64 on the
  dequantized float32 values and quantizes as ONNX does (divide, round half to even, add
  the zero point, saturate); onnxruntime's own float sigmoid is an approximation, so a
  value can land one step away where its result sits on a rounding boundary, which the
  compile-time check measures like every other requantization.
* any other ``quantize(x)`` by a constant per-tensor scale: ``x / s`` becomes ``x * (1 / s)``
  (``reciprocal_scale``). The divide was the slowest instruction of every GEMM's fused
  epilogue (one ``vdivps`` per vector of outputs); the product differs from the quotient
  by at most one ulp, so a result moves by one step only where ``x / s`` sits within an
  ulp of a rounding boundary, as onnxruntime's own requantization (a product by its
  combined scale) does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxpress.backends.tvm.int8_patterns import (
    Dequantized,
    Int8Lowering,
    constant_value,
    op_name,
)

INT_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
INJECTIVE = 2  # relax's OpPatternKind for ops that FuseOps fuses with their neighbours


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relax.sigmoid": _sigmoid,
    "relax.tanh": np.tanh,
    "relax.exp": np.exp,
    "relax.erf": _erf,
    "relax.nn.gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "relax.nn.silu": lambda x: x * _sigmoid(x),
}


def table(
    function: Callable[[np.ndarray], np.ndarray],
    source: Dequantized,
    scale: float,
    zero_point: int,
    out_dtype: str,
) -> np.ndarray:
    """``quantize(function(dequantize(q)))`` for every 8-bit q, in the order of q's bytes as
    unsigned (uint8: q; int8: q + 128)."""
    low, high = INT_RANGES[source.dtype]
    codes = np.arange(low, high + 1, dtype=np.int32)
    zero = int(source.zero_point.reshape(-1)[0])
    x = (codes - zero).astype(np.float32) * np.float32(source.scale.reshape(-1)[0])
    y = function(x.astype(np.float64)).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.rint(y / np.float32(scale)).astype(np.float64) + zero_point
    out_low, out_high = INT_RANGES[out_dtype]
    scaled = np.nan_to_num(scaled, nan=out_low, posinf=out_high, neginf=out_low)
    return np.clip(scaled, out_low, out_high).astype(out_dtype)


@dataclass(frozen=True)
class Rewriting:
    """What a rewrite reads from int8.py's mutator: its block builder, the expression bound
    to a variable, a dequantize's parts, and the record of what was lowered."""

    builder: Any
    producer: Callable[[Any], Any]
    dequantized: Callable[[Any], Dequantized | None]
    result: Int8Lowering


def _per_tensor(
    call: Any, operand: Any, dequantized: Callable[[Any], Dequantized | None]
) -> tuple[Dequantized, np.ndarray, np.ndarray] | None:
    """The per-tensor dequantize that ``operand`` is, and the constant scale and zero point
    of the quantize ``call``; None when either is missing."""
    source = dequantized(operand)
    scale, zero = constant_value(call.args[1]), constant_value(call.args[2])
    if source is None or scale is None or zero is None or not source.per_tensor:
        return None
    return source, scale, zero


def table_lookup(call: Any, at: Rewriting) -> Any:
    """``quantize(f(dequantize(q)))`` -> ``table[q]``, or None where it does not fit."""
    from tvm import relax

    inner = at.producer(call.args[0])
    name = op_name(inner)
    if name not in FUNCTIONS or len(inner.args) != 1:
        return None
    found = _per_tensor(call, inner.args[0], at.dequantized)
    if found is None:
        return None
    source, scale, zero = found
    out_dtype = str(call.attrs.out_dtype)
    if scale.size != 1 or zero.size != 1 or source.dtype not in INT_RANGES:
        return None
    if out_dtype not in INT_RANGES or source.constant is not None:
        return None
    values = table(
        FUNCTIONS[name], source, float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]), out_dtype
    )
    offset = 128 if source.dtype == "int8" else 0
    at.result.lowered[f"{name.removeprefix('relax.')} (table)"] += 1
    lookup = at.builder.call_te(_lookup, source.data, relax.const(values), offset)
    gvar = lookup.args[0]
    # one gather per element: fusable with the ops around it like any injective op
    at.builder.update_func(gvar, at.builder.get()[gvar].with_attr("op_pattern", INJECTIVE))
    return lookup


def _lookup(codes: Any, values: Any, offset: int) -> Any:
    from tvm import te

    return te.compute(
        codes.shape,
        lambda *i: values[codes[i].astype("int32") + offset],
        name="table_lookup",
    )


EIGHT_BIT = ("int8", "uint8")


def pooled_integers(call: Any, at: Rewriting) -> Any:
    """``quantize(max_pool2d(dequantize(q)))`` with q's own parameters -> ``max_pool2d(q)``."""
    from tvm import relax

    pooled = at.producer(call.args[0])
    if op_name(pooled) != "relax.nn.max_pool2d":
        return None
    found = _per_tensor(call, pooled.args[0], at.dequantized)
    if found is None:
        return None
    source, scale, zero = found
    if source.dtype not in EIGHT_BIT:
        return None  # no integer layer reads 16-bit values: the pool stays float (blocked)
    if str(call.attrs.out_dtype) != source.dtype or not (
        np.array_equal(scale.reshape(-1), source.scale.reshape(-1))
        and np.array_equal(zero.reshape(-1), source.zero_point.reshape(-1))
    ):
        return None
    attrs = pooled.attrs
    at.result.lowered["max_pool2d"] += 1
    data, layout = source.data, str(attrs.layout)
    if layout == "NCHW" == str(attrs.out_layout):
        # pooled channels-last (the channels are the vector lanes) between two transposes:
        # the one after cancels against the next integer layer's (layout_sink.py)
        data, layout = at.builder.emit(relax.op.permute_dims(data, [0, 2, 3, 1])), "NHWC"
    pooled_q = relax.op.nn.max_pool2d(
        data,
        pool_size=[int(v) for v in attrs.pool_size],
        strides=[int(v) for v in attrs.strides],
        padding=[int(v) for v in attrs.padding],
        dilation=[int(v) for v in attrs.dilation],
        ceil_mode=bool(attrs.ceil_mode),
        count_include_pad=bool(attrs.count_include_pad),
        layout=layout,
        out_layout=layout,
    )
    if layout == str(attrs.layout):
        return pooled_q
    return relax.op.permute_dims(at.builder.emit(pooled_q), [0, 3, 1, 2])


def reciprocal_scale(call: Any, at: Rewriting) -> Any:
    """``quantize(x, s, z)`` -> ``quantize(x * (1 / s), 1, z)`` for a constant per-tensor
    float32 scale ``s`` (see the module docstring); None otherwise."""
    from tvm import relax

    scale = constant_value(call.args[1])
    if scale is None or scale.size != 1 or str(call.args[0].ty.dtype) != "float32":
        return None
    value = float(scale.reshape(-1)[0])
    if not math.isfinite(value) or value == 0.0 or value == 1.0:
        return None
    inverse = relax.const(np.float32(1.0 / np.float64(np.float32(value))), "float32")
    one = relax.const(np.ones(scale.shape, np.float32), "float32")
    scaled = at.builder.emit(relax.op.multiply(call.args[0], inverse))
    return relax.op.quantize(
        scaled, one, call.args[2], axis=int(call.attrs.axis), out_dtype=str(call.attrs.out_dtype)
    )
