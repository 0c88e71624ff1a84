"""Parameter and MAC counting against hand-computed values."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxpress.core.stats import model_stats


def _model(
    nodes: list[onnx.NodeProto],
    inits: dict[str, tuple[int, ...]],
    x_shape: list[int | str],
    y_shape: list[int | str] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_macs_with_groups_and_stride() -> None:
    node = helper.make_node(
        "Conv", ["x", "W", "b"], ["y"], group=2, strides=[2, 2], pads=[1, 1, 1, 1]
    )
    model = _model([node], {"W": (8, 2, 3, 3), "b": (8,)}, ["n", 4, 10, 10])
    stats = model_stats(model)
    # output 1x8x5x5, each output sums 2 input channels x 3 x 3
    assert stats.macs_by_op == {"Conv": 8 * 5 * 5 * 2 * 9}
    assert stats.params == 8 * 2 * 9 + 8


def test_gemm_and_matmul_macs() -> None:
    gemm = helper.make_node("Gemm", ["x", "W"], ["h"], transB=1)
    matmul = helper.make_node("MatMul", ["h", "V"], ["y"])
    model = _model([gemm, matmul], {"W": (6, 5), "V": (6, 3)}, [4, 5])
    assert model_stats(model).macs_by_op == {"Gemm": 4 * 6 * 5, "MatMul": 4 * 3 * 6}


def test_gru_macs() -> None:
    node = helper.make_node("GRU", ["x", "W", "R"], ["", "y"], hidden_size=4)
    model = _model([node], {"W": (1, 12, 3), "R": (1, 12, 4)}, [7, 2, 3])
    assert model_stats(model).macs == 7 * 2 * 3 * 4 * (3 + 4)


def test_constant_nodes_count_as_params() -> None:
    const = helper.make_node(
        "Constant", [], ["c"], value=numpy_helper.from_array(np.ones((2, 3), np.float32))
    )
    add = helper.make_node("Add", ["x", "c"], ["y"])
    model = _model([const, add], {}, [2, 3])
    stats = model_stats(model)
    assert stats.params == 6 and stats.macs == 0
    assert stats.op_histogram == {"Constant": 1, "Add": 1}
