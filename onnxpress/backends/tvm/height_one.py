"""Conv1d chains kept four-dimensional: the Relax pass ``SinkSqueeze``.

ConvAsConv2d (conv_as_conv2d.py) computes a float Conv1d as a conv2d of height 1 and
squeezes the result back to NCW. Between two Conv1d layers the model then reads

    y = squeeze(conv2d(...), [2]); z = relu(y + b); x = expand_dims(z, [2]); conv2d(x, ...)

and the blocked layout (blocked_layout.py), which keeps only 4-D NCHW tensors blocked,
converted every conv output back to NCW (a ``from_blocked`` kernel that no schedule rule
tiles: its read index ``c // 16, c % 16`` has no constant stride) and the next conv's input
back to blocks; the bias and activation ran as separate kernels after the conversion. A TCN
of 64 -> 64 Conv1d layers spent 11% of its time in those conversions (run 24).

This pass, run right after ConvAsConv2d, moves each such squeeze below the ops that follow
it, so that they run on the 4-D tensor, until an ``expand_dims`` on the same axis cancels it:

- elementwise ops of one argument (blocked_layout.UNARY);
- add, subtract, multiply, maximum, minimum and divide (blocked_layout.BINARY) of a
  squeezed tensor and another operand: a squeezed tensor, a constant (reshaped here) or
  any other tensor of rank <= 3 (given its height axis), when the result has the squeezed
  operand's shape;
- max and average pooling over the width (as pool2d of height 1);
- a mean over the width with keepdims (as a mean over height and width);
- concat along the channels when every part is squeezed.

Each rewritten op computes the same values in the same order (a unit axis added to every
operand changes neither broadcasting nor arithmetic), so results are bit-identical; what
nothing consumes is left to dead-code elimination.
"""

from __future__ import annotations

from typing import Any

from onnxpress.backends.tvm.blocked_layout import BINARY, UNARY
from onnxpress.backends.tvm.matmul_legalize import static_shape

__all__ = ["sink_squeeze_pass"]

POOLS = {"relax.nn.max_pool1d": "max_pool2d", "relax.nn.avg_pool1d": "avg_pool2d"}


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def _float32(expr: Any) -> bool:
    return str(getattr(getattr(expr, "ty", None), "dtype", "")) == "float32"


def _pool2d(call: Any, data: Any) -> Any | None:
    """The pool2d of height 1 over ``data`` [N, C, 1, W] that 1-D pool ``call`` is."""
    from tvm import relax

    attrs = call.attrs
    if str(attrs.layout) != "NCW" or str(attrs.out_layout) != "NCW":
        return None
    left, right = _ints(attrs.padding)
    kwargs = {
        "pool_size": (1, _ints(attrs.pool_size)[0]),
        "strides": (1, _ints(attrs.strides)[0]),
        "padding": (0, left, 0, right),
        "dilation": (1, _ints(attrs.dilation)[0]),
        "ceil_mode": bool(attrs.ceil_mode),
    }
    if POOLS[call.op.name] == "avg_pool2d":
        kwargs["count_include_pad"] = bool(attrs.count_include_pad)
        return relax.op.nn.avg_pool2d(data, **kwargs)
    return relax.op.nn.max_pool2d(data, **kwargs)


def sink_squeeze_pass() -> Any:
    """The relax module pass ``SinkSqueeze`` (see the module docstring)."""
    import tvm
    from tvm import relax

    from onnxpress.backends.tvm.fast_math import rewriting_pass

    @relax.expr_functor.mutator
    class _Sinker(relax.PyExprMutator):
        def _lifted(self, expr: Any) -> Any | None:
            """The [N, C, 1, W] float32 tensor that ``expr`` squeezes at axis 2, or None."""
            if not isinstance(expr, relax.Var):
                return None
            bound = self.lookup_binding(expr)
            if not isinstance(bound, relax.Call) or str(getattr(bound.op, "name", "")) != (
                "relax.squeeze"
            ):
                return None
            source = bound.args[0]
            shape = static_shape(source)
            axis = bound.attrs.axis
            if axis is None or _ints(axis) != [2] or shape is None or len(shape) != 4:
                return None
            return source if shape[2] == 1 and _float32(source) else None

        def _squeezed(self, four: Any) -> Any:
            return relax.op.squeeze(self.builder_.emit(four), [2])

        def _operand(self, arg: Any) -> Any | None:
            """``arg`` of a binary op with a squeezed tensor, with a unit height axis."""
            lifted = self._lifted(arg)
            if lifted is not None:
                return lifted
            shape = static_shape(arg)
            if shape is None or len(shape) > 3:
                return None
            if not shape:
                return arg  # a scalar broadcasts as it is
            three = [1] * (3 - len(shape)) + shape
            four = [three[0], three[1], 1, three[2]]
            if isinstance(arg, tvm.ir.Constant):
                return relax.const(arg.value.numpy().reshape(four))
            return self.builder_.emit(relax.op.reshape(arg, four))

        def _binary(self, call: Any) -> Any | None:
            out = static_shape(call)
            lifted = [self._lifted(a) for a in call.args]
            if out is None or not any(
                x is not None and static_shape(x) == [out[0], out[1], 1, out[2]] for x in lifted
            ):
                return None
            operands = [self._operand(a) for a in call.args]
            if any(x is None for x in operands):
                return None
            return relax.Call(call.op, operands, call.attrs, call.ty_args)

        def _rewrite(self, call: Any) -> Any | None:
            name = str(getattr(call.op, "name", ""))
            if name == "relax.expand_dims" and [a % 4 for a in _ints(call.attrs.axis)] == [2]:
                return self._lifted(call.args[0])  # the squeeze cancels
            if name in UNARY:
                lifted = self._lifted(call.args[0])
                if lifted is None:
                    return None
                new = relax.Call(call.op, [lifted, *call.args[1:]], call.attrs, call.ty_args)
                return self._squeezed(new)
            if name in BINARY and len(static_shape(call) or []) == 3:
                new = self._binary(call)
                return None if new is None else self._squeezed(new)
            if name in POOLS:
                lifted = self._lifted(call.args[0])
                new = None if lifted is None else _pool2d(call, lifted)
                return None if new is None else self._squeezed(new)
            if name == "relax.mean":
                lifted = self._lifted(call.args[0])
                axis = call.attrs.axis
                if lifted is None or not call.attrs.keepdims or axis is None:
                    return None
                if [a % 3 for a in _ints(axis)] != [2]:
                    return None
                return self._squeezed(relax.op.mean(lifted, [2, 3], keepdims=True))
            if (
                name == "relax.concat"
                and call.attrs.axis is not None
                and isinstance(call.args[0], relax.Tuple)
            ):
                parts = [self._lifted(p) for p in call.args[0].fields]
                if int(call.attrs.axis) % 3 != 1 or any(p is None for p in parts):
                    return None
                return self._squeezed(relax.op.concat(parts, axis=1))
            return None

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            new = self._rewrite(call) if _float32(call) else None
            return call if new is None else new

    return rewriting_pass("SinkSqueeze", _Sinker)
