"""cross-layer-equalization: per-channel ranges of each pair end equal, outputs stay the same
(the pass is declared lossless, so the manager checks 1e-5), refusals carry reasons, and
per-tensor int8 weights get better after it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxpress.passes.equalize import CrossLayerEqualization

import onnxpress
from onnxpress import VerifyConfig

node = helper.make_node


def uneven(seed: int, shape: tuple[int, ...], axis: int, rising: bool = True) -> np.ndarray:
    """Random weights whose channels along ``axis`` span three orders of magnitude."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    spread = np.logspace(-1.5, 1.5, shape[axis])[:: 1 if rising else -1]
    view = [1] * len(shape)
    view[axis] = -1
    return (w * spread.reshape(view)).astype(np.float32)


def conv_pair(kit: SimpleNamespace, group: int = 1) -> onnx.ModelProto:
    w1 = uneven(0, (8, 3, 3, 3), 0)
    w2 = uneven(1, (6 * (group if group > 1 else 1), 8 // group, 3, 3), 1, rising=False)
    b1 = np.linspace(-1, 1, 8).astype(np.float32)
    return kit.model(
        [
            node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            node("Relu", ["c1"], ["r1"], name="relu"),
            node("Conv", ["r1", "W2"], ["y"], name="conv2", group=group),
        ],
        {"x": [1, 3, 6, 6]},
        {"y": None},
        {"W1": w1, "b1": b1, "W2": w2},
    )


def ranges(kit: SimpleNamespace, model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    w1, w2 = kit.initializer(model, "W1"), kit.initializer(model, "W2")
    return np.abs(w1).reshape(8, -1).max(1), np.abs(w2).max(axis=(0, 2, 3))


def test_conv_pair_is_equalized_and_lossless(kit: SimpleNamespace) -> None:
    model = conv_pair(kit)
    result, report = onnxpress.optimize(model, passes="cross-layer-equalization")
    record = report.passes[0]
    assert record.result.counts["pairs_equalized"] == 1
    assert record.verification.value is not None and record.verification.value < 1e-5
    r1, r2 = ranges(kit, result)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # both ranges are sqrt(r1 * r2) now
    before1, before2 = ranges(kit, model)
    np.testing.assert_allclose(r1, np.sqrt(before1 * before2), rtol=1e-5)
    kit.same_outputs(model, result)


@pytest.mark.parametrize("group", [2, 8])
def test_grouped_and_depthwise_second_conv(kit: SimpleNamespace, group: int) -> None:
    model = conv_pair(kit, group)
    result, _ = kit.run_pass(CrossLayerEqualization(), model)
    kit.same_outputs(model, result)
    assert not np.allclose(kit.initializer(result, "W2"), kit.initializer(model, "W2"))


def test_dense_chain_of_three_converges(kit: SimpleNamespace) -> None:
    w1, w2 = uneven(2, (16, 8), 0), uneven(3, (12, 16), 1)  # Gemm transB=1: [out, in]
    w3 = uneven(4, (12, 4), 0)  # MatMul: [in, out]
    model = kit.model(
        [
            node("Gemm", ["x", "W1"], ["h1"], name="fc1", transB=1),
            node("Relu", ["h1"], ["r1"], name="relu1"),
            node("Gemm", ["r1", "W2"], ["h2"], name="fc2", transB=1),
            node("LeakyRelu", ["h2"], ["r2"], name="relu2", alpha=0.1),
            node("MatMul", ["r2", "W3"], ["y"], name="fc3"),
        ],
        {"x": [5, 8]},
        {"y": None},
        {"W1": w1, "W2": w2, "W3": w3},
    )
    result, report = onnxpress.optimize(model, passes="cross-layer-equalization")
    assert report.passes[0].result.counts["pairs_equalized"] == 2
    n1, n2, n3 = (kit.initializer(result, n) for n in ("W1", "W2", "W3"))
    np.testing.assert_allclose(np.abs(n1).max(1), np.abs(n2).max(0), rtol=1e-2)
    np.testing.assert_allclose(np.abs(n2).max(1), np.abs(n3).max(1), rtol=1e-2)
    kit.same_outputs(model, result)


def test_refusals_name_the_blocker(kit: SimpleNamespace) -> None:
    w = uneven(5, (4, 4, 1, 1), 0)
    bn = {f"bn_{k}": np.ones(4, np.float32) for k in ("scale", "bias", "mean", "var")}
    model = kit.model(
        [
            node("Conv", ["x", "W1"], ["c1"], name="conv1"),
            node("BatchNormalization", ["c1", *bn], ["n1"], name="bn"),
            node("Relu", ["n1"], ["r1"], name="relu1"),
            node("Conv", ["r1", "W2"], ["c2"], name="conv2"),
            node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
            node("Conv", ["r2", "W3"], ["c3"], name="conv3"),
            node("Relu", ["c3"], ["r3"], name="relu3"),
            node("Conv", ["r3", "W4"], ["c4"], name="conv4"),
            node("Add", ["c4", "r3"], ["y"], name="residual"),
        ],
        {"x": [1, 4, 3, 3]},
        {"y": None},
        {
            "W1": w,
            "W2": w.copy(),
            "W3": w.copy(),
            "W4": w.copy(),
            **bn,
            "lo": np.array(0, np.float32),
            "hi": np.array(6, np.float32),
        },
    )
    result, outcome = kit.run_pass(CrossLayerEqualization(), model)
    reasons = {r.node: r.reason for r in outcome.refusals}
    assert "fold-batchnorm" in reasons["conv1"]
    assert "Clip is not positively homogeneous" in reasons["conv2"]
    assert "several readers" in reasons["conv3"]
    assert outcome.counts == {}
    kit.same_outputs(model, result)


def test_equalization_helps_per_tensor_weights(kit: SimpleNamespace) -> None:
    model = conv_pair(kit)
    calib = [
        {"x": np.random.default_rng(i).standard_normal((1, 3, 6, 6)).astype(np.float32)}
        for i in range(4)
    ]
    spec, lenient = "qdq{per-channel=false,method=minmax,recover=false}", VerifyConfig(budget=10.0)
    _, plain = onnxpress.optimize(model, passes=spec, calibration=calib, verify=lenient)
    _, equalized = onnxpress.optimize(
        model, passes=f"cross-layer-equalization,{spec}", calibration=calib, verify=lenient
    )
    error_plain = plain.passes[-1].verification.value
    error_equalized = equalized.passes[-1].verification.value
    assert error_equalized < 0.5 * error_plain
