"""Cross-layer equalization (Nagel et al., 2019) of layer pairs joined by a ReLU.

    A(x; W1, b1) -> Relu -> B(.; W2)   becomes   A(x; W1 / s, b1 / s) -> Relu -> B(.; W2 * s)

per channel i between the layers, with s_i = sqrt(r1_i / r2_i), r1_i = max|W1[out i]| and
r2_i = max|W2[in i]|. Since relu(z / s) = relu(z) / s for s > 0 the outputs are unchanged in
exact arithmetic, and both layers end with per-channel weight ranges sqrt(r1_i * r2_i): one
int8 scale per tensor then fits every channel far better. Pairs are Conv -> Conv (any group)
and Gemm/MatMul -> Gemm/MatMul, joined directly or through one Relu, LeakyRelu or PRelu with
a scalar slope. Chains (A -> B -> C) are swept until the scales settle. A pair is refused,
with a reason, when a tensor between the layers has other readers, when a BatchNormalization
sits between them (run ``fold-batchnorm`` first) or when the activation is not positively
homogeneous (Clip, Sigmoid...). Run it before ``qdq``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.core.context import PassContext
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

CONV, DENSE = "conv", "dense"
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")


@dataclass(frozen=True)
class EqualizeOptions:
    max_sweeps: int = 20  # passes over every pair
    tolerance: float = 1e-3  # stop when every scale is within 1 +- tolerance

    def __post_init__(self) -> None:
        if self.max_sweeps < 1:
            raise ValueError(f"max-sweeps must be >= 1, not {self.max_sweeps}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, not {self.tolerance}")


def _family(node: gs.Node) -> str | None:
    """'conv' or 'dense' for a layer with one constant float weight it alone reads."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    weight = node.inputs[1]
    if len(weight.outputs) != 1 or np.asarray(weight.values).dtype != np.float32:
        return None
    if node.op == "Conv":
        return CONV
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return DENSE
    if node.op == "MatMul" and np.ndim(weight.values) == 2:
        return DENSE
    return None


def _out_axis(node: gs.Node) -> int:
    """Axis of the weight that indexes the layer's output channels."""
    if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)):
        return 0
    return 1


def _in_ranges(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """max|W| per input channel of the layer (Conv groups handled)."""
    magnitude = np.abs(weight)
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        out, per_group = weight.shape[0], weight.shape[1]
        per_out = magnitude.reshape(out, per_group, -1).max(axis=2)  # [O, C/g]
        return per_out.reshape(groups, out // groups, per_group).max(axis=1).ravel()
    axis = 1 if (node.op == "Gemm" and node.attrs.get("transB", 0)) else 0
    return magnitude.max(axis=1 - axis)


def _scale_inputs(node: gs.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        out, per_group = weight.shape[0], weight.shape[1]
        full = np.repeat(scale.reshape(groups, per_group), out // groups, axis=0)  # [O, C/g]
        return weight * full.reshape(out, per_group, *([1] * (weight.ndim - 2)))
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return weight * scale[None, :]
    return weight * scale[:, None]


@dataclass
class _Pair:
    first: gs.Node
    second: gs.Node


@register_pass("cross-layer-equalization")
class CrossLayerEqualization(Pass[EqualizeOptions]):
    """Equalize per-channel weight ranges of layer pairs joined by a ReLU (before qdq)."""

    options_type = EqualizeOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        pairs = self._pairs(graph, result)
        if not pairs:
            return result
        weights = {
            id(n): np.asarray(n.inputs[1].values, np.float64)
            for p in pairs
            for n in (p.first, p.second)
        }
        biases: dict[int, np.ndarray] = {}
        for p in pairs:
            if len(p.first.inputs) > 2:
                biases[id(p.first)] = np.asarray(p.first.inputs[2].values, np.float64)
        sweeps = 0
        for sweeps in range(1, self.options.max_sweeps + 1):  # noqa: B007
            worst = 0.0
            for p in pairs:
                w1, w2 = weights[id(p.first)], weights[id(p.second)]
                axis = _out_axis(p.first)
                r1 = np.abs(np.moveaxis(w1, axis, 0)).reshape(w1.shape[axis], -1).max(axis=1)
                r2 = _in_ranges(p.second, w2)
                ok = (r1 > 0) & (r2 > 0)
                s = np.where(ok, np.sqrt(np.where(ok, r1, 1) / np.where(ok, r2, 1)), 1.0)
                shape = [1] * w1.ndim
                shape[axis] = -1
                weights[id(p.first)] = w1 / s.reshape(shape)
                if id(p.first) in biases:
                    biases[id(p.first)] = biases[id(p.first)] / s
                weights[id(p.second)] = _scale_inputs(p.second, w2, s)
                worst = max(worst, float(np.max(np.abs(np.log(s)))))
            if worst < np.log1p(self.options.tolerance):
                break
        for p in pairs:
            for node in (p.first, p.second):
                node.inputs[1].values = weights[id(node)].astype(np.float32)
            if id(p.first) in biases:
                p.first.inputs[2].values = biases[id(p.first)].astype(np.float32)
            result.details.append(
                {
                    "first": p.first.name,
                    "second": p.second.name,
                    "channels": int(np.shape(weights[id(p.first)])[_out_axis(p.first)]),
                }
            )
        result.count("pairs_equalized", len(pairs))
        result.count("sweeps", sweeps)
        return result

    def _pairs(self, graph: gs.Graph, result: PassResult) -> list[_Pair]:
        outputs = {id(t) for t in graph.outputs}
        live = {id(n) for n in graph.nodes}
        pairs: list[_Pair] = []
        for node in graph.nodes:
            family = _family(node)
            if family is None:
                continue
            if len(node.inputs) > 2 and not (
                isinstance(node.inputs[2], gs.Constant) and len(node.inputs[2].outputs) == 1
            ):
                result.refuse(node.name, "bias is not a constant read by this layer alone")
                continue
            tensor, readers = node.outputs[0], None
            for _ in range(2):  # the layer's output, then the activation's output
                readers = [n for n in tensor.outputs if id(n) in live]
                if id(tensor) in outputs or len(readers) != 1:
                    readers = None
                    break
                if readers[0].op not in HOMOGENEOUS:
                    break
                if (
                    readers[0].op == "PRelu"
                    and np.size(getattr(readers[0].inputs[1], "values", np.zeros(2))) != 1
                ):
                    readers = None
                    break
                tensor = readers[0].outputs[0]
            if not readers:
                if id(tensor) not in outputs:
                    result.refuse(
                        node.name,
                        "its output (or its activation's) has several "
                        "readers, e.g. a residual branch",
                    )
                continue
            second = readers[0]
            if _family(second) == family and second.inputs[0] is tensor:
                pairs.append(_Pair(node, second))
            elif second.op == "BatchNormalization":
                result.refuse(node.name, "BatchNormalization follows; run fold-batchnorm first")
            elif second.op not in HOMOGENEOUS and second.op in ("Clip", "Sigmoid", "Tanh"):
                result.refuse(node.name, f"{second.op} is not positively homogeneous")
        return pairs
