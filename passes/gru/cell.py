"""Structural matcher of one GRU cell written in primitive ops (helper of the fuse-gru pass).

Starting from a Tanh node (the candidate n) it finds, whatever order an exporter wrote:
  * the update h' = (1-z)*n + z*h, in any algebraic form (z*h + (1-z)*n, h + (1-z)*(n-h),
    (h-n)*z + n, ...) or mirrored (z*n + (1-z)*h), by evaluating the elementwise expression
    that follows n on random values; z is a Sigmoid output or a slice of one;
  * the reset gate r: the one gate inside n's pre-activation;
  * the leaves: the previous state h (the free operand of the update) and the step input x
    (the data operand of every MatMul/Gemm with a constant weight that is not built from h
    or a gate, also through a Concat([x, h]));
  * every node in between, none of which may be read from outside the cell, except by a
    Shape or Size (the node is then kept for it).
Weights are not read here: probe recovers them numerically from the matched nodes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.gru.graph import (
    ELEMENTWISE,
    PROJECTIONS,
    SLICING,
    GraphIndex,
    RecurrentCell,
    TensorTypes,
    describe_node,
    producer,
)
from onnxpress.passes.gru.mask import Mask

CELL_OPS = ELEMENTWISE | SLICING | PROJECTIONS | {"Concat", "Transpose"}
MAX_UPDATE_DEPTH = 4  # elementwise nodes between n and h'
MAX_CELL_NODES = 80
SHAPE_READERS = frozenset({"Shape", "Size"})


@dataclass
class CellMatch:
    tanh: gs.Node
    x: gs.Tensor  # step input [batch, input_size]
    h: gs.Tensor  # previous state [batch, hidden]
    h_new: gs.Tensor
    z: gs.Tensor  # update gate (a Sigmoid output or a slice of one)
    r: gs.Tensor  # reset gate
    z_keeps_state: bool  # True: h' = (1-z)*n + z*h;  False: h' = z*n + (1-z)*h
    gate_sigmoids: list[gs.Node]
    nodes: dict[int, gs.Node] = field(default_factory=dict)  # id(node) -> node
    mask: Mask | None = None  # set when the states are masked by a length (mask.py)

    @property
    def name(self) -> str:
        return str(self.tanh.name or self.tanh.outputs[0].name)


def near_gate(index: GraphIndex, tanh: gs.Node) -> bool:
    """Cheap pre-filter: an elementwise node close after the Tanh reads a Sigmoid gate."""
    level, seen = [tanh.outputs[0]], set()
    for _ in range(MAX_UPDATE_DEPTH):
        following = []
        for t in level:
            for node in t.outputs:
                if node.op not in ELEMENTWISE or id(node) in seen:
                    continue
                seen.add(id(node))
                for t_in in node.inputs:
                    p = producer(t_in)
                    if index.gate_chain(t_in) is not None or (
                        p is not None and p.op in ELEMENTWISE and index.gate_arithmetic(p)
                    ):
                        return True
                following.extend(node.outputs)
        level = following
    return False


@dataclass
class _Update:
    h_new: gs.Tensor
    z: gs.Tensor
    h: gs.Tensor
    z_keeps_state: bool
    nodes: list[gs.Node]


def _expression(
    index: GraphIndex,
    t: gs.Tensor,
    n: gs.Tensor,
    hidden: int,
    depth: int,
    leaves: dict[int, gs.Tensor],
    gates: set[int],
    nodes: list[gs.Node],
) -> tuple:
    """Expression tree of ``t`` over n, small constants and leaves (gates and other tensors)."""
    tanh = producer(n)
    assert tanh is not None
    n_pre = tanh.inputs[0]
    if t is n:
        leaves[id(n)] = n
        return ("n",)
    value = index.literal(t)
    if value is not None and value.size <= hidden:
        return ("c", value.astype(np.float64))
    node = producer(t)
    is_gate = index.gate_chain(t) is not None
    # The state h feeds the candidate (through the recurrent projection): it is a leaf, and
    # the walk does not run on into the previous cell's update.
    if (
        is_gate
        or node is None
        or node.op not in ELEMENTWISE
        or depth >= MAX_UPDATE_DEPTH
        or (not index.depends_on(t, n) and index.depends_on(n_pre, t))
    ):
        leaves[id(t)] = t
        if is_gate:
            gates.add(id(t))
        return ("leaf", id(t))
    nodes.append(node)
    args = [_expression(index, i, n, hidden, depth + 1, leaves, gates, nodes) for i in node.inputs]
    return (node.op, *args)


def _evaluate(expr: tuple, env: dict[object, np.ndarray]) -> np.ndarray:
    tag = expr[0]
    if tag == "c":
        return np.asarray(expr[1])
    if tag in ("n", "leaf"):
        return env[expr[1] if tag == "leaf" else "n"]
    args = [_evaluate(a, env) for a in expr[1:]]
    if tag == "Neg":
        return -args[0]
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[tag](args[0], args[1])


def _as_update(index: GraphIndex, y: gs.Tensor, n: gs.Tensor, hidden: int) -> _Update | None:
    """``y`` as (1-z)*n + z*h or z*n + (1-z)*h, checked on random values, else None."""
    leaves: dict[int, gs.Tensor] = {}
    gates: set[int] = set()
    nodes: list[gs.Node] = []
    expr = _expression(index, y, n, hidden, 0, leaves, gates, nodes)
    if leaves.pop(id(n), None) is None:
        return None
    states = [k for k in leaves if k not in gates]
    if len(gates) != 1 or len(states) != 1:
        return None
    rng = np.random.default_rng(0)
    z = rng.uniform(0.05, 0.95, (4, hidden))
    env: dict[object, np.ndarray] = {
        "n": rng.uniform(-1, 1, (4, hidden)),
        next(iter(gates)): z,
        states[0]: rng.uniform(-1, 1, (4, hidden)),
    }
    try:
        value = np.broadcast_to(_evaluate(expr, env), z.shape)
    except ValueError:
        return None
    nn, hh = env["n"], env[states[0]]
    for keeps, expected in ((True, (1 - z) * nn + z * hh), (False, z * nn + (1 - z) * hh)):
        if np.allclose(value, expected, rtol=0, atol=1e-9):
            return _Update(y, leaves[next(iter(gates))], leaves[states[0]], keeps, nodes)
    return None


def _find_update(index: GraphIndex, tanh: gs.Node, hidden: int) -> _Update | None:
    """Breadth-first over elementwise nodes after n: the nearest tensor that is the update."""
    n = tanh.outputs[0]
    level, seen = [n], set()
    for _ in range(MAX_UPDATE_DEPTH):
        following = []
        for t in level:
            for node in t.outputs:
                if node.op not in ELEMENTWISE or id(node) in seen:
                    continue
                seen.add(id(node))
                update = _as_update(index, node.outputs[0], n, hidden)
                if update is not None and not index.depends_on(update.h, n):
                    return update
                following.extend(node.outputs)
        level = following
    return None


def _reads_state(index: GraphIndex, operand: gs.Tensor, h: gs.Tensor) -> bool:
    """Whether a projection's operand is built from h or a gate (r*h, Concat([x, h])) within
    a few Concat/Mul/slicing nodes; anything else is the cell's input x, even when an earlier
    layer computed it from the same initial state."""
    level = [operand]
    for _ in range(4):
        following: list[gs.Tensor] = []
        for t in level:
            if t is h or index.gate_chain(t) is not None:
                return True
            node = producer(t)
            if node is not None and (node.op in {"Concat", "Mul"} or node.op in SLICING):
                following.extend(i for i in node.inputs if not index.is_const(i))
        level = following
    return False


def walk_cell(
    index: GraphIndex,
    roots: list[gs.Tensor],
    h: gs.Tensor,
    allow_gates: bool,
    nodes: dict[int, gs.Node],
    x_leaves: dict[int, gs.Tensor],
    gates: dict[int, gs.Tensor],
    stops: tuple[gs.Tensor, ...] = (),
) -> str | None:
    """Collect the nodes computing ``roots`` from h, x, constants and ``stops`` (an LSTM's
    cell state); a reason on failure."""
    stack = [(t, False) for t in roots]
    while stack:
        t, feeds_projection = stack.pop()
        if t is h or any(t is s for s in stops) or index.is_const(t):
            continue
        if index.gate_chain(t) is not None:
            if not allow_gates:
                return f"a gate's pre-activation reads another gate '{t.name}'"
            gates[id(t)] = t
            continue
        if feeds_projection and not _reads_state(index, t, h):
            x_leaves[id(t)] = t
            continue
        node = producer(t)
        if node is None:
            return f"graph input '{t.name}' reaches the cell without an input projection"
        if id(node) in nodes:
            continue
        if node.op not in CELL_OPS:
            return f"op {node.op} ('{node.name}') inside the cell is not part of a GRU"
        if len(nodes) >= MAX_CELL_NODES:
            return f"the cell has more than {MAX_CELL_NODES} nodes"
        nodes[id(node)] = node
        if node.op in PROJECTIONS:
            if (
                index.is_const(node.inputs[0])
                or not index.is_const(node.inputs[1])
                or node.attrs.get("transA", 0)
            ):
                return f"projection '{node.name}' is not data @ constant weight"
            stack.append((node.inputs[0], True))
            stack.extend((i, False) for i in node.inputs[2:])
        else:
            through = feeds_projection and node.op == "Concat"
            stack.extend((i, through) for i in node.inputs)
    return None


def read_outside(
    index: GraphIndex, nodes: dict[int, gs.Node], results: tuple[gs.Tensor, ...]
) -> str | None:
    """Why a tensor inside the cell, other than its ``results``, is needed outside it."""
    for node in nodes.values():
        for out in node.outputs:
            if any(out is r for r in results):
                continue
            if id(out) in index.outputs:
                return f"'{out.name}' inside the cell is a graph output"
            # A Shape/Size reader needs only the dims: the node stays for it (remove_dead).
            outside = [c for c in out.outputs if id(c) not in nodes and c.op not in SHAPE_READERS]
            if outside:
                return f"'{out.name}' inside the cell is also read by '{outside[0].name}'"
    return None


def match_cell(index: GraphIndex, tanh: gs.Node, types: TensorTypes) -> CellMatch | str:
    """The GRU cell around ``tanh``, or the reason there is none."""
    dims = types.get(tanh.outputs[0].name, (0, []))[1]
    hidden = dims[-1] if len(dims) == 2 else None
    if not isinstance(hidden, int):
        return "the tanh output is not [batch, hidden] with a static hidden size"
    update = _find_update(index, tanh, hidden)
    if update is None:
        return "no update (1-z)*n + z*h with a Sigmoid gate z follows the tanh"
    nodes: dict[int, gs.Node] = {id(tanh): tanh}
    nodes.update((id(node), node) for node in update.nodes)
    x_leaves: dict[int, gs.Tensor] = {}
    resets: dict[int, gs.Tensor] = {}
    reason = walk_cell(index, [tanh.inputs[0]], update.h, True, nodes, x_leaves, resets)
    if reason is not None:
        return reason
    if len(resets) != 1:
        return f"the tanh's pre-activation reads {len(resets)} gates, not one reset gate"
    r = next(iter(resets.values()))
    if r is update.z:
        return "the reset gate is the update gate (a minimal gated unit, not a GRU)"
    sigmoids: dict[int, gs.Node] = {}
    for gate in (update.z, r):
        sigmoid, chain = index.gate_chain(gate) or (None, [])
        assert sigmoid is not None
        sigmoids[id(sigmoid)] = sigmoid
        nodes.update((id(node), node) for node in [sigmoid, *chain])
    roots = [s.inputs[0] for s in sigmoids.values()]
    reason = walk_cell(index, roots, update.h, False, nodes, x_leaves, {})
    if reason is not None:
        return reason
    if not x_leaves:
        return "no input projection: only the state feeds the cell"
    if len(x_leaves) > 1:
        names = ", ".join(sorted(t.name for t in x_leaves.values()))
        return f"the projections read different inputs ({names})"
    x = next(iter(x_leaves.values()))
    reason = read_outside(index, nodes, (update.h_new,))
    if reason is not None:
        return reason
    return CellMatch(
        tanh,
        x,
        update.h,
        update.h_new,
        update.z,
        r,
        update.z_keeps_state,
        list(sigmoids.values()),
        nodes,
    )


def cell_signature(
    index: GraphIndex, cell: RecurrentCell, leaves: dict[int, str] | None = None
) -> str:
    """Canonical text of the cell (ops, attributes, constant values): equal for shared weights.

    ``leaves`` names the cell's inputs by tensor id (default: h and x)."""
    order: dict[int, int] = {}
    named = leaves if leaves is not None else {id(cell.x): "x", id(cell.h): "h"}

    def ref(t: gs.Tensor) -> str:
        if id(t) in named:
            return named[id(t)]
        node = producer(t)
        if node is not None and id(node) in order:
            return f"#{order[id(node)]}.{node.outputs.index(t)}"
        return index.digest(t) if index.is_const(t) else "?"

    parts: list[bytes] = []
    start = producer(cell.h_new)
    assert start is not None
    stack: list[tuple[gs.Node, bool]] = [(start, False)]
    expanded: set[int] = set()
    while stack:
        node, done = stack.pop()
        if done:
            order[id(node)] = len(order)
            parts.append(describe_node(node, ref))
            continue
        if id(node) in expanded:
            continue
        expanded.add(id(node))
        stack.append((node, True))
        for t in reversed(node.inputs):
            p = producer(t)
            if p is not None and id(p) in cell.nodes and id(t) not in named:
                stack.append((p, False))
    return hashlib.sha1(b"\n".join(parts)).hexdigest()
