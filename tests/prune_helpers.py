"""Checks shared by the prune-channels tests: which channels a group removed, a copy of a
model with given weight slices zeroed, and output equality on onnxruntime."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress import PassResult
from onnxpress.core.verify import Runner, random_inputs


def removed(result: PassResult, group: str) -> np.ndarray:
    record = next(d for d in result.details if d.get("group") == group)
    return np.array(record["removed"], dtype=np.int64)


def masked(model: onnx.ModelProto, zeros: dict[str, tuple[int, Any]]) -> onnx.ModelProto:
    """A copy with initializer[index along axis] = 0 for each {name: (axis, index)}."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in zeros:
            axis, index = zeros[tensor.name]
            values = numpy_helper.to_array(tensor).copy()
            values[(slice(None),) * axis + (index,)] = 0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return out


def assert_same(expected: onnx.ModelProto, actual: onnx.ModelProto, tol: float = 1e-5) -> None:
    for feed in random_inputs(expected, seed=1):
        for ref, new in zip(Runner(expected)(feed), Runner(actual)(feed), strict=True):
            assert ref.shape == new.shape
            np.testing.assert_allclose(new, ref, rtol=0, atol=tol * max(np.abs(ref).max(), 1e-6))
