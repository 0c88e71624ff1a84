"""Vectorizable transcendental functions for CPU builds: the Relax pass ``FastMath``.

On llvm targets TVM lowers ``exp``, ``tanh``, ``erf`` and ``sigmoid`` (``1 / (1 +
exp(-x))``) to calls of the C library, one element at a time, even inside vectorized loops:
the SiLU epilogue of EfficientNet-B0's first expansion conv took 23 ms for 1.2 M elements,
16% of the model. This pass replaces them, before legalization, with TOPI's polynomial forms
(``fast_exp``: range reduction to 2^n * e^r and a polynomial, inputs clamped to about +-88;
``fast_tanh``, ``fast_erf``: rational approximations; softmax: the max-subtracted form on
``fast_exp``, over the last axis row by row (row_schedule.py), else TOPI's
``fast_softmax``), which LLVM vectorizes like any arithmetic. A layer norm over the last
axis runs row by row too (the same arithmetic), and so does a variance over the last axis
(InstanceNormalization, GroupNorm). A division by a float32 constant becomes a multiply by
its reciprocal where that is a normal number (``_by_reciprocal``); ``x ** 2`` and ``x ** 3``
become products (``_by_products``). Their error is well inside the compile-time check
against onnxruntime (max-rel 1e-4), which every library still passes.
"""

from __future__ import annotations

from typing import Any

from onnxpress.backends.tvm.row_schedule import (
    emit_layer_norm,
    emit_log_softmax,
    emit_softmax,
    emit_variance,
)

# relax op -> how it is rebuilt (with TOPI) on its first argument
FAST_OPS = ("relax.exp", "relax.tanh", "relax.erf", "relax.sigmoid", "relax.nn.softmax")
# rescheduled row by row: the same arithmetic, or (log-softmax) exp on fast_exp
ROW_OPS = ("relax.nn.layer_norm", "relax.nn.log_softmax", "relax.variance")


def fast_sigmoid(x: Any) -> Any:
    from tvm import te, topi

    exp = topi.fast_exp(topi.negative(x))
    one = te.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + exp(*i)), name="fast_sigmoid")


def fast_math_pass() -> Any:
    """The relax module pass ``FastMath`` (see the module docstring); float32 only."""
    from tvm import relax, topi

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if name == "relax.divide":
                return _by_reciprocal(call)
            if name == "relax.power":
                return _by_products(call)
            if name not in FAST_OPS + ROW_OPS or not _is_float32(call.args[0]):
                return call
            x = call.args[0]
            if name == "relax.nn.layer_norm":
                rows = emit_layer_norm(self.builder_, call)
                return call if rows is None else rows
            if name == "relax.variance":
                rows = emit_variance(self.builder_, call)
                return call if rows is None else rows
            if name == "relax.nn.log_softmax":
                rows = emit_log_softmax(self.builder_, x, int(call.attrs.axis))
                return call if rows is None else rows
            if name == "relax.nn.softmax":
                axis = int(call.attrs.axis)
                rows = emit_softmax(self.builder_, x, axis)  # the last axis, row by row
                if rows is not None:
                    return rows
                return self.builder_.call_te(topi.nn.fast_softmax, x, axis)
            build = {
                "relax.exp": topi.fast_exp,
                "relax.tanh": topi.fast_tanh,
                "relax.erf": topi.fast_erf,
                "relax.sigmoid": fast_sigmoid,
            }[name]
            return self.builder_.call_te(build, x)

    return rewriting_pass("FastMath", _Rewriter)


def rewriting_pass(name: str, rewriter: Any) -> Any:
    """A module pass that runs ``rewriter(mod)`` (a Relax PyExprMutator class) over every
    Relax function of the module."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: Any, _ctx: Any) -> Any:
        mutator = rewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return mutator.builder_.get()

    return _pass


def op_rewriting_pass(name: str, op: str, rewrite: Any) -> Any:
    """A module pass that replaces each call of ``op`` by ``rewrite(builder, call)``, where
    that returns an expression (None: the call stays)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if str(getattr(call.op, "name", "")) != op:
                return call
            new = rewrite(self.builder_, call)
            return call if new is None else new

    return rewriting_pass(name, _Rewriter)


def _by_reciprocal(call: Any) -> Any:
    """``x / c`` for a float32 constant ``c`` as ``x * (1 / c)`` where every reciprocal is a
    normal number (a vector division costs about 7 multiplies: GELU's ``x / sqrt(2)`` took
    as long as the rest of its epilogue); within two roundings of the quotient. Else ``call``."""
    import numpy as np
    import tvm
    from tvm import relax

    divisor = call.args[1]
    if not isinstance(divisor, tvm.ir.Constant) or not _is_float32(call.args[0]):
        return call
    values = divisor.value.numpy()
    if values.dtype != np.float32 or not np.all(np.isfinite(values)) or np.any(values == 0):
        return call
    with np.errstate(over="ignore", divide="ignore"):
        inverse = (1.0 / values.astype(np.float64)).astype(np.float32)
    if not np.all(np.abs(inverse) >= np.finfo(np.float32).tiny) or not np.all(np.isfinite(inverse)):
        return call
    return relax.op.multiply(call.args[0], relax.const(inverse))


SMALL_POWERS = (2.0, 3.0)  # x ** c as products of x, where c is one of these


def _by_products(call: Any) -> Any:
    """``x ** c`` for a float32 scalar constant c of 2 or 3 as ``x * x`` or ``x * x * x``
    (onnxruntime's CPU Pow does the same; TVM calls the C library's ``powf``
    per element: GPT-2's tanh GELU, ``x ** 3``, took 1 ms of a 3 ms layer). Else ``call``."""
    import numpy as np
    import tvm
    from tvm import relax

    x, exponent = call.args
    if not isinstance(exponent, tvm.ir.Constant) or not _is_float32(x):
        return call
    values = exponent.value.numpy()
    if values.dtype != np.float32 or values.size != 1:
        return call
    if float(values.reshape(-1)[0]) not in SMALL_POWERS:
        return call
    if values.ndim > int(getattr(x.ty, "ndim", -1)):  # the constant would add axes to x
        return call
    power = int(values.reshape(-1)[0])
    result = x
    for _ in range(power - 1):
        result = relax.op.multiply(result, x)
    return result


def _is_float32(expr: Any) -> bool:
    return str(getattr(getattr(expr, "ty", None), "dtype", "")) == "float32"
