"""onnxpress.analysis.refit.conv_patches: im2col rows times the flattened weight equal ONNX Conv."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxpress.analysis.refit import conv_patches


@pytest.mark.parametrize(
    ("strides", "dilations", "pads", "auto_pad"),
    [
        ([1, 1], [1, 1], [0, 0, 0, 0], "NOTSET"),
        ([2, 1], [1, 2], [1, 0, 2, 1], "NOTSET"),
        ([2, 2], [1, 1], [0, 0, 0, 0], "SAME_UPPER"),
        ([2, 2], [1, 1], [0, 0, 0, 0], "SAME_LOWER"),
        ([1, 2], [2, 1], [0, 0, 0, 0], "VALID"),
    ],
)
def test_patches_reproduce_conv(
    strides: list[int], dilations: list[int], pads: list[int], auto_pad: str
) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    attrs: dict[str, object] = {"strides": strides, "dilations": dilations, "auto_pad": auto_pad}
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)],
        "conv",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x, "w": w})[0]
    rows = conv_patches(x, [3, 2], strides, dilations, pads, auto_pad)
    assert rows.shape == (2 * y.shape[2] * y.shape[3], 3 * 3 * 2)
    got = (rows @ w.reshape(4, -1).T).reshape(2, y.shape[2], y.shape[3], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)
