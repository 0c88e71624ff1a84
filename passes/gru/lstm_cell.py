"""Structural matcher of one LSTM cell written in primitive ops (helper of fuse-lstm).

Starting from a Tanh node whose input is the new cell state c' it finds:
  * the output h' = o * tanh(c'), o a Sigmoid output or a slice of one;
  * the state update c' = f*c + i*g, products and sums in any operand order, where i and f
    are gates and g is a Tanh output (or a slice of one): the candidate;
  * the leaves: the previous states h and c, and the step input x (the data operand of
    every MatMul/Gemm with a constant weight that is not built from h or a gate); a first
    step from zero states whose recurrent projection an exporter folded away projects x
    only, and its h is taken to be its (zero) c;
  * every node in between; peepholes (a gate reading c, or o reading c') are ordinary
    elementwise nodes here, and probing finds their weights.
Which of the torch (i, f, g, o), Keras (i, f, c, o) or ONNX (i, o, f, c) gate orders the
projection uses does not matter: each gate is traced to its own slice. Weights are read
by probing (``lstm_probe.py``), as for fuse-gru.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs
from onnxpress.passes.gru.cell import read_outside, walk_cell
from onnxpress.passes.gru.emit import is_zero
from onnxpress.passes.gru.graph import SLICING, GraphIndex, TensorTypes, producer
from onnxpress.passes.gru.mask import MASK_OPS, Mask


@dataclass
class LstmCellMatch:
    tanh: gs.Node  # tanh(c')
    x: gs.Tensor  # step input [batch, input_size]
    h: gs.Tensor  # previous output state [batch, hidden]
    c: gs.Tensor  # previous cell state
    h_new: gs.Tensor
    c_new: gs.Tensor
    gates: dict[str, gs.Tensor]  # i, f, g, o as the cell uses them (after any slicing)
    activations: dict[str, gs.Node]  # the Sigmoid of i, f, o and the Tanh of g
    nodes: dict[int, gs.Node] = field(default_factory=dict)  # id(node) -> node
    mask: Mask | None = None  # set when the states are masked by a length (mask.py)

    @property
    def name(self) -> str:
        return str(self.tanh.name or self.tanh.outputs[0].name)


def _activation(tensor: gs.Tensor, op: str) -> tuple[gs.Node, list[gs.Node]] | None:
    """(activation node, slicing nodes after it) when ``tensor`` is an ``op`` output or a
    slice of one."""
    chain: list[gs.Node] = []
    node = producer(tensor)
    while node is not None and node.op in SLICING and len(chain) < 4:
        chain.append(node)
        node = producer(node.inputs[0])
    return (node, chain) if node is not None and node.op == op else None


def is_cell_output(tanh: gs.Node) -> bool:
    """Cheap pre-filter: the Tanh reads an Add of two products (f*c + i*g) and a Mul reads
    it with a Sigmoid gate."""
    if _products(tanh.inputs[0]) is None:
        return False
    return any(_output_gate(tanh, node) is not None for node in tanh.outputs[0].outputs)


def _output_gate(tanh: gs.Node, node: gs.Node) -> gs.Tensor | None:
    if node.op != "Mul":
        return None
    others = [t for t in node.inputs if t is not tanh.outputs[0]]
    if len(others) == 1 and _activation(others[0], "Sigmoid") is not None:
        return others[0]
    return None


def _products(c_new: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    add = producer(c_new)
    if add is None or add.op != "Add":
        return None
    muls = [producer(t) for t in add.inputs]
    if len(muls) != 2 or any(m is None or m.op != "Mul" for m in muls):
        return None
    first, second = muls
    assert first is not None and second is not None
    return first, second


def _state_update(c_new: gs.Tensor) -> tuple[dict[str, gs.Tensor], gs.Tensor, list[gs.Node]] | None:
    """({i, f, g}, c, the Add and Muls) when c' = f*c + i*g, else None."""
    products = _products(c_new)
    if products is None:
        return None
    found: dict[str, gs.Tensor] = {}
    state = None
    for mul in products:
        a, b = mul.inputs
        for gate, other in ((a, b), (b, a)):
            if _activation(gate, "Sigmoid") is None:
                continue
            if _activation(other, "Tanh") is not None and "g" not in found:
                found |= {"i": gate, "g": other}
                break
            if _activation(other, "Sigmoid") is None and state is None:
                found["f"], state = gate, other
                break
    if state is None or set(found) != {"i", "f", "g"}:
        return None
    add = producer(c_new)
    assert add is not None
    return found, state, [add, *products]


def match_lstm_cell(index: GraphIndex, tanh: gs.Node, types: TensorTypes) -> LstmCellMatch | str:
    """The LSTM cell around ``tanh`` (= tanh(c')), or the reason there is none."""
    dims = types.get(tanh.outputs[0].name, (0, []))[1]
    if len(dims) != 2 or not isinstance(dims[-1], int):
        return "tanh(c) is not [batch, hidden] with a static hidden size"
    outputs = [(n, _output_gate(tanh, n)) for n in tanh.outputs[0].outputs]
    outputs = [(n, o) for n, o in outputs if o is not None]
    if len(outputs) != 1:
        return "no single h = o * tanh(c) with a Sigmoid gate o reads the tanh"
    out_mul, o = outputs[0]
    c_new = tanh.inputs[0]
    update = _state_update(c_new)
    if update is None:
        return "the cell state is not c' = f*c + i*g with Sigmoid gates i, f and a Tanh g"
    gates, c, update_nodes = update
    gates["o"] = o
    if len({id(t) for t in gates.values()}) != 4:
        return "the gates are not four different tensors (coupled input and forget gates)"
    nodes: dict[int, gs.Node] = {id(n): n for n in [tanh, out_mul, *update_nodes]}
    activations: dict[str, gs.Node] = {}
    for name, tensor in gates.items():
        found = _activation(tensor, "Tanh" if name == "g" else "Sigmoid")
        assert found is not None
        activations[name] = found[0]
        nodes.update((id(n), n) for n in [found[0], *found[1]])
    hidden = dims[-1]
    operands = _projected(index, activations, c, c_new)
    if len(operands) == 1 and is_zero(index, c):
        h: gs.Tensor | str = c  # a first step from zeros whose h @ R an exporter folded
    else:
        h = _recurrent_state(index, operands, hidden, types)
    if isinstance(h, str):
        return h
    x_leaves: dict[int, gs.Tensor] = {}
    roots = [a.inputs[0] for a in activations.values()]
    reason = walk_cell(index, roots, h, False, nodes, x_leaves, {}, stops=(c, c_new))
    if reason is not None:
        return reason
    if len(x_leaves) != 1:
        names = ", ".join(sorted(t.name for t in x_leaves.values())) or "none"
        return f"the projections read {len(x_leaves)} inputs ({names}), not one x"
    reason = read_outside(index, nodes, (tanh.outputs[0], c_new, out_mul.outputs[0]))
    if reason is not None:
        return reason
    out_readers = [r for r in tanh.outputs[0].outputs if r is not out_mul]
    if out_readers:
        return f"tanh(c) is also read by '{out_readers[0].name}'"
    h_new = out_mul.outputs[0]
    return LstmCellMatch(tanh, x_leaves.popitem()[1], h, c, h_new, c_new, gates, activations, nodes)


def _projected(
    index: GraphIndex, activations: dict[str, gs.Node], c: gs.Tensor, c_new: gs.Tensor
) -> list[gs.Tensor]:
    """The tensors the gates project (MatMul/Gemm data operands, or the inputs of a Concat
    that is one), found walking back from the gate pre-activations."""
    operands: dict[int, gs.Tensor] = {}
    stack = [a.inputs[0] for a in activations.values()]
    seen: set[int] = set()
    while stack:
        t = stack.pop()
        node = producer(t)
        if t is c or t is c_new or node is None or id(node) in seen or index.is_const(t):
            continue
        seen.add(id(node))
        if node.op in ("MatMul", "Gemm"):
            data = node.inputs[0]
            source = producer(data)
            parts = source.inputs if source is not None and source.op == "Concat" else [data]
            operands.update((id(p), p) for p in parts if not index.is_const(p))
        elif node.op in ("Add", "Sub", "Mul", "Neg") or node.op in SLICING:
            stack.extend(node.inputs)
    return list(operands.values())


def _recurrent_state(
    index: GraphIndex, operands: list[gs.Tensor], hidden: int, types: TensorTypes
) -> gs.Tensor | str:
    """Which projected tensor is h: an earlier cell's o * tanh(c), a zero state, or the only
    one of width ``hidden``; the other is x."""
    for t in operands:
        node = producer(t)
        if node is not None and node.op in ("MatMul", "Gemm") and _is_cell_output(node.inputs[0]):
            return (
                f"the state '{t.name}' is a projection of h (LSTMP): the ONNX LSTM op has "
                "no projection"
            )
    if len(operands) != 2:
        names = ", ".join(sorted(t.name for t in operands)) or "none"
        return f"the gates project {len(operands)} tensors ({names}), not x and h"
    for test in (_is_cell_output, lambda t: is_zero(index, t)):
        found = [t for t in operands if test(t)]
        if len(found) == 1:
            return found[0]
    wide = [t for t in operands if types.get(t.name, (0, []))[1][-1:] == [hidden]]
    if len(wide) == 1:
        return wide[0]
    return "cannot tell the step input from the state h (both are inputs of width hidden)"


def _is_cell_output(t: gs.Tensor, depth: int = 0) -> bool:
    """Whether ``t`` is o * tanh(c), or that state kept by a length mask (Where, m*h + ...)."""
    node = producer(t)
    if node is not None and node.op in MASK_OPS and node.op != "Mul" and depth < 3:
        return any(_is_cell_output(i, depth + 1) for i in node.inputs)
    if node is not None and node.op == "Mul" and depth < 3:
        if any(_is_cell_output(i, depth + 1) for i in node.inputs if producer(i) is not node):
            return True
    return (
        node is not None
        and node.op == "Mul"
        and any(_activation(i, "Tanh") is not None for i in node.inputs)
        and any(_activation(i, "Sigmoid") is not None for i in node.inputs)
    )
