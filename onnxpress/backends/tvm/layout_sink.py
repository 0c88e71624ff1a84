"""Move transposes and row reshapes down through elementwise ops, where they meet their inverse
and vanish, so that the int8 GEMMs' epilogues run on the GEMM's own [rows, channels] output.

The int8 lowering (int8.py) computes its GEMMs on channels-last rows and hands the result back
to the model in NCHW: ``reshape(acc, [N, H, W, C])``, ``permute_dims(.., NHWC -> NCHW)``, then
the model's own elementwise epilogue (correction, scale, bias, activation, residual add,
requantization) in NCHW, then the next integer layer's ``permute_dims(.., NCHW -> NHWC)``.
This pass rewrites, for elementwise and broadcasting ops and requantizations,

    op(permute_dims(x, p), c)  ->  permute_dims(op(x, c'), p)    c' = c transposed by p^-1
    op(reshape(x, S), c)       ->  reshape(op(x, c'), S)         x and S end in the same axis;
                                                                 c' = c on x's shape

where c is a constant or small tensor (a per-channel vector: reshaped and transposed to
follow), a scalar, or the same layout change of another tensor (a residual add); a full-size
tensor under a reshape is reshaped to x's shape (a view). Requantizations keep their axis
(remapped). ``permute_dims(permute_dims(x, p), q)`` and ``reshape(reshape(x, S), T)`` become
one op, or none where they cancel. Between two integer layers the epilogue then reads the
GEMM's [rows, channels] output directly, which lets Relax fuse it into the GEMM
(int8_kernels.packed_gemm is marked output-elementwise-fusable; int8_gemm.py schedules
the fused kernel). A transpose with other uses stays for them (fused into their kernels as
index arithmetic).
"""

from __future__ import annotations

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


def static_shape(expr: Any) -> tuple[int, ...] | None:
    """The static shape of ``expr``'s type; None without a shape or with a symbolic one."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except TypeError:
        return None


def _axes(call: Any) -> tuple[int, ...]:
    """A permute_dims call's axes (None: reversed)."""
    rank = len(call.args[0].ty.shape)
    axes = call.attrs.axes
    return tuple(range(rank))[::-1] if axes is None else tuple(int(a) for a in axes)


def sink_layout_changes(mod: Any) -> Any:
    """``mod`` with transposes and row reshapes moved below elementwise ops, cancelled where
    they meet."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Sink(relax.PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.followers: set[Any] = set()  # operands moved to follow: never sunk back

        def _value(self, var: Any) -> Any:
            """What ``var`` is bound to, through aliases (None for a parameter)."""
            value = self.lookup_binding(var)
            while isinstance(value, relax.Var):
                value = self.lookup_binding(value)
            return value

        def _change(self, arg: Any) -> tuple[str, Any, tuple[int, ...]] | None:
            """("permute", x, axes) or ("reshape", x, shape) for a var bound to a transpose or
            to a reshape that keeps the last axis; else None."""
            if not isinstance(arg, relax.Var) or arg in self.followers:
                return None
            value = self._value(arg)
            if not isinstance(value, relax.Call):
                return None
            name = getattr(value.op, "name", "")
            if name == "relax.permute_dims":
                return "permute", value.args[0], _axes(value)
            if name == "relax.reshape":
                source, target = static_shape(value.args[0]), static_shape(value)
                if source and target and source != target and source[-1] == target[-1]:
                    return "reshape", value.args[0], target
            return None

        def _follow(self, expr: Any, kind: str, source: Any, param: tuple[int, ...]) -> Any:
            """``expr``, an operand next to the changed one, in the source's layout; None
            where that would move a large tensor."""
            shape = static_shape(expr)
            if shape is None:
                return None
            if not shape:
                return expr  # a scalar broadcasts alike in any layout
            constant = constant_value(expr)
            if kind == "permute":
                rank = len(param)
                if len(shape) > rank or (constant is None and int(np.prod(shape)) > SMALL):
                    return None
                inverse = [int(a) for a in np.argsort(param)]
                padded = (1,) * (rank - len(shape)) + shape
                if constant is not None:
                    value = np.ascontiguousarray(constant.reshape(padded).transpose(inverse))
                    return relax.const(value, str(constant.dtype))
                if padded != shape:
                    expr = self.builder_.emit(relax.op.reshape(expr, padded))
                return self.builder_.emit(relax.op.permute_dims(expr, inverse))
            target = static_shape(source)
            assert target is not None
            if shape == param:  # a full tensor: a view of it in the source's shape
                return self.builder_.emit(relax.op.reshape(expr, target))
            if all(d == 1 for d in shape[:-1]) and len(shape) <= len(param):
                per_last = (1,) * (len(target) - 1) + shape[-1:]
                if constant is not None:
                    return relax.const(constant.reshape(per_last), str(constant.dtype))
                return self.builder_.emit(relax.op.reshape(expr, per_last))
            return None

        def visit_call_(self, call: Any) -> Any:
            new = super().visit_call_(call)
            return self._sink(new) if isinstance(new, relax.Call) else new

        def _sink(self, call: Any) -> Any:
            """``call`` (its args already rewritten) with a layout change of its operands
            moved below it, or composed with the one it applies to."""
            name = getattr(call.op, "name", "")
            if name in ("relax.permute_dims", "relax.reshape"):
                return self._compose(call, name)
            if name in UNARY or name in QUANTIZE:
                changed = self._change(call.args[0])
                if changed is None:
                    return call
                kind, source, param = changed
                inner = self._inner_unary(call, name, kind, source, param)
            elif name in BINARY:
                found = [self._change(a) for a in call.args]
                first = next((f for f in found if f is not None), None)
                if first is None:
                    return call
                kind, source, param = first
                args = []
                for arg, hit in zip(call.args, found, strict=True):
                    if hit is not None and hit[0] == kind and hit[2] == param:
                        if static_shape(hit[1]) != static_shape(source):
                            return call
                        args.append(hit[1])
                        continue
                    moved = self._follow(arg, kind, source, param)
                    if moved is None:
                        return call
                    if isinstance(moved, relax.Var):
                        self.followers.add(moved)
                    args.append(moved)
                inner = relax.Call(call.op, args, call.attrs, call.ty_args)
            else:
                return call
            if inner is None:
                return call
            value = self.builder_.emit(self._sink(inner))
            if kind == "permute":
                return relax.op.permute_dims(value, list(param))
            return relax.op.reshape(value, list(param))

        def _inner_unary(
            self, call: Any, name: str, kind: str, source: Any, param: tuple[int, ...]
        ) -> Any:
            rest = list(call.args[1:])
            if name not in QUANTIZE:
                return relax.Call(call.op, [source, *rest], call.attrs, call.ty_args)
            rank = len(static_shape(call.args[0]) or ())
            axis = int(call.attrs.axis) % rank
            per_channel = any(int(np.prod(static_shape(a) or (2,))) > 1 for a in rest)
            if kind == "permute":
                axis = param[axis]
            elif axis == rank - 1 or not per_channel:  # the last axis, or any for a scalar
                axis = len(static_shape(source) or ()) - 1
            else:
                return None
            build = relax.op.quantize if name == "relax.quantize" else relax.op.dequantize
            return build(source, *rest, axis=axis, out_dtype=call.attrs.out_dtype)

        def _compose(self, call: Any, name: str) -> Any:
            if name == "relax.reshape" and static_shape(call.args[0]) == static_shape(call):
                return call.args[0]
            arg = call.args[0]
            inner = self._value(arg) if isinstance(arg, relax.Var) else None
            if not isinstance(inner, relax.Call) or getattr(inner.op, "name", "") != name:
                return call
            source = inner.args[0]
            if name == "relax.permute_dims":
                first, second = _axes(inner), _axes(call)
                combined = [first[a] for a in second]
                if combined == list(range(len(combined))):
                    return source
                return relax.op.permute_dims(source, combined)
            target = static_shape(call)
            if target is None:
                return call
            if static_shape(source) == target:
                return source
            return relax.op.reshape(source, list(target))

    mutator = Sink(mod)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())
