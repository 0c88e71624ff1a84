"""lower-conv-integer: ConvInteger, as onnxruntime's quantize_dynamic writes it, becomes
DequantizeLinear (scale 1) -> Conv -> Round -> Cast; the result is bit-identical on
onnxruntime, per-tensor and per-channel, and compile (which runs the pass) builds a model
that TVM's importer refused before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxpress.passes.lower_conv_integer import LowerConvInteger, LowerConvIntegerOptions

import onnxpress
from onnxpress.core.context import PassContext
from onnxpress.core.ir import to_graph

SHAPE = (1, 4, 10, 10)


def conv_net() -> onnx.ModelProto:
    """Conv 4 -> 8 (3x3, padded) -> Relu -> Conv 8 -> 6 (3x3, stride 2)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (6, 8, 3, 3)).astype(np.float32), "w2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="c1"),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["y"], strides=[2, 2], name="c2"),
        ],
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def dynamic(folder: Path, per_channel: bool) -> onnx.ModelProto:
    """conv_net quantized by onnxruntime's quantize_dynamic (ConvInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = folder / "float.onnx", folder / "dynamic.onnx"
    onnx.save(conv_net(), source)
    quantize_dynamic(source, target, per_channel=per_channel, weight_type=QuantType.QInt8)
    return onnx.load(target)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_conv_integer_becomes_a_float_conv_with_identical_outputs(
    tmp_path: Path, per_channel: bool
) -> None:
    model = dynamic(tmp_path, per_channel)
    assert [n.op_type for n in model.graph.node].count("ConvInteger") == 2
    lowered, report = onnxpress.optimize(model, passes="lower-conv-integer")  # verified
    assert report.passes[0].result.counts == {"ConvInteger": 2}
    ops = [n.op_type for n in lowered.graph.node]
    assert "ConvInteger" not in ops and ops.count("Conv") == ops.count("Round") == 2
    x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    np.testing.assert_array_equal(run(lowered, x), run(model, x))


def test_zero_points_of_the_wrong_size_are_refused(tmp_path: Path) -> None:
    model = dynamic(tmp_path, per_channel=False)
    for init in model.graph.initializer:
        if init.data_type == TensorProto.INT8 and len(init.dims) == 0:  # a weight zero point
            init.CopyFrom(numpy_helper.from_array(np.zeros(3, np.int8), init.name))
    ctx = PassContext(template=model, original=model)
    result = LowerConvInteger(LowerConvIntegerOptions()).run(to_graph(model), ctx)
    reasons = {r.reason for r in result.refusals}
    assert reasons == {"the weight's zero point is neither a scalar nor one per output channel"}


def test_compile_takes_a_dynamically_quantized_conv(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    from onnxpress.backends.tvm.backend import compile_model
    from onnxpress.backends.tvm.runtime import CompiledModel
    from onnxpress.backends.tvm.targets import parse_target

    model = dynamic(tmp_path, per_channel=True)
    result = compile_model(model, parse_target("x86"), tmp_path / "lib")  # checked at 1e-4
    assert result.report is not None
    (lowering,) = [p for p in result.report.passes if p.name == "lower-conv-integer"]
    assert lowering.result.counts == {"ConvInteger": 2}
    x = np.random.default_rng(2).normal(size=SHAPE).astype(np.float32)
    expected = run(model, x)
    got = CompiledModel(result.library)(x)[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
