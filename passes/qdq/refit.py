"""Layer-wise refit of the quantized layers against the float model (``qdq{refit=true}``).

For each quantized Conv (group 1), Gemm and MatMul by a constant, in topological order, with
x̃ the layer's *dequantized* input in the quantized model as refit so far and y the float
model's output of the same layer (before any activation), on the calibration batches:

    W* = argmin ‖[x̃, 1]·[W; b] − y‖² + λ‖[W; b] − [W₀; b₀]‖²      (ridge toward the float weights)
    b* = mean(y − x̃·Q(W*))                                           (exact bias for the int8 weights)

Q is the int8 round-trip of the pass (per output channel or per tensor). The first line lets a
layer absorb what the quantization of every earlier tensor did to its input (clipping,
rounding, the error of the layers before it), the second the mean shift of its own rounded
weights, for the inputs it will really see; so it replaces bias correction on these layers.
A layer keeps its weights when the refit does not lower ‖x̃·Q(W) + b − y‖², or when the
calibration set gives it fewer rows than twice its inputs (a Gemm on 64 samples).
The normal equations stream (``onnxpress.analysis.refit``); no batch is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxpress.passes.prune_channels.refit import LinearLayer, RowsWithOnes, Targets
from onnxpress.passes.qdq.convert import dequantize, quantize_weight

from onnxpress.analysis.refit import (
    Tap,
    TensorCapture,
    collect_moments,
    layer_waves,
    refit_right,
    squared_output_error,
)
from onnxpress.calibration.activations import Moments
from onnxpress.core.calibration_data import Batch

logger = logging.getLogger(__name__)

MIN_ROWS_PER_INPUT = 2
LINEAR_OPS = ("Conv", "Gemm", "MatMul")
Solutions = dict[str, tuple[np.ndarray, np.ndarray]]  # layer name -> (W [in, out], b [out])


def _quantized(matrix: np.ndarray, per_channel: bool, reduce_range: bool) -> np.ndarray:
    """Q(W) of a [features, outputs] matrix: int8 per output column, or per tensor."""
    q, params = quantize_weight(matrix.astype(np.float32), 1 if per_channel else None, reduce_range)
    return np.asarray(dequantize(q, params), np.float64)


def _student_input(model: onnx.ModelProto, node_name: str) -> str | None:
    """The tensor ``node_name`` reads as its data input in the quantized model."""
    node = next((n for n in model.graph.node if n.name == node_name), None)
    return node.input[0] if node is not None else None


def refit_quantized(
    graph: gs.Graph,
    layers: list[gs.Node],
    quantize: Callable[[gs.Graph], onnx.ModelProto],
    teacher: onnx.ModelProto,
    batches: Callable[[], Iterable[Batch]],
    per_channel: bool,
    reduce_range: bool,
    damping: float = 1e-3,
) -> tuple[list[dict[str, Any]], Solutions]:
    """Refit ``layers`` of the float ``graph`` in place, wave by wave (``layer_waves``: one
    quantized model and one calibration run serve every layer of a wave); ``quantize`` builds
    the quantized model of the graph as it stands. Returns one record per layer and the new
    (W, b) of every refit layer, to replay on a copy of the graph with ``apply_solutions``."""
    solutions: Solutions = {}
    records: list[dict[str, Any]] = []
    candidates: list[tuple[gs.Node, LinearLayer]] = []
    for node in layers:
        layer = LinearLayer.of(node)
        if layer is None:
            records.append({"layer": node.name, "refit": False, "reason": "not a linear layer"})
        else:
            candidates.append((node, layer))
    capture_teacher = TensorCapture(teacher, [n.outputs[0].name for n, _ in candidates])
    for wave in layer_waves(graph, [[n] for n, _ in candidates]):
        student = quantize(graph)
        taps: list[Tap] = []
        for node, layer in (candidates[i] for i in wave):
            source = _student_input(student, node.name)
            if source is None:
                records.append({"layer": node.name, "refit": False, "reason": "not in the model"})
                continue
            inputs, outputs = layer.matrix()[0].shape
            taps.append(
                Tap(
                    key=node.name,
                    student=source,
                    rows=RowsWithOnes(layer),
                    dim=inputs + 1,
                    teacher=node.outputs[0].name,
                    targets=Targets(layer, None, inputs),
                    target_dim=outputs,
                )
            )
        moments = collect_moments(student, capture_teacher, taps, batches())
        for node, layer in (candidates[i] for i in wave):
            if node.name not in moments:
                continue
            record, solution = _refit_layer(
                node, layer, moments[node.name], per_channel, reduce_range, damping
            )
            records.append(record)
            if solution is not None:
                layer.write(graph, *solution)
                solutions[node.name] = solution
    return records, solutions


def apply_solutions(graph: gs.Graph, solutions: Solutions) -> None:
    """Write refit (W, b) into the same-named layers of ``graph``."""
    for node in graph.nodes:
        solution = solutions.get(node.name)
        layer = LinearLayer.of(node) if solution is not None else None
        if layer is not None and solution is not None:
            layer.write(graph, *solution)


def _refit_layer(
    node: gs.Node,
    layer: LinearLayer,
    moments: Moments,
    per_channel: bool,
    reduce_range: bool,
    damping: float,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
    w0, b0 = layer.matrix()
    initial = np.vstack([w0, b0[None, :]])
    if moments.count < MIN_ROWS_PER_INPUT * initial.shape[0] or moments.xty is None:
        reason = f"{moments.count} calibration rows for {initial.shape[0]} inputs"
        return {"layer": node.name, "refit": False, "reason": reason}, None
    solved = refit_right(np.eye(initial.shape[0]), moments, initial, damping)
    weights = _quantized(solved[:-1], per_channel, reduce_range)
    # bias for the rounded weights: mean(y) - mean(x̃)·Q(W*), from the moments' ones column
    bias = (moments.xty[-1] - moments.sum[:-1] @ weights) / max(moments.count, 1)
    before, energy = squared_output_error(
        np.vstack([_quantized(w0, per_channel, reduce_range), b0[None, :]]), moments
    )
    after, _ = squared_output_error(np.vstack([weights, bias[None, :]]), moments)
    improved = after < before
    logger.debug("qdq refit %s: %.3g -> %.3g", node.name, before, after)
    record = {
        "layer": node.name,
        "refit": improved,
        "rows": moments.count,
        "error_before": before / max(energy, 1e-30),
        "error_after": min(after, before) / max(energy, 1e-30),
    }
    return record, ((solved[:-1], bias) if improved else None)
