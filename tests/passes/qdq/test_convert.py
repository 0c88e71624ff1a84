"""qdq conversion (``passes/qdq/convert.py``): a layer whose input's calibrated range is tiny
(its float output all bias, as in random-weight or dead-ReLU branches of real exports) keeps
an int32 bias that fits, by a coarser weight scale, instead of a clipped bias that collapsed
the output (torchvision's deeplabv3_mobilenet_v3_large head: rel-L2 1.0); no scale written is
zero or subnormal (a vanishing range gets scale 1, as a zero one does)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxpress.passes.qdq.convert import (
    BIAS_LIMIT,
    MIN_SCALE,
    QuantParams,
    activation_params,
    quantize_bias,
    quantize_weight,
)
from qdq_helpers import View, quantize, weights

from onnxpress.calibration.observers import Range


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


def test_a_vanishing_range_gets_scale_one_and_no_scale_is_subnormal() -> None:
    for symmetric in (False, True):
        for lo, hi in ((0.0, 0.0), (-1e-41, 1e-41), (0.0, 1e-40)):
            params = activation_params(Range(lo, hi), symmetric)
            assert float(params.scale) == 1.0 and int(params.zero_point) == 0
        kept = activation_params(Range(-1e-30, 1e-30), symmetric)
        assert MIN_SCALE <= float(kept.scale) < 1e-31  # a tiny but normal range is kept
    q, params = quantize_weight(np.full((3, 4), 1e-42, np.float32), 0)
    assert (params.scale == 1.0).all() and not q.any()
    q, params = quantize_weight(np.array([[1e-42, 0.5]], np.float32), None)
    assert float(params.scale) == np.float32(0.5 / 127) and q.tolist() == [[0, 127]]
    # scales of 1e-30 on both sides: their product, 1e-60, underflows float32
    weight = QuantParams(np.full(2, 1e-30, np.float32), np.zeros(2, np.int8), 0)
    bias, bias_params = quantize_bias(np.array([0.0, 1e-45], np.float32), np.float32(1e-30), weight)
    assert (bias_params.scale == np.float32(MIN_SCALE)).all() and bias.tolist() == [0, 0]


def test_a_dead_branch_quantizes_to_finite_scales_that_onnxruntime_runs(
    kit: SimpleNamespace,
) -> None:
    """A Relu whose output vanishes on every calibration batch (subnormal values, as in a
    random-init MobileViT) feeds a conv: its scale (the range / 255 underflows float32) and
    the conv's bias scale (input scale x weight scale) must be neither 0 nor subnormal."""
    (w,) = weights(5, (4, 8, 3, 3))
    model = kit.model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        ],
        {"x": [1, 8, 6, 6]},
        {"c": None},
        {"W": w, "B": np.linspace(-0.2, 0.3, 4).astype(np.float32)},
    )
    rng = np.random.default_rng(1)
    dead = [
        {"x": (np.abs(rng.standard_normal((1, 8, 6, 6))) * 1e-42).astype(np.float32)}
        for _ in range(4)
    ]
    spec = "qdq{method=minmax,bias-correction=false,recover=false}"
    result, _ = quantize(model, spec, calibration=dead, verify="off")
    scales = [
        numpy_helper.to_array(init)
        for init in result.graph.initializer
        if init.name.endswith("scale") or "scale" in init.name
    ]
    assert scales and all((s >= MIN_SCALE).all() and np.isfinite(s).all() for s in scales)
    out = ort.InferenceSession(result.SerializeToString()).run(None, dead[0])[0]
    expected = ort.InferenceSession(model.SerializeToString()).run(None, dead[0])[0]
    _, bias_scale, _ = View(result).dq("conv", 2)
    assert np.isfinite(out).all()  # the bias alone, within half an int32 step of it
    assert np.abs(out - expected).max() <= 0.5 * float(np.max(bias_scale)) * (1 + 1e-6)
