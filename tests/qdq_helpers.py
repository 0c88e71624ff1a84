"""Helpers for the qdq tests: calibration batches, a verified qdq run, structure lookups on
the result and the op histogram after onnxruntime's QDQ fusions, and a small conv net for the int8 lowering tests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxpress

node = helper.make_node


def batches(
    model: onnx.ModelProto, count: int = 4, seed: int = 0, low: float = -1.0, high: float = 1.0
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        feed = {}
        for vi in model.graph.input:
            shape = [d.dim_value or 4 for d in vi.type.tensor_type.shape.dim]
            feed[vi.name] = rng.uniform(low, high, shape).astype(np.float32)
        out.append(feed)
    return out


def quantize(model: onnx.ModelProto, spec: str = "qdq", **kw: Any) -> tuple[onnx.ModelProto, Any]:
    """Run the pipeline with numeric verification on; return the model and qdq's record."""
    calib = kw.pop("calibration", None) or batches(model)
    result, report = onnxpress.optimize(model, passes=spec, calibration=calib, **kw)
    return result, report.passes[-1]


class View:
    """Producer/consumer lookups on a model, for structure assertions."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.by_name = {n.name: n for n in model.graph.node}

    def ops_reading(self, tensor: str) -> list[str]:
        return [n.op_type for n in self.readers.get(tensor, [])]

    def input_of(self, node_name: str, index: int) -> onnx.NodeProto | None:
        return self.producer.get(self.by_name[node_name].input[index])

    def dq(self, node_name: str, index: int) -> tuple[np.ndarray, np.ndarray, int | None]:
        """(quantized values, scale, axis) of the DequantizeLinear feeding an input."""
        dq = self.input_of(node_name, index)
        assert dq is not None and dq.op_type == "DequantizeLinear", (node_name, index)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
        return self.inits[dq.input[0]], self.inits[dq.input[1]], axis

    def activation_scale(self, node_name: str, index: int) -> tuple[float, int]:
        dq = self.input_of(node_name, index)
        assert dq is not None and dq.op_type == "DequantizeLinear"
        q = self.producer[dq.input[0]]
        assert q.op_type == "QuantizeLinear"
        return float(self.inits[q.input[1]]), int(self.inits[q.input[2]])


def fused(model: onnx.ModelProto, tmp_path: Path) -> Counter[str]:
    """Op histogram after onnxruntime's graph optimizations (its QDQ fusions)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node)


def weights(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 0.5).astype(np.float32) for s in shapes]


def conv_relu_model(kit: SimpleNamespace) -> onnx.ModelProto:
    w1, b1, w2 = weights(0, (4, 3, 3, 3), (4,), (5, 4, 1, 1))
    return kit.model(
        [
            node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            node("Relu", ["c1"], ["r1"], name="relu1"),
            node("Conv", ["r1", "W2"], ["y"], name="conv2"),
        ],
        {"x": ["N", 3, 8, 8]},
        {"y": None},
        {"W1": w1, "b1": b1, "W2": w2},
    )


def _f32(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def conv_model() -> onnx.ModelProto:
    """Conv(pad) -> Relu -> Conv(stride 2) -> Relu -> depthwise Conv -> MaxPool -> Gemm(transB)."""
    rng = np.random.default_rng(0)
    inits = [
        _f32("w1", rng.normal(0, 0.3, (8, 3, 3, 3))),
        _f32("b1", rng.normal(0, 0.1, 8)),
        _f32("w2", rng.normal(0, 0.2, (12, 8, 3, 3))),
        _f32("w3", rng.normal(0, 0.3, (12, 1, 3, 3))),
        _f32("wf", rng.normal(0, 0.2, (5, 12 * 2 * 2))),
        _f32("bf", rng.normal(0, 0.1, 5)),
        numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
    ]
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        node("Relu", ["c1"], ["r1"]),
        node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        node("Relu", ["c2"], ["r2"]),
        node("Conv", ["r2", "w3"], ["c3"], pads=[1, 1, 1, 1], group=12, name="dw"),
        node("MaxPool", ["c3"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Reshape", ["p", "flat"], ["f"]),
        node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def tie_model() -> onnx.ModelProto:
    """y = DequantizeLinear(QuantizeLinear(x)) at scale 0.25, zero point 128, x [1, 12]."""
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "ties",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])],
        [
            numpy_helper.from_array(np.array(0.25, np.float32), "s"),
            numpy_helper.from_array(np.array(128, np.uint8), "z"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_pointwise_convs() -> onnx.ModelProto:
    """Conv 1x1 (8 -> 16) -> Relu -> Conv 1x1 (16 -> 8) on 6 x 6: two integer layers in a row."""
    rng = np.random.default_rng(4)
    w1 = rng.normal(0, 0.3, (16, 8, 1, 1)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 16, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["y"], name="c2"),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
