"""core/precision.py: the coarsest float a model computes in, found in its weights, value
types, Casts and subgraphs, and the lossless tolerance that fits it."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.core.precision import (
    COMPUTE_ULPS,
    compute_dtype,
    compute_tolerance,
    lossless_tolerance,
)
from onnxpress.core.verify import compare_lossless


def model(nodes, inits=(), elem=TensorProto.FLOAT):  # type: ignore[no-untyped-def]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, [2])],
        [helper.make_tensor_value_info("y", elem, [2])],
        list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_float32_model_has_no_compute_dtype() -> None:
    plain = model([helper.make_node("Relu", ["x"], ["y"])])
    assert compute_dtype(plain) is None
    assert compute_tolerance(None) == 1e-5


def test_float16_found_in_a_cast_and_in_weights() -> None:
    cast = model(
        [
            helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT),
        ]
    )
    assert compute_dtype(cast) == np.float16
    weight = numpy_helper.from_array(np.ones(2, np.float16), "w")
    weighted = model([helper.make_node("Add", ["x", "w"], ["y"])], [weight], TensorProto.FLOAT16)
    assert compute_dtype(weighted) == np.float16
    eps = float(np.finfo(np.float16).eps)
    assert compute_tolerance(np.float16) == pytest.approx(COMPUTE_ULPS * eps)
    assert lossless_tolerance(np.dtype(np.float16)) < compute_tolerance(np.float16)


def test_bfloat16_in_a_subgraph_wins_over_float16() -> None:
    body = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["z"], to=TensorProto.BFLOAT16)],
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.BFLOAT16, [2])],
    )
    branch = model(
        [
            helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
            helper.make_node("If", ["c"], ["b"], then_branch=body, else_branch=body),
            helper.make_node("Identity", ["x"], ["y"]),
        ]
    )
    assert compute_dtype(branch) == np.dtype(ml_dtypes.bfloat16)


def test_compare_lossless_allows_the_compute_dtype_rounding_on_float32_outputs() -> None:
    ref = np.array([1.0, -2.0], np.float32)
    moved = ref * np.float32(1.002)  # 0.2%: two float16 ulps, far beyond float32's tolerance
    assert not compare_lossless(["y"], [[ref]], [[moved]]).ok
    cmp = compare_lossless(["y"], [[ref]], [[moved]], compute=np.dtype(np.float16))
    assert cmp.ok and cmp.limit == pytest.approx(compute_tolerance(np.float16))
    assert not compare_lossless(["y"], [[ref]], [[ref * np.float32(1.01)]], compute=np.float16).ok
