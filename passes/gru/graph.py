"""Graph facts for the fuse-gru matcher, computed once per pass run on a sorted graph.

``GraphIndex`` answers what the matcher keeps asking: is a tensor constant (an initializer,
a Constant node, or computed from constants only), its literal value, does one tensor
depend on another (searched backwards only as far as the other's producer), is a tensor a
gate (a Sigmoid output, or a Split/Slice of one), and a value hash of a constant so that
two cells can be compared for shared weights. ``tensor_types`` gives element types and
dims from ONNX shape inference, which the graph itself does not carry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.core.ir import constant_value

ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Neg"})
SLICING = frozenset({"Split", "Slice", "Gather", "Squeeze", "Unsqueeze", "Reshape", "Identity"})
PROJECTIONS = frozenset({"MatMul", "Gemm"})
RANDOM_OPS = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)

Dims = list[int | str | None]
TensorTypes = dict[str, tuple[int, Dims]]  # tensor name -> (onnx elem type, dims)


def tensor_types(model: onnx.ModelProto) -> TensorTypes:
    """Element type and dims (int, symbolic name or None) of every tensor shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    found: TensorTypes = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        dims: Dims = (
            [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            if t.HasField("shape")
            else []
        )
        found[vi.name] = (t.elem_type, dims)
    for init in g.initializer:
        found[init.name] = (init.data_type, list(init.dims))
    return found


class RecurrentCell(Protocol):
    """What chain building and output rewiring need of a matched GRU or LSTM cell."""

    x: gs.Tensor  # step input [batch, input_size]
    h: gs.Tensor  # previous state [batch, hidden]
    h_new: gs.Tensor
    nodes: dict[int, gs.Node]  # id(node) -> node, every node of the cell

    @property
    def name(self) -> str: ...


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


class GraphIndex:
    """Topological positions, constant-ness and graph outputs of a sorted graph, built once."""

    def __init__(self, graph: gs.Graph) -> None:
        self.position = {id(n): i for i, n in enumerate(graph.nodes)}
        self.outputs = {id(t) for t in graph.outputs}
        self._const: set[int] = set()
        self._digests: dict[int, str] = {}
        for node in graph.nodes:
            if node.op not in RANDOM_OPS and all(self.is_const(i) for i in node.inputs):
                self._const.update(id(o) for o in node.outputs)

    def is_const(self, tensor: gs.Tensor) -> bool:
        return isinstance(tensor, gs.Constant) or not tensor.name or id(tensor) in self._const

    def literal(self, tensor: gs.Tensor) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        value = constant_value(tensor)
        if value is not None:
            return value
        node = producer(tensor)
        if node is not None and node.op == "Constant":
            for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
                if key in node.attrs:
                    attr = node.attrs[key]
                    return np.asarray(attr.values if isinstance(attr, gs.Constant) else attr)
        return None

    def depends_on(self, tensor: gs.Tensor, source: gs.Tensor) -> bool:
        """Whether ``source`` is an ancestor of (or is) ``tensor``; searches only after it."""
        src = producer(source)
        floor = self.position[id(src)] if src is not None else -1
        stack, seen = [tensor], set()
        while stack:
            t = stack.pop()
            if t is source:
                return True
            node = producer(t)
            if node is None or self.position[id(node)] <= floor or id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend(i for i in node.inputs if not self.is_const(i))
        return False

    def gate_chain(self, tensor: gs.Tensor) -> tuple[gs.Node, list[gs.Node]] | None:
        """(Sigmoid, slicing nodes after it) when ``tensor`` is a Sigmoid output or a slice of one."""
        chain: list[gs.Node] = []
        node = producer(tensor)
        while node is not None and node.op in SLICING and len(chain) < 4:
            chain.append(node)
            node = producer(node.inputs[0])
        return (node, chain) if node is not None and node.op == "Sigmoid" else None

    def gate_arithmetic(self, node: gs.Node) -> bool:
        """Whether ``node`` computes from gates and constants only, e.g. 1 - z."""
        variables = [i for i in node.inputs if not self.is_const(i)]
        return bool(variables) and all(self.gate_chain(i) is not None for i in variables)

    def digest(self, tensor: gs.Tensor) -> str:
        """Value hash of a constant (structural for computed constants); cached by tensor."""
        key = id(tensor)
        if key not in self._digests:
            value = self.literal(tensor)
            h = hashlib.sha1()
            if value is not None:
                h.update(f"{value.dtype}{value.shape}".encode())
                h.update(np.ascontiguousarray(value).tobytes())
            else:
                node = producer(tensor)
                h.update(describe_node(node, self.digest) if node is not None else b"?")
            self._digests[key] = h.hexdigest()[:16]
        return self._digests[key]


def describe_node(node: gs.Node, ref: Callable[[gs.Tensor], str]) -> bytes:
    attrs = []
    for key in sorted(node.attrs):
        value = node.attrs[key]
        if isinstance(value, gs.Constant):
            value = hashlib.sha1(np.ascontiguousarray(value.values).tobytes()).hexdigest()[:16]
        attrs.append(f"{key}={value!r}")
    inputs = [ref(i) for i in node.inputs]
    return f"{node.op}({','.join(inputs)}){{{';'.join(attrs)}}}".encode()
