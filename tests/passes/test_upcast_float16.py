"""upcast-float16: a float16 (or bfloat16) model computes in float32 inside, its interface
unchanged. Checked against the same net built in float32 (it must lie closer to it than
onnxruntime's float16 run does), on a model that casts to float16 inside a float32
interface, on a subgraph, and through compile, which refused float16 models before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxpress.passes.upcast_float16 import upcast

import onnxpress
from onnxpress.core.precision import COMPUTE_ULPS, compute_dtype

SHAPE = (1, 8, 12, 12)


def conv_net(dtype: type = np.float16) -> onnx.ModelProto:
    """Three 3x3 convs (8 -> 16 -> 16 -> 8 channels) with Relu, a residual Add of a float16
    Constant node and a ConstantOfShape, all in ``dtype``."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits, nodes, x, cin = [], [], "x", SHAPE[1]
    for i, cout in enumerate((16, 16, 8)):
        w = rng.normal(0, (2.0 / (9 * cin)) ** 0.5, (cout, cin, 3, 3)).astype(dtype)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(dtype), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        x, cin = f"r{i}", cout
    bias = numpy_helper.from_array(np.full((1, 8, 1, 1), 0.25, dtype), "bias")
    nodes += [
        helper.make_node("Constant", [], ["k"], value=bias),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.ones(1, dtype))
        ),
        helper.make_node("Add", [x, "k"], ["s"]),
        helper.make_node("Add", ["s", "ones"], ["t"]),
        helper.make_node("Add", ["t", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", elem, list(SHAPE))],
        [helper.make_tensor_value_info("y", elem, list(SHAPE))],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def test_float16_net_computes_in_float32_inside() -> None:
    model = conv_net()
    result, report = onnxpress.optimize(model, passes="upcast-float16")  # verified
    counts = report.passes[0].result.counts
    assert counts == {"inputs": 1, "outputs": 1, "constants": 8}
    assert [vi.type.tensor_type.elem_type for vi in result.graph.input] == [TensorProto.FLOAT16]
    assert [vi.type.tensor_type.elem_type for vi in result.graph.output] == [TensorProto.FLOAT16]
    first, last = result.graph.node[0], result.graph.node[-1]
    assert first.op_type == last.op_type == "Cast"
    assert first.input[0] == "x" and last.output[0] == "y"
    assert {t.data_type for t in result.graph.initializer} == {TensorProto.FLOAT}
    x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float16)
    exact = run(conv_net(np.float32), x.astype(np.float32)).astype(np.float64)
    ours, theirs = run(result, x), run(model, x)
    assert ours.dtype == np.float16
    scale = np.abs(exact).max()
    ours_error = np.abs(ours - exact).max() / scale
    theirs_error = np.abs(theirs - exact).max() / scale
    assert ours_error <= theirs_error and ours_error <= 2 * np.finfo(np.float16).eps


def test_float16_inside_a_float32_interface() -> None:
    # a float16 export that kept float32 inputs and outputs: Cast to float16 at the entry,
    # to float32 at the exit; judged at float16's rounding though its outputs are float32
    inner = conv_net()
    nodes = [
        helper.make_node("Cast", ["x32"], ["x"], to=TensorProto.FLOAT16),
        *inner.graph.node,
        helper.make_node("Cast", ["y"], ["y32"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "kept",
        [helper.make_tensor_value_info("x32", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y32", TensorProto.FLOAT, list(SHAPE))],
        list(inner.graph.initializer),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert compute_dtype(model) == np.float16
    result, report = onnxpress.optimize(model, passes="upcast-float16")
    assert report.passes[0].result.counts == {"constants": 8, "casts": 1}
    eps = float(np.finfo(np.float16).eps)
    assert report.passes[0].verification.limit == pytest.approx(COMPUTE_ULPS * eps)
    assert compute_dtype(result) is None
    assert result.graph.node[0].attribute[0].i == TensorProto.FLOAT


def test_subgraphs_and_bfloat16_are_upcast() -> None:
    then = helper.make_graph(
        [helper.make_node("Add", ["x", "half"], ["z"])],
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.BFLOAT16, [2])],
        [helper.make_tensor("half", TensorProto.BFLOAT16, [2], [0.5, 1.5])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["w"])],
        "else",
        [],
        [helper.make_tensor_value_info("w", TensorProto.BFLOAT16, [2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "branch",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    counts = upcast(model)
    onnx.checker.check_model(model, full_check=True)
    assert counts == {"inputs": 1, "outputs": 1, "constants": 1}
    branch = model.graph.node[1].attribute
    then_out = next(a.g for a in branch if a.name == "then_branch")
    assert then_out.initializer[0].data_type == TensorProto.FLOAT
    assert numpy_helper.to_array(then_out.initializer[0]).tolist() == [0.5, 1.5]
    assert then_out.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.node[0].input == ["x"] and model.graph.node[1].input == ["c"]
    assert model.graph.node[-1].attribute[0].i == TensorProto.BFLOAT16


def test_a_float32_model_is_left_alone() -> None:
    model = conv_net(np.float32)
    before = model.SerializeToString()
    assert upcast(model) == {} and model.SerializeToString() == before


def test_compile_takes_a_float16_model(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    from onnxpress.backends.tvm.backend import compile_model
    from onnxpress.backends.tvm.runtime import CompiledModel
    from onnxpress.backends.tvm.targets import parse_target

    model = conv_net()
    result = compile_model(model, parse_target("x86"), tmp_path / "lib")
    assert result.report is not None
    (step,) = [p for p in result.report.passes if p.name == "upcast-float16"]
    assert step.result.counts["constants"] == 8
    x = np.random.default_rng(2).normal(size=SHAPE).astype(np.float16)
    got = np.asarray(CompiledModel(result.library)(x)[0])
    assert got.dtype == np.float16
    exact = run(conv_net(np.float32), x.astype(np.float32)).astype(np.float64)
    assert np.abs(got - exact).max() <= 2 * np.finfo(np.float16).eps * np.abs(exact).max()


def test_default_pipeline_quantizes_a_float16_model() -> None:
    # qdq refused every layer of a float16 model ("needs a float activation input") before
    # the default pipeline upcast it first
    model = conv_net()
    rng = np.random.default_rng(4)
    batches = [{"x": rng.normal(size=SHAPE).astype(np.float16)} for _ in range(4)]
    result, report = onnxpress.optimize(model, calibration=batches)
    assert [p.name for p in report.passes][:2] == ["upcast-float16", "fold-constants"]
    (qdq,) = [p for p in report.passes if p.name == "qdq"]
    assert qdq.result.counts["nodes_quantized"] >= 3
    assert [vi.type.tensor_type.elem_type for vi in result.graph.output] == [TensorProto.FLOAT16]
    assert run(result, batches[0]["x"]).dtype == np.float16
