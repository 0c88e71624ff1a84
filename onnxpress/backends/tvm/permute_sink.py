"""Move layout transposes down through elementwise ops, where they meet their inverse and vanish.

The int8 lowering (int8.py) computes its GEMMs on channels-last rows and hands the result back
to the model in NCHW: ``permute_dims(acc, NHWC -> NCHW)``, then the model's own elementwise
epilogue (correction, scale, bias, activation, requantization) in NCHW, then the next integer
layer's ``permute_dims(..., NCHW -> NHWC)``. Relax fuses that chain into one kernel that reads
the GEMM output in one order and writes the next operand in another. This pass rewrites

    op(permute_dims(x, p), c)  ->  permute_dims(op(x, c'), p)

for elementwise and broadcasting ops (c' is c transposed by the inverse of p: constants
directly, small tensors through a reshape and a transpose), requantizations with their axis
remapped, while the transposed value has no other use; and ``permute_dims(permute_dims(x, p),
q)`` becomes one transpose, or none when the two cancel. Between two integer layers the chain
then runs in channels-last order from the GEMM's rows to the next layer's operand.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from onnxpress.backends.tvm.int8_patterns import constant_value

UNARY = {
    "relax.astype",
    "relax.round",
    "relax.floor",
    "relax.ceil",
    "relax.negative",
    "relax.abs",
    "relax.exp",
    "relax.sigmoid",
    "relax.tanh",
    "relax.sqrt",
    "relax.clip",
    "relax.nn.relu",
    "relax.nn.gelu",
    "relax.nn.silu",
}
BINARY = {
    "relax.add",
    "relax.subtract",
    "relax.multiply",
    "relax.divide",
    "relax.maximum",
    "relax.minimum",
    "relax.power",
}
QUANTIZE = {"relax.quantize", "relax.dequantize"}
SMALL = 1 << 12  # a non-constant operand up to this many elements is transposed to follow


def _axes(call: Any) -> list[int]:
    """A permute_dims call's axes (None: reversed)."""
    rank = len(call.args[0].ty.shape)
    axes = call.attrs.axes
    return list(range(rank))[::-1] if axes is None else [int(a) for a in axes]


def _static_shape(expr: Any) -> tuple[int, ...] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except TypeError:
        return None


def sink_permutes(mod: Any) -> Any:
    """``mod`` with transposes moved below elementwise ops and cancelled where they meet."""
    from tvm import relax

    @relax.expr_functor.visitor
    class Uses(relax.PyExprVisitor):
        def __init__(self) -> None:
            super().__init__()
            self.counts: Counter[Any] = Counter()

        def visit_var_(self, var: Any) -> None:
            self.counts[var] += 1

        def visit_dataflow_var_(self, var: Any) -> None:
            self.counts[var] += 1

    @relax.expr_functor.mutator
    class Sink(relax.PyExprMutator):
        def __init__(self, mod: Any, uses: Counter[Any]) -> None:
            super().__init__(mod)
            self.uses = uses

        def _permuted(self, arg: Any) -> tuple[Any, list[int]] | None:
            """(x, p) when ``arg`` is bound to permute_dims(x, p). A transpose with other uses
            stays for them (fused into their kernels: index arithmetic, not a copy)."""
            if not isinstance(arg, relax.Var):
                return None
            value = self.lookup_binding(self.visit_expr(arg))
            if value is None or not isinstance(value, relax.Call):
                return None
            if getattr(value.op, "name", "") != "relax.permute_dims":
                return None
            return value.args[0], _axes(value)

        def _follow(self, expr: Any, axes: list[int]) -> Any:
            """``expr`` (rank <= len(axes)) broadcast-transposed by the inverse of ``axes``,
            or None where that would move a large tensor."""
            shape = _static_shape(expr)
            rank = len(axes)
            if shape is None or len(shape) > rank:
                return None
            if not shape:
                return expr  # a scalar broadcasts alike in any order
            inverse = [int(a) for a in np.argsort(axes)]
            padded = (1,) * (rank - len(shape)) + shape
            constant = constant_value(expr)
            if constant is not None:
                value = constant.reshape(padded).transpose(inverse)
                return relax.const(np.ascontiguousarray(value), str(constant.dtype))
            if int(np.prod(shape)) > SMALL:
                return None
            reshaped = self.builder_.emit(relax.op.reshape(expr, padded))
            return self.builder_.emit(relax.op.permute_dims(reshaped, inverse))

        def visit_call_(self, call: Any) -> Any:
            name = getattr(call.op, "name", "")
            rewritten = None
            if name == "relax.permute_dims":
                rewritten = self._compose(call)
            elif name in UNARY or name in QUANTIZE:
                rewritten = self._unary(call, name)
            elif name in BINARY:
                rewritten = self._binary(call)
            return rewritten if rewritten is not None else super().visit_call_(call)

        def _compose(self, call: Any) -> Any:
            inner = self.visit_expr(call.args[0])
            value = self.lookup_binding(inner)
            if not isinstance(value, relax.Call):
                return None
            if getattr(value.op, "name", "") != "relax.permute_dims":
                return None
            first, second = _axes(value), _axes(call)
            combined = [first[a] for a in second]
            if combined == list(range(len(combined))):
                return value.args[0]
            return relax.op.permute_dims(value.args[0], combined)

        def _unary(self, call: Any, name: str) -> Any:
            found = self._permuted(call.args[0])
            if found is None:
                return None
            source, axes = found
            rest = [self.visit_expr(a) for a in call.args[1:]]
            if name in QUANTIZE:
                axis = int(call.attrs.axis) % len(axes)
                build = relax.op.quantize if name == "relax.quantize" else relax.op.dequantize
                inner = build(source, *rest, axis=axes[axis], out_dtype=call.attrs.out_dtype)
            else:
                inner = relax.Call(call.op, [source, *rest], call.attrs, call.ty_args)
            return relax.op.permute_dims(self.builder_.emit(inner), axes)

        def _binary(self, call: Any) -> Any:
            found = [self._permuted(a) for a in call.args]
            axes = next((f[1] for f in found if f is not None), None)
            if axes is None or any(f is not None and f[1] != axes for f in found):
                return None
            args = []
            for arg, hit in zip(call.args, found, strict=True):
                if hit is not None:
                    args.append(hit[0])
                    continue
                moved = self._follow(self.visit_expr(arg), axes)
                if moved is None:
                    return None
                args.append(moved)
            inner = relax.Call(call.op, args, call.attrs, call.ty_args)
            return relax.op.permute_dims(self.builder_.emit(inner), axes)

    uses = Uses()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            uses.visit_expr(func)
    mutator = Sink(mod, uses.counts)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())
