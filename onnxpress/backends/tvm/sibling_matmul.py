"""The Relax pass ``SiblingMatmuls``: matmuls of one activation by constant matrices become
one matmul by their side-by-side concatenation, sliced back per original.

A transformer's attention projections are three products of the same hidden states, each
by a constant [K, N] matrix (query, key, value); a bidirectional GRU's or LSTM's two input
projections (rnn.py: one per direction), and any model that feeds one tensor to several
linear layers, have the same shape.
Run apart, each product reads the activation again, its register tiles are split across
the threads in a few panels (a 384-column product has 16 panels of 24 columns for two
cores), and each pays a kernel launch. Merged, the product runs over the panels of all of
them, and each slice folds into whatever copy follows it (the encoder's reshape-transpose
into heads), so no kernel is added.

Each output element is the same dot product in the same order as before: results are
bit-identical. Only float32 products with static shapes and 2-D constant right operands of
the same depth are merged; the merged matrix is built once, at compile time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxpress.backends.tvm.matmul_legalize import static_shape

# a group whose merged weight matrix would exceed this stays apart (memory at compile time)
MAX_MERGED_BYTES = 64 << 20


@dataclass
class _Group:
    """Matmuls of one activation: their calls in program order, the columns of each, and
    when every one's sole user adds a constant bias over the columns, those add calls."""

    calls: list[Any] = field(default_factory=list)
    columns: list[int] = field(default_factory=list)
    weight: np.ndarray | None = None  # the merged [K, sum(columns)] matrix
    adds: list[Any] = field(default_factory=list)
    bias: np.ndarray | None = None  # the merged biases, when every member has one


def _constant_weight(call: Any) -> np.ndarray | None:
    """The [K, N] float32 constant right operand of a ``relax.matmul`` call, or None."""
    import tvm
    from tvm import relax

    if getattr(call.op, "name", "") != "relax.matmul" or len(call.args) != 2:
        return None
    x, w = call.args
    if not isinstance(w, tvm.ir.Constant) or not isinstance(x, relax.Var):
        return None
    if getattr(call.attrs, "out_dtype", None) not in (None, "", "float32"):
        return None
    data = static_shape(x)
    if data is None or len(data) < 2 or str(getattr(x.ty, "dtype", "")) != "float32":
        return None
    weight = w.value.numpy()
    if weight.dtype != np.float32 or weight.ndim != 2 or weight.shape[0] != data[-1]:
        return None
    return weight


def _column_bias(call: Any, product: Any, columns: int) -> np.ndarray | None:
    """The bias of ``call`` when it is ``product + b`` (either order) with a constant
    float32 ``b`` over the last axis only ([N], [1, N], ...), else None."""
    import tvm

    if getattr(call.op, "name", "") != "relax.add" or len(call.args) != 2:
        return None
    for this, other in (call.args, reversed(call.args)):
        if this.same_as(product) and isinstance(other, tvm.ir.Constant):
            bias = other.value.numpy()
            if bias.dtype == np.float32 and bias.shape[-1:] == (columns,) and bias.size == columns:
                return bias.reshape(columns)
    return None


def sibling_groups(func: Any) -> dict[Any, _Group]:
    """The mergeable groups of ``func``'s dataflow blocks, keyed by each member call (and
    each bias add): two or more float32 matmuls of one activation var by constant
    matrices of equal depth."""
    from tvm import relax

    by_input: dict[tuple[int, Any], tuple[_Group, list[np.ndarray]]] = {}
    bindings = [  # (block index, binding): a group stays within one block
        (index, b)
        for index, block in enumerate(getattr(func.body, "blocks", []))
        for b in block.bindings
    ]
    uses: dict[Any, int] = {}
    for var in relax.analysis.free_vars(func.body.body):
        uses[var] = uses.get(var, 0) + 1
    products: dict[Any, tuple[Any, int, int]] = {}  # product var -> (call, columns, block)
    for block, binding in bindings:
        value = getattr(binding, "value", None)
        for var in relax.analysis.free_vars(value) if value is not None else []:
            uses[var] = uses.get(var, 0) + 1
        if not isinstance(value, relax.Call):
            continue
        weight = _constant_weight(value)
        if weight is None:
            continue
        group, weights = by_input.setdefault((block, value.args[0]), (_Group(), []))
        group.calls.append(value)
        group.columns.append(weight.shape[1])
        weights.append(weight)
        products[binding.var] = (value, weight.shape[1], block)
    adds: dict[Any, tuple[Any, np.ndarray]] = {}  # matmul call -> (its bias add, bias)
    for block, binding in bindings:
        value = getattr(binding, "value", None)
        if not isinstance(value, relax.Call):
            continue
        for var in value.args:
            if not isinstance(var, relax.Var) or var not in products or uses.get(var) != 1:
                continue
            matmul, columns, where = products[var]
            if where == block:
                bias = _column_bias(value, var, columns)
                if bias is not None:
                    adds[matmul] = (value, bias)
    groups: dict[Any, _Group] = {}
    for group, weights in by_input.values():
        if len(group.calls) < 2 or sum(w.nbytes for w in weights) > MAX_MERGED_BYTES:
            continue
        group.weight = np.concatenate(weights, axis=1)
        if all(call in adds for call in group.calls):
            group.adds = [adds[call][0] for call in group.calls]
            group.bias = np.concatenate([adds[call][1] for call in group.calls])
        for call in [*group.calls, *group.adds]:
            groups[call] = group
    return groups


def sibling_matmul_pass() -> Any:
    """The relax module pass ``SiblingMatmuls`` (see the module docstring)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod: Any, groups: dict[Any, _Group]) -> None:
            super().__init__(mod)
            self.groups = groups
            self.products: dict[int, Any] = {}

        def visit_call_(self, call: Any) -> Any:
            group = self.groups.get(call)
            if group is None:
                return super().visit_call_(call)
            key = id(group)
            if key not in self.products:  # emitted at the first member: its input is bound
                x = self.visit_expr(group.calls[0].args[0])
                assert group.weight is not None
                product = relax.op.matmul(x, relax.const(group.weight))
                if group.bias is not None:
                    product = relax.op.add(
                        self.builder_.emit(product, "sibling_matmul"), relax.const(group.bias)
                    )
                self.products[key] = self.builder_.emit(product, "sibling_product")
            members = group.adds if any(a.same_as(call) for a in group.adds) else group.calls
            index = next(i for i, c in enumerate(members) if c.same_as(call))
            start = sum(group.columns[:index])
            axis = len(static_shape(group.calls[0].args[0]) or []) - 1
            return relax.op.strided_slice(
                self.products[key], axes=[axis], begin=[start], end=[start + group.columns[index]]
            )

    @tvm.transform.module_pass(opt_level=0, name="SiblingMatmuls")
    def _pass(mod: Any, _ctx: Any) -> Any:
        for gvar, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            groups = sibling_groups(func)
            if groups:
                mutator = _Rewriter(mod, groups)
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
                mod = relax.transform.DeadCodeElimination()(mutator.builder_.get())
        return mod

    return _pass
