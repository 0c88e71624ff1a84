"""Annotation for the ``qdq`` pass: which tensors get a QuantizeLinear/DequantizeLinear pair,
which constants become int8 (or int32 biases), and which tensors must share parameters.

Rules, chosen so that onnxruntime fuses the result into its integer kernels:

* Conv, ConvTranspose, MatMul, Gemm: activation inputs are quantized, constant weights become
  int8 (per output channel: axis 0 for Conv and Gemm with transB=1, axis 1 for ConvTranspose
  and Gemm with transB=0, the last axis for a 2-D MatMul B, per tensor for a batched one)
  and biases int32 (scale = s_x * s_w).
  Conv outputs are quantized, graph outputs included (DQ -> Conv -> Q is QLinearConv), except
  under ``float_heads`` when no quantized node lies anywhere downstream (a head);
  MatMul and Gemm outputs only when a quantized consumer reads them (DQ -> MatMul -> float is
  MatMulIntegerToFloat, DQ -> Gemm -> float is QGemm). A MatMul's bias Add(b) gets an int32 b
  so that onnxruntime's MatMul+Add -> Gemm rewrite still ends in QGemm.
* An output read only by Relu or Clip is quantized *after* that activation (onnxruntime then
  drops the activation into the Q: Conv+Relu becomes one QLinearConv).
* Pooling, Resize, Gather, Concat, DepthToSpace and SpaceToDepth: input and output quantized;
  MaxPool, Resize, Gather, Concat, DepthToSpace, SpaceToDepth and shape-only ops (Reshape, Transpose, Flatten, Squeeze, Unsqueeze) share one set
  of parameters across input and output so that onnxruntime runs them on int8 directly.
  Gather from a constant table: the table becomes int8 and the output reuses its parameters.
* Add and Mul of two activations whose output is quantized anyway: both inputs are quantized
  too (QLinearAdd / QLinearMul). Add or Mul with a constant is left alone.
* GRU, LSTM, RNN: weight-only; W and R become int8 per gate row (axis 1) through
  DequantizeLinear, since onnxruntime has no quantized recurrent kernel.
* Softmax, LayerNormalization and other ops stay float unless named in ``extra_ops``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
WEIGHT_ONLY_OPS = ("GRU", "LSTM", "RNN")
DEFAULT_OPS = (
    *COMPUTE_OPS,
    *POOL_OPS,
    "Concat",
    "Resize",
    "Gather",
    "DepthToSpace",
    "SpaceToDepth",
    "Add",
    "Mul",
    *WEIGHT_ONLY_OPS,
)
FUSED_ACTIVATIONS = ("Relu", "Clip")
SHARED_PARAM_OPS = (
    "DepthToSpace",
    "SpaceToDepth",
    "MaxPool",
    "GlobalMaxPool",
    "Resize",
    "Gather",
    "Concat",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
)
FLOAT_BY_DEFAULT = (
    "Softmax",
    "LayerNormalization",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Gelu",
    "ReduceMean",
    "Div",
    "Pow",
    "Sqrt",
    "InstanceNormalization",
)


@dataclass(frozen=True)
class WeightSpec:
    """A constant input quantized to int8: per channel of ``axis``, or per tensor (None)."""

    tensor: str
    axis: int | None
    weight_only: bool = False


@dataclass(frozen=True)
class BiasSpec:
    """A bias quantized to int32 with scale = scale(activation) * scale(weight)."""

    tensor: str
    activation: str
    weight: WeightSpec


@dataclass
class Annotation:
    quantized_nodes: dict[str, str] = field(default_factory=dict)  # node name -> op type
    activations: list[str] = field(default_factory=list)  # tensors that get a Q/DQ pair
    groups: dict[str, str] = field(default_factory=dict)  # tensor -> its group's representative
    weights: dict[tuple[str, int], WeightSpec] = field(default_factory=dict)  # (node, input)
    biases: dict[tuple[str, int], BiasSpec] = field(default_factory=dict)
    tied: dict[str, WeightSpec] = field(default_factory=dict)  # activation -> its weight's params
    refusals: list[tuple[str, str]] = field(default_factory=list)

    def group_members(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = {}
        for name in self.activations:
            members.setdefault(self.groups.get(name, name), []).append(name)
        return members


@dataclass(frozen=True)
class Scope:
    """Which nodes may be quantized: entries match a node name or op type exactly, or, written
    ``re:PATTERN``, a node name by regex. Empty ``include`` means every node."""

    op_types: frozenset[str]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @staticmethod
    def _matches(node: gs.Node, entries: Iterable[str]) -> bool:
        for entry in entries:
            if entry.startswith("re:"):
                if re.fullmatch(entry[3:], node.name or ""):
                    return True
            elif entry in (node.name, node.op):
                return True
        return False

    def reason_out(self, node: gs.Node) -> str | None:
        """Why ``node`` is out of scope, or None when it is in."""
        if node.op not in self.op_types:
            if node.op in FLOAT_BY_DEFAULT:
                return "kept in float by default (name it in extra-ops to quantize it)"
            return "not an op the pass quantizes"
        if self.include and not self._matches(node, self.include):
            return "not matched by include"
        if self._matches(node, self.exclude):
            return "matched by exclude"
        return None


def _const(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _attr(node: gs.Node, name: str, default: int) -> int:
    return int(node.attrs.get(name, default))


def annotate(
    graph: gs.Graph,
    scope: Scope,
    float_tensors: set[str],
    excluded: frozenset[str] = frozenset(),
    float_heads: bool = False,
) -> Annotation:
    """Decide what to quantize; ``excluded`` node names stay float (accuracy fallback).
    ``float_heads``: the output of a Conv with no quantized node anywhere downstream (a
    detection, segmentation or super-resolution head, a graph output) is not quantized: the
    layer runs in float on dequantized int8 inputs and weights and keeps its full output
    precision."""
    return _Annotator(graph, scope, float_tensors, excluded, float_heads).run()


class _Annotator:
    def __init__(
        self,
        graph: gs.Graph,
        scope: Scope,
        float_tensors: set[str],
        excluded: frozenset[str],
        float_heads: bool = False,
    ) -> None:
        self.graph, self.scope, self.float_tensors, self.excluded = (
            graph,
            scope,
            float_tensors,
            excluded,
        )
        self.ann = Annotation()
        self.wanted: list[str] = []  # activation tensors, in discovery order
        self.graph_outputs = {t.name for t in graph.outputs}
        self.conv_outputs: set[str] = set()  # quantized even as graph outputs (QLinearConv)
        self.float_heads = float_heads

    def is_float_var(self, t: gs.Tensor) -> bool:
        return isinstance(t, gs.Variable) and t.name in self.float_tensors

    @staticmethod
    def is_float_const(t: gs.Tensor) -> bool:
        values = _const(t)
        return values is not None and values.dtype == np.float32

    def post_activation(self, t: gs.Tensor) -> gs.Tensor:
        """The tensor to quantize for output ``t``: after a Relu/Clip that alone reads it."""
        if (
            t.name not in self.graph_outputs
            and len(t.outputs) == 1
            and t.outputs[0].op in FUSED_ACTIVATIONS
        ):
            out: gs.Tensor = t.outputs[0].outputs[0]
            return out
        return t

    def weight(self, node: gs.Node, index: int, axis: int | None, only: bool = False) -> WeightSpec:
        spec = WeightSpec(node.inputs[index].name, axis, only)
        self.ann.weights[(node.name, index)] = spec
        return spec

    def refuse(self, node: gs.Node, reason: str) -> None:
        self.ann.refusals.append((node.name, reason))

    def run(self) -> Annotation:
        for node in self.graph.nodes:
            reason = (
                "accuracy fallback" if node.name in self.excluded else (self.scope.reason_out(node))
            )
            if reason is not None:
                if node.op in self.scope.op_types or node.op in FLOAT_BY_DEFAULT:
                    self.refuse(node, f"{node.op} left in float: {reason}")
                continue
            if node.op in ("Add", "Mul"):
                continue  # decided in _claim_binary_inputs, after the others
            if self.visit(node):
                self.ann.quantized_nodes[node.name] = node.op
        tensors = self.graph.tensors()
        quantized = {
            n
            for n in self.wanted
            if n in tensors
            and (tensors[n].outputs or (n in self.graph_outputs and n in self.conv_outputs))
        }
        self._claim_binary_inputs(quantized)
        if self.float_heads:
            quantized -= (quantized & self.conv_outputs) - self._upstream_of_int8()
        self.ann.activations = [
            n for n in dict.fromkeys(self.wanted + sorted(quantized)) if n in quantized
        ]
        self._share_groups(set(self.ann.activations))
        return self.ann

    def visit(self, node: gs.Node) -> bool:
        """Claim what ``node`` needs quantized; False (with a refusal) when it cannot be."""
        op, ins = node.op, node.inputs
        if op in WEIGHT_ONLY_OPS:
            found = False
            for index in (1, 2):
                if len(ins) > index and self.is_float_const(ins[index]):
                    rank = np.ndim(ins[index].values)
                    self.weight(node, index, 1 if rank == 3 else None, only=True)
                    found = True
            if not found:
                self.refuse(node, f"{op} has no constant float W or R")
            return found
        if op in ("Conv", "ConvTranspose", "Gemm"):
            if not (self.is_float_var(ins[0]) and self.is_float_const(ins[1])):
                self.refuse(node, f"{op} needs a float activation input and constant weights")
                return False
            if op == "Gemm":
                trans_b = _attr(node, "transB", 0)
                spec = self.weight(node, 1, 0 if trans_b else 1)
                channels = np.shape(ins[1].values)[0 if trans_b else 1]
                plain = (
                    float(node.attrs.get("alpha", 1.0)) == 1.0
                    and float(node.attrs.get("beta", 1.0)) == 1.0
                )
                bias_ok = (
                    len(ins) > 2
                    and plain
                    and np.shape(getattr(ins[2], "values", ())) == (channels,)
                )
            else:
                axis = 0 if op == "Conv" else (1 if _attr(node, "group", 1) == 1 else None)
                spec = self.weight(node, 1, axis)
                bias_ok = len(ins) > 2
                self.wanted.append(self.post_activation(node.outputs[0]).name)
                self.conv_outputs.add(self.wanted[-1])
            self.wanted.append(ins[0].name)
            if bias_ok and self.is_float_const(ins[2]):
                self.ann.biases[(node.name, 2)] = BiasSpec(ins[2].name, ins[0].name, spec)
            return True
        if op == "MatMul":
            return self.visit_matmul(node)
        if op == "Concat":
            if not all(self.is_float_var(t) for t in ins):
                if any(self.is_float_var(t) for t in ins):
                    self.refuse(node, "Concat inputs are not all float activations")
                return False
            self.wanted.extend([*(t.name for t in ins), node.outputs[0].name])
            return True
        if op == "Gather":
            if self.is_float_var(ins[0]):
                self.wanted.extend([ins[0].name, node.outputs[0].name])
                return True
            if self.is_float_const(ins[0]):
                self.ann.tied[node.outputs[0].name] = self.weight(node, 0, None)
                self.wanted.append(node.outputs[0].name)
                return True
            return False  # a Gather of shapes or indices: nothing to quantize
        # pooling, Resize, and the single-input ops named in extra-ops
        if not self.is_float_var(ins[0]):
            return False  # e.g. pooling of integers: nothing to quantize
        self.wanted.extend([ins[0].name, self.post_activation(node.outputs[0]).name])
        return True

    def visit_matmul(self, node: gs.Node) -> bool:
        a, b = node.inputs
        kinds = [
            "var" if self.is_float_var(t) else "const" if self.is_float_const(t) else None
            for t in (a, b)
        ]
        if None in kinds or kinds == ["const", "const"]:
            self.refuse(node, "MatMul inputs are not float (or both are constant)")
            return False
        for index, (t, kind) in enumerate(zip((a, b), kinds, strict=True)):
            if kind == "var":
                self.wanted.append(t.name)
            else:
                # per column only for a 2-D B: onnxruntime's MatMulIntegerToFloat refuses a
                # 1-D zero point beside a batched [.., K, N] B ("b zero point is not valid")
                rank = np.ndim(t.values)
                self.weight(node, index, 1 if index == 1 and rank == 2 else None)
        bias = self.bias_add(node) if kinds == ["var", "const"] else None
        if bias is not None:  # MatMul -> Add(b): b as int32, so that MatMul+Add -> QGemm fuses
            add, index = bias
            self.ann.biases[(add.name, index)] = BiasSpec(
                add.inputs[index].name, a.name, self.ann.weights[(node.name, 1)]
            )
        return True

    def bias_add(self, node: gs.Node) -> tuple[gs.Node, int] | None:
        """(Add, input index) when an Add alone reads a MatMul's output and adds a [N] constant."""
        out = node.outputs[0]
        if out.name in self.graph_outputs or len(out.outputs) != 1 or out.outputs[0].op != "Add":
            return None
        add = out.outputs[0]
        index = 1 if add.inputs[0] is out else 0
        other, weight = add.inputs[index], node.inputs[1]
        columns = np.shape(weight.values)[-1] if np.ndim(weight.values) == 2 else -1
        if (
            self.is_float_const(other)
            and np.shape(other.values) == (columns,)
            and len(other.outputs) == 1
            and self.scope.reason_out(add) is None
        ):
            return add, index
        return None

    def _upstream_of_int8(self) -> set[str]:
        """Names of the tensors from which some quantized node can be reached."""
        stack = [
            t for n in self.graph.nodes if n.name in self.ann.quantized_nodes for t in n.inputs
        ]
        seen: set[str] = set()
        while stack:
            tensor = stack.pop()
            if tensor.name not in seen:
                seen.add(tensor.name)
                stack.extend(t for producer in tensor.inputs for t in producer.inputs)
        return seen

    def _claim_binary_inputs(self, quantized: set[str]) -> None:
        """Add/Mul of two activations whose (post-activation) output is quantized: quantize both
        inputs so that the node becomes QLinearAdd/QLinearMul. Repeat until nothing changes."""
        changed = True
        while changed:
            changed = False
            for node in self.graph.nodes:
                if (
                    node.op not in ("Add", "Mul")
                    or node.name in self.excluded
                    or self.scope.reason_out(node) is not None
                ):
                    continue
                a, b = node.inputs
                if not (self.is_float_var(a) and self.is_float_var(b)):
                    continue
                if self.post_activation(node.outputs[0]).name not in quantized:
                    continue
                if a.name not in quantized or b.name not in quantized:
                    quantized.update((a.name, b.name))
                    changed = True
                self.ann.quantized_nodes[node.name] = node.op

    def _share_groups(self, quantized: set[str]) -> None:
        parent: dict[str, str] = {n: n for n in quantized}

        def find(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        for node in self.graph.nodes:
            if node.op not in SHARED_PARAM_OPS or not node.outputs:
                continue
            out = self.post_activation(node.outputs[0]).name
            data = node.inputs if node.op == "Concat" else node.inputs[:1]
            linked = [t.name for t in data if t.name in quantized]
            if out in quantized and linked:
                for name in linked:
                    parent[find(name)] = find(out)
        self.ann.groups = {n: find(n) for n in quantized}
