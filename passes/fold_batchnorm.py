"""BatchNormalization folding into the linear op that produces its input (inference form).

BatchNormalization(Conv(x, W, b)) -> Conv(x, W*s, (b-mean)*s+beta) with s = gamma/sqrt(var+eps),
scaling each output channel; t = beta - mean*s is the new bias offset. Likewise:
  * ConvTranspose: W is [Cin, Cout/group, k...], so s scales axis 1 within each group;
  * Gemm(A, B, C): the output columns of B (its rows with transB=1); C -> beta*C*s + t with
    the Gemm's beta set to 1, when C is per output feature (scalar, [N] or [1, N]);
  * MatMul(x, W[k, n]) with a rank-2 output: W*s, then a new Add(., t);
  * Add(MatMul(x, W), bias) with a constant per-feature bias: W*s and bias*s + t.
The channel axis of the BN is 1, so Gemm and MatMul outputs must have rank 2. The producer
(or the new Add) then writes the BN's output tensor, so graph outputs keep their names. The
math runs in float64 and is cast to the weight's dtype. A weight or bias that another node
(or a graph output) also reads is copied, never changed in place: count ``weights_copied``.

Refused with a reason: training mode or used running-statistics outputs, non-constant BN
parameters, a graph input or a producer of another op, a non-constant weight, or a producer
whose output has other consumers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.core.context import PassContext, TensorShapes
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = (None, "", "ai.onnx")  # graphsurgeon reads the default as None
_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


@dataclass(frozen=True)
class FoldBatchnormOptions:
    """No options: every foldable BatchNormalization is folded."""


@register_pass("fold-batchnorm")
class FoldBatchnorm(Pass[FoldBatchnormOptions]):
    """Fold inference BatchNormalization into a preceding Conv, ConvTranspose, Gemm or MatMul."""

    options_type = FoldBatchnormOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        folder = _Folder(graph, ctx, result)
        for node in list(graph.nodes):
            if node.op == "BatchNormalization" and node.domain in _DEFAULT_DOMAINS:
                folder.fold(node)
        folder.commit()
        logger.debug("fold-batchnorm: %s, %d refused", result.counts, len(result.refusals))
        return result


class _Folder:
    def __init__(self, graph: gs.Graph, ctx: PassContext, result: PassResult) -> None:
        self.graph, self.ctx, self.result = graph, ctx, result
        self.removed: set[int] = set()
        self.added_after: dict[int, gs.Node] = {}  # producer id -> new bias Add
        self.taken: set[str] | None = None
        self.shapes: TensorShapes | None = None
        self.outputs = {id(t) for t in graph.outputs}
        if any(_needs_rank(n) for n in graph.nodes):  # before any rewrite: export a clean graph
            self.shapes = ctx.analysis(TensorShapes, graph)

    def fold(self, bn: gs.Node) -> None:
        outcome = self.plan(bn)
        if isinstance(outcome, str):
            self.result.refuse(bn.name or "<BatchNormalization>", outcome)
            return
        producer, scale, shift = outcome
        x, y = bn.inputs[0], bn.outputs[0]
        bn.inputs.clear()
        bn.outputs.clear()
        self.removed.add(id(bn))
        rewrite = getattr(self, f"fold_{producer.op.lower()}")
        writer = rewrite(producer, scale, shift, x, y, bn.name or producer.name)
        if writer is not None:  # the producer now writes the BN's output tensor
            writer.outputs[writer.outputs.index(x)] = y
        self.result.count("folded")
        self.result.details.append(
            {"batchnorm": bn.name, "into": producer.name, "op": producer.op, "channels": scale.size}
        )

    def plan(self, bn: gs.Node) -> tuple[gs.Node, np.ndarray, np.ndarray] | str:
        """(producer, s, t) when the BN folds, else the reason it does not."""
        attrs = bn.attrs
        if attrs.get("training_mode", 0) or attrs.get("spatial", 1) == 0:
            return "training mode or spatial=0: statistics are not per-channel constants"
        if any(t.name and (t.outputs or id(t) in self.outputs) for t in bn.outputs[1:]):
            return "the running mean/variance outputs are used"
        params = bn.inputs[1:5]
        if len(params) != 4 or not all(isinstance(t, gs.Constant) for t in params):
            return "scale, bias, mean and variance must all be constants"
        gamma, beta, mean, var = (np.asarray(t.values, dtype=np.float64) for t in params)
        if not gamma.shape == beta.shape == mean.shape == var.shape or gamma.ndim != 1:
            return f"parameters have shapes {[t.shape for t in params]}, not all [C]"
        scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        shift = beta - mean * scale
        x = bn.inputs[0]
        if isinstance(x, gs.Constant) or not x.inputs:
            kind = "a constant" if isinstance(x, gs.Constant) else "a graph input"
            return f"input '{x.name}' is {kind}: no producer to fold into"
        producer = x.inputs[0]
        where = f"{producer.op} '{producer.name}'"
        if producer.op not in _PRODUCERS or producer.domain not in _DEFAULT_DOMAINS:
            return f"producer {where} is not Conv/ConvTranspose/Gemm/MatMul"
        if len(x.outputs) != 1 or id(x) in self.outputs:
            users = f"{len(x.outputs)} consumers" + (
                ", graph output" if id(x) in self.outputs else ""
            )
            return f"output of {where} also feeds other nodes ({users})"
        check = getattr(self, f"check_{producer.op.lower()}")(producer, scale.size, x)
        return check if isinstance(check, str) else (producer, scale, shift)

    # Checks: None when the producer can absorb C channels, else the reason.

    def check_conv(self, conv: gs.Node, channels: int, x: gs.Tensor) -> str | None:
        weight = _constant_input(conv, 1)
        if weight is None or weight.ndim < 3 or weight.dtype.kind != "f":
            return f"Conv '{conv.name}' weight is not a constant float tensor"
        if weight.shape[0] != channels:
            return f"Conv '{conv.name}' has {weight.shape[0]} output channels, BN has {channels}"
        return _check_bias(conv, 2, channels)

    def check_convtranspose(self, conv: gs.Node, channels: int, x: gs.Tensor) -> str | None:
        weight, group = _constant_input(conv, 1), int(conv.attrs.get("group", 1))
        if weight is None or weight.ndim < 3 or weight.dtype.kind != "f":
            return f"ConvTranspose '{conv.name}' weight is not a constant float tensor"
        if weight.shape[1] * group != channels or weight.shape[0] % group:
            return (
                f"ConvTranspose '{conv.name}' has {weight.shape[1] * group} outputs, BN {channels}"
            )
        return _check_bias(conv, 2, channels)

    def check_gemm(self, gemm: gs.Node, channels: int, x: gs.Tensor) -> str | None:
        weight = _constant_input(gemm, 1)
        if weight is None or weight.ndim != 2 or weight.dtype.kind != "f":
            return f"Gemm '{gemm.name}' B is not a constant 2-D float tensor"
        features = weight.shape[0 if gemm.attrs.get("transB", 0) else 1]
        if features != channels:
            return f"Gemm '{gemm.name}' has {features} output features, BN has {channels}"
        return _check_bias(gemm, 2, channels)

    def check_matmul(self, matmul: gs.Node, channels: int, x: gs.Tensor) -> str | None:
        weight = _constant_input(matmul, 1)
        if weight is None or weight.ndim != 2 or weight.dtype.kind != "f":
            return f"MatMul '{matmul.name}' second input is not a constant 2-D float weight"
        if weight.shape[1] != channels:
            return f"MatMul '{matmul.name}' has {weight.shape[1]} output features, BN {channels}"
        return self.check_rank(x, matmul)

    def check_add(self, add: gs.Node, channels: int, x: gs.Tensor) -> str | None:
        bias_index = next((i for i, t in enumerate(add.inputs) if isinstance(t, gs.Constant)), None)
        if bias_index is None or len(add.inputs) != 2:
            return f"producer Add '{add.name}' has no constant bias"
        product = add.inputs[1 - bias_index]
        matmul = product.inputs[0] if product.inputs else None
        if matmul is None or matmul.op != "MatMul" or len(product.outputs) != 1:
            return f"Add '{add.name}' does not add a bias to a MatMul it alone reads"
        if id(product) in self.outputs:
            return f"Add '{add.name}' reads a graph output"
        return self.check_matmul(matmul, channels, x) or _check_bias(add, bias_index, channels)

    def check_rank(self, x: gs.Tensor, node: gs.Node) -> str | None:
        shape = x.shape
        if shape is None and self.shapes is not None:
            shape = self.shapes.get(x.name)
        if shape is None or len(shape) != 2:
            rank = "unknown" if shape is None else len(shape)
            return (
                f"{node.op} '{node.name}' output has rank {rank}; BN's axis 1 is not its features"
            )
        return None

    # Rewrites: scale the weight, fold the shift into the bias. Each returns the node whose
    # output x must become y, or None when it wired y itself. s and t are float64 [C].

    def fold_conv(self, conv: gs.Node, s: Any, t: Any, x: Any, y: Any, base: str) -> gs.Node:
        weight = _weight(conv)
        per_channel = s.reshape((-1,) + (1,) * (weight.ndim - 1))
        self.set_constant(conv, 1, weight * per_channel, weight.dtype, base)
        self.set_constant(conv, 2, _bias(conv, 2, s.size) * s + t, weight.dtype, base + "_bias")
        return conv

    def fold_convtranspose(
        self, conv: gs.Node, s: Any, t: Any, x: Any, y: Any, base: str
    ) -> gs.Node:
        weight, group = _weight(conv), int(conv.attrs.get("group", 1))
        grouped = weight.reshape((group, weight.shape[0] // group, *weight.shape[1:]))
        per_channel = s.reshape((group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
        scaled = (grouped * per_channel).reshape(weight.shape)
        self.set_constant(conv, 1, scaled, weight.dtype, base)
        self.set_constant(conv, 2, _bias(conv, 2, s.size) * s + t, weight.dtype, base + "_bias")
        return conv

    def fold_gemm(self, gemm: gs.Node, s: Any, t: Any, x: Any, y: Any, base: str) -> gs.Node:
        weight, trans_b = _weight(gemm), gemm.attrs.get("transB", 0)
        per_feature = s[:, None] if trans_b else s[None, :]
        self.set_constant(gemm, 1, weight * per_feature, weight.dtype, base)
        bias = float(gemm.attrs.get("beta", 1.0)) * _bias(gemm, 2, s.size) * s + t
        self.set_constant(gemm, 2, bias, weight.dtype, base + "_bias")
        gemm.attrs["beta"] = 1.0
        return gemm

    def fold_matmul(self, matmul: gs.Node, s: Any, t: Any, x: Any, y: Any, base: str) -> None:
        weight = _weight(matmul)
        self.set_constant(matmul, 1, weight * s[None, :], weight.dtype, base)
        bias = gs.Constant(self.unique(f"{base}_bias"), t.astype(weight.dtype))
        add = gs.Node("Add", name=self.unique(f"{base}_bias_add"), inputs=[x, bias], outputs=[y])
        self.added_after[id(matmul)] = add

    def fold_add(self, add: gs.Node, s: Any, t: Any, x: Any, y: Any, base: str) -> gs.Node:
        bias_index = next(i for i, c in enumerate(add.inputs) if isinstance(c, gs.Constant))
        matmul = add.inputs[1 - bias_index].inputs[0]
        weight = _weight(matmul)
        self.set_constant(matmul, 1, weight * s[None, :], weight.dtype, base)
        bias = _bias(add, bias_index, s.size) * s + t
        self.set_constant(add, bias_index, bias, weight.dtype, base + "_bias")
        return add

    def set_constant(
        self, node: gs.Node, index: int, values: np.ndarray, dtype: np.dtype, base: str
    ) -> None:
        """Write ``values`` cast to ``dtype`` as input ``index``; copy a shared constant."""
        values = values.astype(dtype)
        old = node.inputs[index] if index < len(node.inputs) else None
        if isinstance(old, gs.Constant) and len(old.outputs) == 1 and id(old) not in self.outputs:
            old.values = values
            return
        constant = gs.Constant(self.unique(f"{base}_folded"), values)
        if old is None:
            node.inputs.append(constant)
        else:
            node.inputs[index] = constant
            if isinstance(old, gs.Constant):
                self.result.count("weights_copied")

    def unique(self, base: str) -> str:
        if self.taken is None:
            self.taken = set(self.graph.tensors()) | {n.name for n in self.graph.nodes}
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def commit(self) -> None:
        if not self.removed and not self.added_after:
            return
        nodes: list[gs.Node] = []
        for node in self.graph.nodes:
            if id(node) not in self.removed:
                nodes.append(node)
                if id(node) in self.added_after:
                    nodes.append(self.added_after[id(node)])
        self.graph.nodes = nodes


def _needs_rank(node: gs.Node) -> bool:
    if node.op != "BatchNormalization" or not node.inputs or not node.inputs[0].inputs:
        return False
    return node.inputs[0].inputs[0].op in ("MatMul", "Add") and node.inputs[0].shape is None


def _constant_input(node: gs.Node, index: int) -> np.ndarray | None:
    if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
        return np.asarray(node.inputs[index].values)
    return None


def _weight(node: gs.Node) -> np.ndarray:
    """Input 1, checked to be a constant before any rewrite."""
    return np.asarray(node.inputs[1].values)


def _has_input(node: gs.Node, index: int) -> bool:
    return index < len(node.inputs) and bool(node.inputs[index].name)


def _check_bias(node: gs.Node, index: int, channels: int) -> str | None:
    if not _has_input(node, index):
        return None
    bias = _constant_input(node, index)
    if bias is None:
        return f"{node.op} '{node.name}' bias is not constant"
    if bias.shape not in ((), (1,), (channels,), (1, channels)):
        return f"{node.op} '{node.name}' bias of shape {list(bias.shape)} is not per output feature"
    return None


def _bias(node: gs.Node, index: int, channels: int) -> np.ndarray:
    """The existing bias broadcast to [channels] in float64, or zeros."""
    bias = _constant_input(node, index) if _has_input(node, index) else None
    if bias is None:
        return np.zeros(channels, dtype=np.float64)
    return np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)).copy()
