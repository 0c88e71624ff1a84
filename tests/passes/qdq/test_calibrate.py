"""qdq bias correction (``passes/qdq/calibrate.py``) on a bias that several layers share (an
exporter's dedupe of equal biases): each layer gets its own corrected copy, and the result is
the one the same model with unshared biases gets."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
from onnx import helper
from qdq_helpers import View, batches, quantize, weights

node = helper.make_node


def two_convs(kit: SimpleNamespace, shared: bool) -> onnx.ModelProto:
    w1, w2 = weights(7, (4, 3, 3, 3), (4, 4, 3, 3))
    bias = np.zeros(4, np.float32)  # zero-initialised biases: equal, so exporters share them
    return kit.model(
        [
            node("Conv", ["x", "W1", "B"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            node("Relu", ["c1"], ["r1"], name="relu1"),
            node("Conv", ["r1", "W2", "B" if shared else "B2"], ["c2"], name="conv2"),
            node("Relu", ["c2"], ["y"], name="relu2"),
        ],
        {"x": [2, 3, 6, 6]},
        {"y": None},
        {"W1": 2 * w1, "W2": w2, "B": bias, **({} if shared else {"B2": bias.copy()})},
    )


def test_a_shared_bias_is_corrected_per_layer(kit: SimpleNamespace) -> None:
    spec = "qdq{method=minmax,bias-correction=true}"
    calibration = batches(two_convs(kit, True), 4, seed=3, low=0.0, high=2.0)  # E[x] != 0
    shared, record = quantize(two_convs(kit, True), spec, calibration=calibration)
    apart, _ = quantize(two_convs(kit, False), spec, calibration=calibration)
    assert record.result.counts["biases_corrected"] == 2
    view = View(shared)
    first, second = (view.dq(name, 2)[0] for name in ("conv1", "conv2"))
    assert view.by_name["conv1"].input[2] != view.by_name["conv2"].input[2]
    assert np.any(first != 0) and np.any(second != 0)  # both corrected, independently
    apart_view = View(apart)
    np.testing.assert_array_equal(first, apart_view.dq("conv1", 2)[0])
    np.testing.assert_array_equal(second, apart_view.dq("conv2", 2)[0])
    feed = calibration[0]
    np.testing.assert_array_equal(kit.run_ort(shared, feed)["y"], kit.run_ort(apart, feed)["y"])
