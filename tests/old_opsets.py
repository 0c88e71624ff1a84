"""Models in old opsets, as exported years ago (tests/passes/test_upgrade_opset.py and
tests/backends/tvm/test_old_opsets.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def upsample_model(
    opset: int, mode: str = "nearest", factors: tuple[float, float] = (2.0, 2.0)
) -> onnx.ModelProto:
    """Conv -> Upsample (scales an attribute at opset 7-8, an input at 9; Resize at 10) -> Relu."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    scales = [1.0, 1.0, *factors]
    size = [1, 4, int(5 * factors[0]), int(6 * factors[1])]
    if opset >= 9:  # Resize-10 has Upsample-9's inputs and coordinates
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
        op = "Resize" if opset == 10 else "Upsample"
        upsample = helper.make_node(op, ["c", "scales"], ["u"], mode=mode)
    else:
        upsample = helper.make_node("Upsample", ["c"], ["u"], mode=mode, scales=scales)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            upsample,
            helper.make_node("Relu", ["u"], ["y"]),
        ],
        f"upsample{opset}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, size)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 4  # initializers need not be graph inputs from IR 4
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])
