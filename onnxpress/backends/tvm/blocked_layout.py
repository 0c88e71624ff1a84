"""The Relax pass ``BlockedLayout``: float convolutions and the ops between them in the
blocked NCHWc layout (blocked_kernels.py), so chains of convolutions never go back to NCHW.

One walk over each function's bindings, in order. A binding is rewritten when it can run
blocked; the original variable then has no NCHW value until a binding that cannot run
blocked uses it, when one ``from_blocked`` conversion is emitted (once per variable). What
runs blocked:

- ``nn.conv2d`` in NCHW/OIHW with constant weights, float32, groups 1 (input blocked, or
  NCHW read directly, e.g. the 3-channel stem), depthwise (groups = channels, one filter
  each) or grouped with groups that line up with channel blocks (grouped_kernels.py):
  ``conv2d_nchwc`` / ``depthwise_nchwc`` / ``group_conv2d_nchwc``, weights packed here;
  ``nn.conv2d_transpose`` whose kernel equals its stride (``upsample_nchwc``); a 3x3
  stride-1 conv of a blocked input with enough channels runs as three Winograd kernels
  instead (winograd.py);
- elementwise ops with one argument (relu, clip, sigmoid, tanh, SiLU, GELU, exp, ...) on a
  blocked argument;
- add, subtract, multiply, maximum, minimum (and divide by a constant without zeros) of a
  blocked tensor and another operand whose NCHW shape broadcasts over channels (a
  constant, a blocked tensor of the same block, a per-channel [N, C, 1, 1] tensor, or a
  scalar), when the result has the blocked operand's shape;
- quantize and dequantize at one constant scale and zero point (float fake-quant left by
  the integer lowering, e.g. 16-bit activations) of a blocked tensor;
- ``mean`` over H and W with keepdims (global average pooling), max and average pooling,
  and ``concat`` along channels when every part is whole blocks.

Everything else (reshape, matmul, transposed convs, ...) reads NCHW. Only ops that map
finite values to finite values run blocked: padded channels hold whatever the ops leave in
them (zeros after a convolution), and the next convolution's zero weights for them only
cancel finite values. The block of a tensor is ``channel_block`` of its channel count.
Results match NCHW up to the summation order of the convolutions (each sums input
channels, then kernel rows and columns, like TOPI's NCHW conv2d).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxpress.backends.tvm.blocked_kernels import (
    ConvGeometry,
    channel_block,
    conv2d_nchwc,
    from_blocked,
    max_pool_nchwc,
    pack_channels,
    pack_conv_weight,
    to_blocked,
    upsample_nchwc,
)
from onnxpress.backends.tvm.fast_math import rewriting_pass
from onnxpress.backends.tvm.grouped_kernels import grouped_kernel
from onnxpress.backends.tvm.int8_patterns import constant_value
from onnxpress.backends.tvm.layout_sink import static_shape
from onnxpress.backends.tvm.winograd import emit_winograd, winograd_tile

logger = logging.getLogger(__name__)

UNARY = frozenset(
    {
        "relax.nn.relu",
        "relax.clip",
        "relax.sigmoid",
        "relax.tanh",
        "relax.nn.silu",
        "relax.nn.gelu",
        "relax.nn.gelu_tanh",
        "relax.nn.leakyrelu",
        "relax.exp",
        "relax.negative",
        "relax.abs",
    }
)
BINARY = frozenset(
    {
        "relax.add",
        "relax.subtract",
        "relax.multiply",
        "relax.maximum",
        "relax.minimum",
        "relax.divide",
    }
)


@dataclass(frozen=True)
class Blocked:
    """A tensor held blocked: ``var`` is [N, C / block, H, W, block] for NCHW ``shape``."""

    var: Any
    shape: tuple[int, ...]
    block: int

    @property
    def channels(self) -> int:
        return self.shape[1]


def _dtype(expr: Any) -> str:
    return str(getattr(getattr(expr, "ty", None), "dtype", ""))


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def blocked_layout_pass(lanes: int) -> Any:
    """The relax module pass ``BlockedLayout`` (see the module docstring) for blocks of up
    to ``lanes`` float32 channels."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.blocked: dict[Any, Blocked] = {}
            self.nchw: dict[Any, Any] = {}

        def visit_var_binding_(self, binding: Any) -> None:
            value = binding.value
            if (
                isinstance(binding.var, relax.DataflowVar)
                and isinstance(value, relax.Call)
                and isinstance(value.op, tvm.ir.Op)
                and (_dtype(value) == "float32" or value.op.name == "relax.quantize")
            ):
                result = self._rewrite(value)
                if result is not None:
                    self.blocked[binding.var] = result
                    return
            for var in relax.analysis.free_vars(value):
                self._to_nchw(var)
            super().visit_var_binding_(binding)

        def visit_match_cast_(self, binding: Any) -> None:
            for var in relax.analysis.free_vars(binding.value):
                self._to_nchw(var)
            super().visit_match_cast_(binding)

        # -- conversions ------------------------------------------------------------
        def _to_nchw(self, var: Any) -> Any:
            """The NCHW value of an original variable (a conversion, once, when blocked)."""
            held = self.blocked.get(var)
            if held is None:
                return self.visit_expr(var)
            if var not in self.nchw:
                converted = self.builder_.emit_te(
                    from_blocked, held.var, held.channels, primfunc_name_hint="from_blocked"
                )
                self.nchw[var] = converted
                self.set_var_remap(var, converted)
            return self.nchw[var]

        def _as_blocked(self, expr: Any, block: int, fill: float = 0.0) -> Any | None:
            """``expr`` (an NCHW-broadcastable operand with C channels) blocked by
            ``block``: its blocked value, a packed constant, or a conversion."""
            held = self.blocked.get(expr)
            if held is not None:
                return held.var if held.block == block else None
            shape = static_shape(expr)
            if shape is None or len(shape) > 4:
                return None
            if isinstance(expr, tvm.ir.Constant):
                return relax.const(pack_channels(expr.value.numpy(), block, fill))
            if len(shape) != 4 or fill != 0.0:
                return None
            return self.builder_.emit_te(
                to_blocked, self._to_nchw(expr), block, primfunc_name_hint="to_blocked"
            )

        # -- rewrites ----------------------------------------------------------------
        def _rewrite(self, call: Any) -> Blocked | None:
            name = call.op.name
            if name == "relax.nn.conv2d":
                return self._conv(call)
            if name == "relax.nn.conv2d_transpose":
                return self._upsample(call)
            if name in UNARY:
                held = self.blocked.get(call.args[0])
                if held is None:
                    return None
                args = [held.var, *call.args[1:]]
                new = relax.Call(call.op, args, call.attrs, call.ty_args)
                return Blocked(self.builder_.emit(new), held.shape, held.block)
            if name in ("relax.quantize", "relax.dequantize"):
                return self._quantizer(call)
            if name in BINARY:
                return self._binary(call)
            if name == "relax.mean":
                return self._mean(call)
            if name == "relax.nn.max_pool2d":
                return self._max_pool(call)
            if name == "relax.nn.avg_pool2d":
                return self._avg_pool(call)
            if name == "relax.concat":
                return self._concat(call)
            return None

        def _quantizer(self, call: Any) -> Blocked | None:
            """Elementwise quantize / dequantize at one constant scale and zero point: a
            padded channel's 0 comes back 0 through the pair."""
            held = self.blocked.get(call.args[0])
            values = [constant_value(a) for a in call.args[1:]]
            if held is None or any(v is None or v.size != 1 for v in values):
                return None
            args = [held.var, *call.args[1:]]
            new = relax.Call(call.op, args, call.attrs, call.ty_args)
            return Blocked(self.builder_.emit(new), held.shape, held.block)

        def _conv(self, call: Any) -> Blocked | None:
            found = _float_conv(call, "OIHW")
            if found is None:
                return None
            data, w, in_shape, out_shape = found
            geometry = ConvGeometry.of(call.attrs)
            held = self.blocked.get(data)
            if int(call.attrs.groups) == 1 and held is not None:
                kernel, channels = (w.shape[2], w.shape[3]), (w.shape[1], w.shape[0])
                m = winograd_tile(geometry, kernel, channels, (out_shape[2], out_shape[3]))
                if m:
                    block = channel_block(out_shape[1], lanes)
                    out = emit_winograd(self.builder_, held.var, w, geometry, m, out_shape, block)
                    return Blocked(out, out_shape, block)
            if int(call.attrs.groups) == 1:
                return self._dense(
                    data, w, out_shape, "conv2d_nchwc",
                    lambda x, k, in_block: conv2d_nchwc(x, k, geometry, in_block),
                )  # fmt: skip
            groups, channels = int(call.attrs.groups), in_shape[1]
            block = held.block if held is not None else channel_block(channels, lanes)
            grouped = grouped_kernel(w, groups, channels, block, geometry)
            source = self._as_blocked(data, block) if grouped is not None else None
            if grouped is None or source is None:
                return None
            packed, kernel, name = grouped
            out = self.builder_.emit_te(
                kernel, source, relax.const(packed), primfunc_name_hint=name
            )
            return Blocked(out, out_shape, block)

        def _upsample(self, call: Any) -> Blocked | None:
            attrs = call.attrs
            found = _float_conv(call, "IOHW")
            if found is None:
                return None
            data, w, _, out_shape = found
            if (
                int(attrs.groups) != 1
                or _ints(attrs.strides) != w.shape[2:]
                or any(_ints(attrs.padding))
                or any(_ints(attrs.output_padding))
                or set(_ints(attrs.dilation)) != {1}
            ):
                return None
            return self._dense(data, w.transpose(1, 0, 2, 3), out_shape, "upsample_nchwc",
                               upsample_nchwc)  # fmt: skip

        def _dense(
            self, data: Any, w: np.ndarray, out_shape: tuple[int, ...], name: str, kernel: Any
        ) -> Blocked:
            """A convolution over all input channels (OIHW weights ``w``): blocked input
            when there is one, else NCHW read directly; ``kernel(x, packed, in_block)``."""
            held = self.blocked.get(data)
            block = channel_block(out_shape[1], lanes)
            in_block = held.block if held is not None else 0
            # the sum runs over the real input channels only, not the padded ones of the
            # last block: a 24-channel input in two blocks of 16 is 24 steps, not 32
            packed = relax.const(pack_conv_weight(w, w.shape[1], block))
            source = held.var if held is not None else self._to_nchw(data)
            out = self.builder_.emit_te(
                lambda x, k: kernel(x, k, in_block), source, packed, primfunc_name_hint=name
            )
            return Blocked(out, out_shape, block)

        def _binary(self, call: Any) -> Blocked | None:
            lhs, rhs = call.args
            out_shape = static_shape(call)
            held = [self.blocked[a] for a in (lhs, rhs) if a in self.blocked]
            first = next((h for h in held if h.shape == out_shape), None)
            if first is None:
                return None
            divide = call.op.name == "relax.divide"
            value = constant_value(rhs)
            nonzero = value is not None and bool(np.all(value != 0))
            if divide and (self.blocked.get(lhs) is None or not nonzero):
                return None  # padded channels: 0 / 0
            operands = []
            for arg in (lhs, rhs):
                operand = self._operand(arg, first, fill=1.0 if divide else 0.0)
                if operand is None:
                    return None
                operands.append(operand)
            new = relax.Call(call.op, operands, call.attrs, call.ty_args)
            return Blocked(self.builder_.emit(new), first.shape, first.block)

        def _operand(self, arg: Any, like: Blocked, fill: float) -> Any | None:
            shape = static_shape(arg)
            if shape is None or len(shape) > 4:
                return None
            four = (1,) * (4 - len(shape)) + shape
            if four[1] == like.channels:
                return self._as_blocked(arg, like.block, fill)
            if four[1] != 1:
                return None
            if not shape:
                return self.visit_expr(arg)  # a scalar
            # the same value for every channel: one more axis for the channels in a block
            return self.builder_.emit(relax.op.reshape(self._to_nchw(arg), (*four, 1)))

        def _mean(self, call: Any) -> Blocked | None:
            held = self.blocked.get(call.args[0])
            axes = call.attrs.axis
            if held is None or axes is None or not bool(call.attrs.keepdims):
                return None
            if sorted(int(a) % 4 for a in axes) != [2, 3]:
                return None
            new = relax.op.mean(held.var, axis=[2, 3], keepdims=True)
            return Blocked(self.builder_.emit(new), static_shape(call) or (), held.block)

        def _max_pool(self, call: Any) -> Blocked | None:
            attrs = call.attrs
            held = self.blocked.get(call.args[0])
            out_shape = static_shape(call)
            if held is None or out_shape is None:
                return None
            if (attrs.layout, attrs.out_layout) != ("NCHW", "NCHW"):
                return None
            geometry = ConvGeometry.of(attrs)
            pool = _ints(attrs.pool_size)
            size = (out_shape[2], out_shape[3])
            out = self.builder_.emit_te(
                lambda x: max_pool_nchwc(x, (pool[0], pool[1]), geometry, size),
                held.var,
                primfunc_name_hint="max_pool_nchwc",
            )
            return Blocked(out, out_shape, held.block)

        def _avg_pool(self, call: Any) -> Blocked | None:
            """Relax's own avg_pool2d in the blocked layout (TOPI pools NCHW[B]c)."""
            attrs = call.attrs
            held = self.blocked.get(call.args[0])
            if held is None or (attrs.layout, attrs.out_layout) != ("NCHW", "NCHW"):
                return None
            layout = f"NCHW{held.block}c"
            new = relax.op.nn.avg_pool2d(
                held.var, _ints(attrs.pool_size), _ints(attrs.strides), _ints(attrs.padding),
                _ints(attrs.dilation), bool(attrs.ceil_mode), bool(attrs.count_include_pad),
                layout, layout,
            )  # fmt: skip
            return Blocked(self.builder_.emit(new), static_shape(call) or (), held.block)

        def _concat(self, call: Any) -> Blocked | None:
            parts = list(call.args[0].fields) if isinstance(call.args[0], relax.Tuple) else None
            out_shape = static_shape(call)
            if parts is None or out_shape is None or len(out_shape) != 4:
                return None
            if int(call.attrs.axis) % 4 != 1:
                return None
            found = [self.blocked[p] for p in parts if p in self.blocked]
            if not found or len({h.block for h in found}) != 1:
                return None
            block = found[0].block
            shapes = [static_shape(p) for p in parts]
            if any(s is None or s[1] % block for s in shapes):
                return None
            converted = [self._as_blocked(p, block) for p in parts]
            if any(c is None for c in converted):
                return None
            new = relax.op.concat(converted, axis=1)
            return Blocked(self.builder_.emit(new), out_shape, block)

    return rewriting_pass("BlockedLayout", _Rewriter)


def _float_conv(call: Any, kernel_layout: str) -> tuple[Any, np.ndarray, Any, Any] | None:
    """(data, weights, input shape, output shape) of a float32 NCHW convolution with constant
    ``kernel_layout`` weights and static 4-D shapes, else None."""
    import tvm

    attrs = call.attrs
    data, weight = call.args
    in_shape, out_shape = static_shape(data), static_shape(call)
    if (
        not isinstance(weight, tvm.ir.Constant)
        or in_shape is None
        or out_shape is None
        or len(in_shape) != 4
        or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
        != ("NCHW", kernel_layout, "NCHW")
        or _dtype(data) != "float32"
        or _dtype(weight) != "float32"
    ):
        return None
    return data, weight.value.numpy(), in_shape, out_shape
