"""Probing a model with replaced weights: one onnxruntime session, one run per probe.

``weights_as_inputs`` turns chosen initializers into graph inputs, so that a session can be
fed the model's own arrays or altered copies (a truncated weight, a masked attention head)
without a new session or a copy of the rest of the model; ``relative_change`` measures how
far the outputs moved.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper


def weights_as_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``model`` with the initializers in ``names`` turned into graph inputs (no data)."""
    kept = [t for t in model.graph.initializer if t.name not in names]
    moved = [t for t in model.graph.initializer if t.name in names]
    graph = helper.make_graph(
        list(model.graph.node),
        model.graph.name,
        [
            *model.graph.input,
            *(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved),
        ],
        list(model.graph.output),
        kept,
        value_info=list(model.graph.value_info),
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    return out


def relative_change(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """‖Δ‖² / ‖reference‖² over every float output."""
    error = total = 0.0
    for ref, new in zip(reference, outputs, strict=True):
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
        error += float(np.sum((new64 - ref64) ** 2))
        total += float(np.sum(ref64**2))
    return error / total if total > 0 else 0.0
