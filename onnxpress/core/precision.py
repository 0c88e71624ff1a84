"""The float precision a model computes in, and the lossless tolerance that fits it.

A lossless rewrite may move an output by the rounding of the dtype it is computed in. For a
float32 model that is ``LOSSLESS_TOLERANCE`` relative to the output's scale; for an output
of a coarser float (float16, bfloat16) a few of its machine epsilons (``lossless_tolerance``).
A model can also compute in a coarse float and still declare float32 outputs (a float16
export whose interface was kept float32, with Casts at its edges): its outputs then carry
float16 rounding too. ``compute_dtype`` finds the coarsest float a model holds anywhere (its
weights, its inputs, outputs and value types, its Casts and constants, in subgraphs too), and
``compute_tolerance`` gives every output of such a model at least ``COMPUTE_ULPS`` of it:
rounding after each of many ops adds up with depth (on onnxruntime, BERT-base exported at
float16 lies 1.6 ulps from its float32 model, resnet18 0.35; computed in float32 inside, a
6-layer encoder lay 2.7 ulps from its float16 run). A wrong rewrite moves outputs by far
more than 8 ulps (0.8% of the output's scale at float16).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

LOSSLESS_TOLERANCE = 1e-5
# Lossless outputs of a low-precision float dtype may move by its rounding: this many
# machine epsilons (ulps at the top of the output's binade) relative to the output's scale.
LOW_PRECISION_ULPS = 2
# ... and every output of a model that computes in one, whatever the output's own dtype
COMPUTE_ULPS = 8
LOW_PRECISION = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


def epsilon(dtype: Any) -> float | None:
    """The machine epsilon of a float dtype (numpy's, or ml_dtypes' bfloat16); None else."""
    try:
        return float(np.finfo(dtype).eps)
    except (TypeError, ValueError):
        try:
            import ml_dtypes

            return float(ml_dtypes.finfo(dtype).eps)
        except (ImportError, TypeError, ValueError):
            return None


def lossless_tolerance(dtype: np.dtype, tolerance: float = LOSSLESS_TOLERANCE) -> float:
    """``tolerance``, or for fp16/bf16 (and other coarse floats) a few ulps of that dtype."""
    eps = epsilon(dtype)
    return tolerance if eps is None else max(tolerance, LOW_PRECISION_ULPS * eps)


def compute_tolerance(dtype: Any | None, tolerance: float = LOSSLESS_TOLERANCE) -> float:
    """The least tolerance of every output of a model computing in ``dtype`` (None: float32
    or finer, ``tolerance``)."""
    eps = epsilon(dtype) if dtype is not None else None
    return tolerance if eps is None else max(tolerance, COMPUTE_ULPS * eps)


def compute_dtype(model: onnx.ModelProto) -> Any | None:
    """The coarsest low-precision float (float16 or bfloat16, as a numpy / ml_dtypes dtype)
    that ``model`` holds anywhere, or None when it computes in float32 or finer."""
    found = set(_element_types(model.graph)) & set(LOW_PRECISION)
    if not found:
        return None
    if TensorProto.BFLOAT16 in found:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float16)


def _element_types(graph: onnx.GraphProto) -> Iterator[int]:
    for tensor in graph.initializer:
        yield tensor.data_type
    for info in (*graph.input, *graph.output, *graph.value_info):
        if info.type.HasField("tensor_type"):
            yield info.type.tensor_type.elem_type
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT:
                yield attr.i
            elif attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t.data_type
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _element_types(sub)
