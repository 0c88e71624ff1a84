"""qdq graph preparation (``passes/qdq/prepare.py``): HardSwish split into Mul(x,
HardSigmoid(x)) exactly in float, and quantized as QLinearMul when asked."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnxpress.passes.qdq.prepare import decompose_hardswish, name_nodes
from qdq_helpers import View, fused, quantize, weights

node = helper.make_node


def conv_hardswish_conv(kit: SimpleNamespace) -> onnx.ModelProto:
    w1, w2 = weights(31, (6, 3, 3, 3), (4, 6, 1, 1))
    return kit.model(
        [
            node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            node("HardSwish", ["c1"], ["h"], name="hswish"),
            node("Conv", ["h", "W2"], ["c2"], name="conv2"),
            node("Relu", ["c2"], ["y"], name="relu"),
        ],
        {"x": [2, 3, 6, 6]},
        {"y": None},
        {"W1": 2 * w1, "W2": w2},
    )


def test_split_is_exact_in_float(kit: SimpleNamespace) -> None:
    model = conv_hardswish_conv(kit)
    graph = gs.import_onnx(model)
    assert decompose_hardswish(graph) == 1
    name_nodes(graph)
    split = gs.export_onnx(graph)
    onnx.checker.check_model(split, full_check=True)
    ops = [n.op_type for n in split.graph.node]
    assert ops == ["Conv", "HardSigmoid", "Mul", "Conv", "Relu"]
    feeds = {"x": np.random.default_rng(0).uniform(-3, 3, (2, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(
        kit.run_ort(split, feeds)["y"], kit.run_ort(model, feeds)["y"], rtol=1e-6, atol=1e-5
    )


def test_split_hardswish_runs_the_mul_on_int8(kit: SimpleNamespace, tmp_path: Path) -> None:
    model = conv_hardswish_conv(kit)
    plain, record = quantize(model)
    assert [n.op_type for n in plain.graph.node].count("HardSwish") == 1
    assert record.result.counts["hardswish_split"] == 0
    split, record = quantize(model, "qdq{split-hardswish=true}")
    assert record.result.counts["hardswish_split"] == 1
    view = View(split)
    mul = view.by_name["hswish"]
    assert mul.op_type == "Mul"
    assert [view.input_of("hswish", i).op_type for i in (0, 1)] == ["DequantizeLinear"] * 2
    assert view.ops_reading("c1") == ["QuantizeLinear"]  # the Conv output, read by both
    ops = fused(split, tmp_path)
    # conv2 is a float head (nothing quantized after it)
    assert ops["QLinearMul"] == 1 and ops["QLinearConv"] == 1 and ops["HardSigmoid"] == 1
    assert record.verification.value < 0.05
