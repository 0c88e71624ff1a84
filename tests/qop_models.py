"""Int8 models in the QOperator format, made by onnxruntime's own quantizer
(``quantize_static(quant_format=QOperator)``) from a small float conv net
(tests/passes/test_qop_to_qdq.py and tests/backends/tvm/test_qop_models.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPE = (1, 3, 12, 12)


def float_net(opset: int = 17) -> onnx.ModelProto:
    """conv -> relu -> max pool -> conv + skip (Add) -> global pool -> flatten -> Gemm."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.normal(size=shape) * 0.3).astype(np.float32), name)

    node = helper.make_node
    graph = helper.make_graph(
        [
            node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            node("Relu", ["c1"], ["r1"], name="relu1"),
            node("MaxPool", ["r1"], ["m"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="pool1"),
            node("Conv", ["m", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
            node("Add", ["c2", "m"], ["a"], name="skip"),
            node("GlobalAveragePool", ["a"], ["p"], name="pool"),
            node("Flatten", ["p"], ["f"], name="flatten"),
            node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
        ],
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [
            init("w1", 8, 3, 3, 3),
            init("b1", 8),
            init("w2", 8, 8, 3, 3),
            init("b2", 8),
            init("wf", 5, 8),
            init("bf", 5),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def qoperator_net(folder: Path, opset: int = 17, per_channel: bool = True) -> onnx.ModelProto:
    """float_net quantized by onnxruntime: QLinearConv, QLinearAdd, QLinearGlobalAveragePool
    and QGemm, a MaxPool on the 8-bit bytes, int8 weights (per channel by default)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    rng = np.random.default_rng(1)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = 4

        def get_next(self) -> dict[str, np.ndarray] | None:
            self.left -= 1
            return None if self.left < 0 else {"x": rng.normal(size=SHAPE).astype(np.float32)}

    source, target = folder / "float.onnx", folder / "qop.onnx"
    onnx.save(float_net(opset), source)
    quantize_static(
        source, target, Batches(), quant_format=QuantFormat.QOperator, per_channel=per_channel
    )
    return onnx.load(target)
