"""The ops ``fold-constants`` evaluates in numpy rather than on ``onnx.reference``: cheap
ones that shape arithmetic is made of (Add/Sub/Mul, Identity, Cast, Concat, Gather,
GatherElements, Unsqueeze), faster in numpy, and where the reference is wrong (its
GatherElements reshapes a scalar when the indices are smaller than the data: BertModel's
position ids). ``applicable`` says when the numpy path gives the reference's result."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}
FAST = {"Identity", "Cast", "Concat", "Gather", "GatherElements", "Unsqueeze", *BINARY}


def applicable(node: gs.Node, arrays: list[np.ndarray]) -> bool:
    if node.op not in FAST:
        return False
    if node.op in BINARY:
        return len(arrays) == 2 and arrays[0].dtype == arrays[1].dtype != np.bool_
    if node.op == "Cast":  # float -> int is left to the reference (rounding, overflow)
        target = helper.tensor_dtype_to_np_dtype(node.attrs["to"])
        return target.kind in "biuf" and not (arrays[0].dtype.kind == "f" and target.kind in "iu")
    if node.op == "GatherElements":
        return len(arrays) == 2 and arrays[0].ndim == arrays[1].ndim >= 1
    return True


def fast_elements(node: gs.Node, inputs: list[Any]) -> int:
    """Output element count of a FAST op from its input shapes."""
    op = node.op
    if op in BINARY:
        return math.prod(np.broadcast_shapes(inputs[0].shape, inputs[1].shape))
    if op == "GatherElements":
        return int(inputs[1].size)
    if op == "Gather":
        data, indices = inputs[0], inputs[1]
        axis = node.attrs.get("axis", 0) % max(data.ndim, 1)
        return data.size // data.shape[axis] * indices.size if data.shape[axis] else 0
    return sum(a.size for a in inputs if a is not None)  # Identity, Cast, Concat, Unsqueeze


def evaluate(node: gs.Node, inputs: list[Any], opset: int) -> list[np.ndarray]:
    op, attrs, x = node.op, node.attrs, inputs[0]
    if op in BINARY:
        return [BINARY[op](x, inputs[1])]
    if op == "Identity":
        return [np.array(x, copy=True)]
    if op == "Cast":
        return [x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))]
    if op == "Concat":
        return [np.concatenate([a for a in inputs if a is not None], axis=attrs["axis"])]
    if op == "Gather":
        return [np.take(x, inputs[1], axis=attrs.get("axis", 0))]
    if op == "GatherElements":  # negative indices count from the end, as numpy's do
        indices = inputs[1].astype(np.int64)
        axis = attrs.get("axis", 0) % x.ndim  # the other axes: the indices' leading extent
        rows = tuple(slice(None) if a == axis else slice(0, n) for a, n in enumerate(indices.shape))
        return [np.take_along_axis(x[rows], indices, axis=axis)]
    axes = inputs[1] if opset >= 13 else attrs["axes"]  # Unsqueeze
    return [np.expand_dims(x, tuple(int(a) for a in np.asarray(axes).reshape(-1)))]
