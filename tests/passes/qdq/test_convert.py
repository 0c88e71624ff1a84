"""qdq conversion (``passes/qdq/convert.py``): a layer whose input's calibrated range is tiny
(its float output all bias, as in random-weight or dead-ReLU branches of real exports) keeps
an int32 bias that fits, by a coarser weight scale, instead of a clipped bias that collapsed
the output (torchvision's deeplabv3_mobilenet_v3_large head: rel-L2 1.0)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
from onnx import helper
from onnxpress.passes.qdq.convert import BIAS_LIMIT
from qdq_helpers import View, quantize, weights


def _head(kit: SimpleNamespace) -> tuple[object, list[dict[str, np.ndarray]]]:
    (w,) = weights(3, (5, 8, 1, 1))
    bias = np.linspace(-0.2, 0.3, 5).astype(np.float32)
    model = kit.model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "W", "B"], ["c"], name="head"),
            helper.make_node("Relu", ["c"], ["y"], name="out"),
        ],
        {"x": [1, 8, 6, 6]},
        {"y": None},
        {"W": w, "B": bias},
    )
    rng = np.random.default_rng(0)
    tiny = [{"x": (rng.standard_normal((1, 8, 6, 6)) * 1e-9).astype(np.float32)} for _ in range(4)]
    return model, tiny


def test_a_bias_that_would_clip_gets_a_coarser_weight_scale(kit: SimpleNamespace) -> None:
    model, calibration = _head(kit)
    spec = "qdq{method=minmax,bias-correction=false,recover=false}"
    result, record = quantize(model, spec, calibration=calibration, verify="off")
    assert record.result.counts["biases_int32"] == 1
    view = View(result)
    bias, bias_scale, _ = view.dq("head", 2)
    _, weight_scale, _ = view.dq("head", 1)
    assert np.abs(bias).max() <= BIAS_LIMIT
    x_scale, _ = view.activation_scale("head", 0)
    assert x_scale < 1e-10  # the input's own range, kept
    np.testing.assert_allclose(bias_scale, x_scale * weight_scale, rtol=1e-6)
    float_out = ort.InferenceSession(model.SerializeToString()).run(None, calibration[0])[0]
    int8 = ort.InferenceSession(result.SerializeToString())  # fused: integer kernels
    int8_out = int8.run(None, calibration[0])[0]
    rel = np.linalg.norm(int8_out - float_out) / np.linalg.norm(float_out)
    assert rel < 1e-3  # was 1.0: the clipped bias
