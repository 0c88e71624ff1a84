"""EmulatedRunner's level segments: every float node in exactly one segment, layers at the
right levels, and a model with a skip connection, an integer layer's output as a graph
output and a float output of level 0 computed as onnxruntime computes the QDQ graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.core.emulated_runner import EmulatedRunner, exact_spread
from onnxpress.core.int8_layers import integer_layers
from onnxpress.core.targets import EXACT


def skip_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = {
        "s_x": np.array(0.05, np.float32),
        "z_x": np.array(0, np.int8),
        "w1": rng.integers(-60, 60, (16, 16)).astype(np.int8),
        "s_w1": np.array(0.01, np.float32),
        "z_w": np.array(0, np.int8),
        "s_r": np.array(0.03, np.float32),
        "z_r": np.array(0, np.uint8),
        "w2": rng.integers(-60, 60, (16, 16)).astype(np.int8),
        "s_w2": np.array(0.02, np.float32),
    }
    node = helper.make_node
    nodes = [
        node("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"]),
        node("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"]),
        node("DequantizeLinear", ["w1", "s_w1", "z_w"], ["w1d"]),
        node("MatMul", ["xd", "w1d"], ["h"], name="first"),
        node("Relu", ["h"], ["r"]),
        node("QuantizeLinear", ["r", "s_r", "z_r"], ["rq"]),
        node("DequantizeLinear", ["rq", "s_r", "z_r"], ["rd"]),
        node("DequantizeLinear", ["w2", "s_w2", "z_w"], ["w2d"]),
        node("MatMul", ["rd", "w2d"], ["g"], name="second"),
        node("Add", ["g", "h"], ["y"]),
        node("Neg", ["xd"], ["negated"]),
    ]
    graph = helper.make_graph(
        nodes,
        "skip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [4, 16])
            for name in ("y", "h", "negated")
        ],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_each_float_node_runs_in_one_segment_after_its_layers() -> None:
    model = skip_model()
    runner = EmulatedRunner(model, EXACT)
    assert [layer.name for layer in integer_layers(model)] == ["first", "second"]
    assert runner.levels == {"h": 1, "g": 2}
    placed = [node.output[0] for segment in runner._segments for node in segment.nodes]
    floats = [n.output[0] for n in model.graph.node if n.output[0] not in ("h", "g")]
    assert sorted(placed) == sorted(floats)  # each float node once, no layer among them
    by_output = {n.output[0]: s.level for s in runner._segments for n in s.nodes}
    assert by_output["negated"] == 0 and by_output["r"] == 1 and by_output["y"] == 2
    last = runner._segments[2]
    assert last.inputs == ["g", "h"] and last.outputs == ["y"]


def test_segments_compute_what_onnxruntime_computes() -> None:
    model = skip_model()
    feed = {"x": np.random.default_rng(0).normal(0, 1.5, (4, 16)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options)
    expected = session.run(None, feed)
    runner = EmulatedRunner(model, EXACT)
    first = runner(feed)
    again = runner(feed)  # the sessions built on the first call are reused
    step = 0.03 * 0.02 * 60  # one step of r through one weight of the second layer
    for want, got, repeat in zip(expected, first, again, strict=True):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, repeat)
        assert np.abs(got - want).max() <= step
    np.testing.assert_allclose(first[1], expected[1], rtol=1e-5, atol=1e-6)  # h: exact sums
    np.testing.assert_array_equal(first[2], expected[2])


def test_an_input_with_a_default_takes_the_fed_value_or_the_default() -> None:
    model = skip_model()
    graph = model.graph
    graph.node.append(helper.make_node("Add", ["y", "offset"], ["shifted"]))
    graph.input.append(helper.make_tensor_value_info("offset", TensorProto.FLOAT, [16]))
    graph.initializer.append(numpy_helper.from_array(np.full(16, 0.5, np.float32), "offset"))
    graph.output.append(helper.make_tensor_value_info("shifted", TensorProto.FLOAT, [4, 16]))
    runner = EmulatedRunner(model, EXACT)
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    default = runner({"x": x})
    np.testing.assert_array_equal(default[3], default[0] + np.float32(0.5))
    fed = runner({"x": x, "offset": np.full(16, -2.0, np.float32)})
    np.testing.assert_array_equal(fed[3], fed[0] - np.float32(2.0))


def test_exact_spread_is_onnxruntimes_distance_from_the_exact_sums() -> None:
    """qop-to-qdq's check allows this beyond its tolerance: a per-tensor int8 resnet18's
    QOperator and QDQ runs were one level apart at three rounding ties of its stem, as far
    as each is from the exact result, and the lossless check refused it."""
    model = skip_model()
    feeds = [
        {"x": np.random.default_rng(s).normal(0, 1.5, (4, 16)).astype(np.float32)} for s in (0, 1)
    ]
    exact = [EmulatedRunner(model, EXACT)(feed) for feed in feeds]
    assert exact_spread(model, feeds, exact) == 0.0
    moved = [[o.copy() for o in outs] for outs in exact]
    y = moved[1][0]
    y[2, 3] += 0.01 * np.abs(y).max()  # one output, one feed, 1% of its largest value
    assert exact_spread(model, feeds, moved) == pytest.approx(0.01, rel=1e-3)
    float_model = onnx.ModelProto()
    float_model.CopyFrom(model)  # no integer layers left: no spread
    del float_model.graph.node[:]
    float_model.graph.node.extend(
        [helper.make_node("Identity", ["x"], [n]) for n in ("y", "h", "negated")]
    )
    assert exact_spread(float_model, feeds, moved) == 0.0
