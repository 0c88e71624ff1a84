"""Layer-wise reconstruction after channel pruning (He et al. 2017, ThiNet).

A layer that lost input channels is refit on calibration data: with x its input rows in the
pruned student (im2col patches for a Conv) and y the original teacher's output of the same
layer at the kept output channels, [W; b] = argmin ‖[x, 1]·[W; b] − y‖² + λ‖[W; b] − [W₀; b₀]‖²
from streamed normal equations (``onnxpress.analysis.refit``: XᵀX and XᵀY, one batch at a time).
Layers are refit in topological order, each on the student as refit so far, so later layers
also absorb the error of earlier ones. The bias column absorbs the mean that removed channels
(and the BatchNormalization shift behind them) contributed.

``LinearLayer`` sees a consumer as rows x ↦ x·W + b: Conv with group 1 (any kernel, strides,
dilations, pads), Gemm with transA=0 and a per-feature C, MatMul by a constant matrix (its
bias goes into the Add after it, or a new Add). A GRU, an LSTM or a grouped Conv is not
refit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.analysis.channels.groups import ChannelGroups
from onnxpress.analysis.channels.layout import node_key
from onnxpress.analysis.channels.trace import constant_array, topological_nodes
from onnxpress.analysis.refit import Tap, collect_moments, refit_right, squared_output_error
from onnxpress.analysis.refit import conv_patches as patches_of
from onnxpress.core.calibration_data import Batch
from onnxpress.core.ir import to_model, unique_name
from onnxpress.core.stats import infer_shapes

if TYPE_CHECKING:
    from onnxpress.passes.prune_channels.rewrite import Pruner

ROWS_PER_BATCH = 4096  # im2col rows kept per calibration batch (evenly strided)


def conv_patches(x: np.ndarray, node: gs.Node, kernel: list[int]) -> np.ndarray:
    """im2col for ``node``'s attributes (onnxpress.analysis.refit.conv_patches)."""
    dims = len(kernel)
    return patches_of(
        x,
        kernel,
        [int(s) for s in node.attrs.get("strides", [1] * dims)],
        [int(d) for d in node.attrs.get("dilations", [1] * dims)],
        [int(p) for p in node.attrs.get("pads", [0] * 2 * dims)],
        str(node.attrs.get("auto_pad", "NOTSET")),
    )


class LinearLayer:
    """A consumer as rows x ↦ x·W + b, W [features, outputs]; None from ``of`` if unsupported."""

    def __init__(self, node: gs.Node, weight: np.ndarray) -> None:
        self.node = node
        self.weight = weight

    @classmethod
    def of(cls, node: gs.Node) -> LinearLayer | None:
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None:
            return None
        if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1:
            return cls(node, weight)
        if node.op == "MatMul" and weight.ndim == 2:
            return cls(node, weight)
        bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
        per_feature = bias is None or bias.ndim == 0 or math.prod(bias.shape[:-1]) == 1
        if node.op == "Gemm" and not node.attrs.get("transA", 0) and per_feature:
            return cls(node, weight)
        return None

    @property
    def output_axis(self) -> int:
        return 1 if self.node.op in ("Conv", "Gemm") else -1

    @property
    def features_per_channel(self) -> int:
        """Rows features per input channel index (the kernel size for a Conv)."""
        return math.prod(self.weight.shape[2:]) if self.node.op == "Conv" else 1

    def rows(self, x: np.ndarray) -> np.ndarray:
        if self.node.op == "Conv":
            return conv_patches(x, self.node, list(self.weight.shape[2:]))
        return x.reshape(-1, x.shape[-1])

    def targets(self, y: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
        if kept is not None:
            y = np.take(y, kept, axis=self.output_axis)
        y = np.moveaxis(y, self.output_axis, -1)
        return y.reshape(-1, y.shape[-1])

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(W [features, outputs], b [outputs]) in float64."""
        w = self.weight.astype(np.float64)
        bias = constant_array(self.node.inputs[2]) if len(self.node.inputs) > 2 else None
        if self.node.op == "Conv":
            w = w.reshape(w.shape[0], -1).T
        elif self.node.op == "Gemm":
            w = float(self.node.attrs.get("alpha", 1.0)) * (
                w.T if self.node.attrs.get("transB", 0) else w
            )
            if bias is not None:
                bias = float(self.node.attrs.get("beta", 1.0)) * bias
        outputs = w.shape[1]
        b = np.zeros(outputs) if bias is None else np.broadcast_to(bias.reshape(-1), (outputs,))
        return w, b.astype(np.float64)

    def write(self, graph: gs.Graph, w: np.ndarray, b: np.ndarray) -> None:
        """Store refit weights; a MatMul's bias is added after it (bias Add or a new Add)."""
        node = self.node
        if node.op == "Conv":
            node.inputs[1] = self._constant(
                graph, node.inputs[1].name, w.T.reshape(self.weight.shape)
            )
        elif node.op == "Gemm":
            trans = node.attrs.get("transB", 0)
            node.inputs[1] = self._constant(graph, node.inputs[1].name, w.T if trans else w)
            node.attrs["alpha"], node.attrs["beta"] = 1.0, 1.0
        else:
            node.inputs[1] = self._constant(graph, node.inputs[1].name, w)
            self._add_matmul_bias(graph, b)
            return
        bias = self._constant(graph, f"{node.name or 'layer'}_bias", b)
        if len(node.inputs) > 2:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)

    def _constant(self, graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
        name = unique_name(graph, f"{base}_refit")
        return gs.Constant(name, np.asarray(values).astype(self.weight.dtype))

    def _add_matmul_bias(self, graph: gs.Graph, b: np.ndarray) -> None:
        out = self.node.outputs[0]
        users = list(out.outputs)
        if len(users) == 1 and users[0].op == "Add" and not any(t is out for t in graph.outputs):
            add = users[0]
            for i, operand in enumerate(add.inputs):
                values = constant_array(operand)
                if operand is not out and values is not None and values.shape[-1:] == b.shape:
                    add.inputs[i] = self._constant(graph, operand.name, values + b)
                    return
        hidden = gs.Variable(unique_name(graph, f"{out.name}_unbiased"), dtype=out.dtype)
        self.node.outputs[0] = hidden
        name = unique_name(graph, f"{self.node.name or out.name}_bias")
        bias = self._constant(graph, name, b)
        graph.nodes.append(gs.Node("Add", name=name, inputs=[hidden, bias], outputs=[out]))


@dataclass
class RefitLayer:
    """One layer to refit: its node, the kept output indices (None: all) and their count
    before pruning, so that the teacher's tensor can be checked."""

    node: gs.Node
    kept_outputs: np.ndarray | None
    full_outputs: int


def refit_layers(
    graph: gs.Graph,
    export: Callable[[gs.Graph], onnx.ModelProto],
    layers: list[RefitLayer],
    teachers: list[onnx.ModelProto],
    batches: Callable[[], Iterable[Batch]],
    damping: float,
) -> list[dict[str, Any]]:
    """Refit each layer in order; one record per layer (errors relative to ‖y‖²)."""
    shapes = [infer_shapes(t) for t in teachers]
    records: list[dict[str, Any]] = []
    for item in layers:
        node = item.node
        layer = LinearLayer.of(node)
        name = node.name or node.outputs[0].name
        if layer is None:
            records.append({"layer": name, "refit": False, "reason": "not a linear layer form"})
            continue
        out = node.outputs[0].name
        teacher = next(
            (
                t
                for t, s in zip(teachers, shapes, strict=True)
                if out in s and s[out][layer.output_axis] == item.full_outputs
            ),
            None,
        )
        if teacher is None:
            records.append({"layer": name, "refit": False, "reason": "teacher lacks the tensor"})
            continue
        w0, b0 = layer.matrix()
        initial = np.vstack([w0, b0[None, :]])
        tap = Tap(
            key="layer",
            student=node.inputs[0].name,
            rows=RowsWithOnes(layer),
            dim=initial.shape[0],
            teacher=out,
            targets=Targets(layer, item.kept_outputs, w0.shape[0]),
            target_dim=initial.shape[1],
        )
        moments = collect_moments(export(graph), teacher, [tap], batches())["layer"]
        before, energy = squared_output_error(initial, moments)
        solved = refit_right(np.eye(initial.shape[0]), moments, initial, damping)
        after, _ = squared_output_error(solved, moments)
        if after < before:
            layer.write(graph, solved[:-1], solved[-1])
        records.append(
            {
                "layer": name,
                "refit": after < before,
                "rows": moments.count,
                "error_before": before / max(energy, 1e-30),
                "error_after": min(after, before) / max(energy, 1e-30),
            }
        )
    return records


def refit_consumers(
    graph: gs.Graph,
    groups: ChannelGroups,
    pruner: Pruner,
    keys: set[str],
    teachers: list[onnx.ModelProto],
    batches: Callable[[], Iterable[Batch]],
    damping: float,
) -> list[dict[str, Any]]:
    """Refit the layers ``keys`` (consumers of pruned groups) of a pruned graph in order."""
    layers = [
        RefitLayer(node, pruner.indices(node.outputs[0]), _full_outputs(groups, node))
        for node in topological_nodes(graph)
        if node.outputs and node_key(node) in keys and node.op not in ("GRU", "LSTM")
    ]
    return refit_layers(
        graph, lambda g: to_model(g, teachers[-1]), layers, teachers, batches, damping
    )


def _full_outputs(groups: ChannelGroups, node: gs.Node) -> int:
    """The layer's output channels before pruning (its output layout's length, if any)."""
    layout = groups.layouts.get(node.outputs[0].name)
    if layout is not None:
        return groups.length(layout)
    layer = LinearLayer.of(node)
    return layer.matrix()[0].shape[1] if layer is not None else 0


def _thin(rows: np.ndarray, features: int) -> np.ndarray:
    """Every k-th row, so that a batch gives at most max(ROWS_PER_BATCH, 8·features) rows
    (the same rows for inputs and targets: k depends only on the row count)."""
    step = max(1, rows.shape[0] // max(ROWS_PER_BATCH, 8 * features))
    return rows[::step]


@dataclass(frozen=True)
class RowsWithOnes:
    layer: LinearLayer

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = self.layer.rows(x)
        rows = _thin(rows, rows.shape[1])
        return np.hstack([rows, np.ones((rows.shape[0], 1), dtype=rows.dtype)])


@dataclass(frozen=True)
class Targets:
    layer: LinearLayer
    kept: np.ndarray | None
    features: int

    def __call__(self, y: np.ndarray) -> np.ndarray:
        return _thin(self.layer.targets(y, self.kept), self.features)
