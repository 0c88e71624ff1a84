"""Saturation-safe int8: qdq's default output holds under AVX2's int16 pair sums, the default
verification catches the loss when the remedy is off, exact-arithmetic targets keep full 8-bit
weights, and fix-saturation repairs a model quantized by onnxruntime's own quantizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxpress.passes.qdq.saturation import reround
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import onnxpress
from onnxpress.analysis.saturation import assess, pairs_at_risk
from onnxpress.core.emulated_runner import EmulatedRunner
from onnxpress.core.errors import VerificationError
from onnxpress.core.int8_layers import integer_layers
from onnxpress.core.targets import EXACT, PAIR_SATURATING, TARGETS
from onnxpress.core.task_metric import task_score

MODELS = Path(__file__).resolve().parents[3] / "models"
DATA = MODELS / "data"


def eval_images(name: str, count: int = 300) -> np.ndarray:
    with np.load(DATA / f"{name}_eval.npz", allow_pickle=False) as data:
        images = data["images"][:count].astype(np.float32)
        divisor = float(data["divisor"]) if "divisor" in data else 1.0
    return (images / divisor).reshape(len(images), 1, *images.shape[-2:])


def test_reround_keeps_pairs_under_the_limit_with_the_least_change() -> None:
    w = np.array([[127, -100, 5], [120, -90, 127], [3, 4, 5]], np.int8)
    bound = np.array([255.0, 255.0, 200.0])
    fixed = reround(w, bound)
    assert not pairs_at_risk(fixed, bound).any()
    np.testing.assert_array_equal(fixed[2], w[2])  # the unpaired row cannot saturate
    assert abs(int(fixed[0, 0]) - int(fixed[1, 0])) <= 8  # the cut is shared, not one-sided
    assert (fixed[0, 2], fixed[1, 2]) == (3, 125)  # (5, 127): 2 units off each, not 4 off one


def test_default_qdq_holds_under_avx2_arithmetic() -> None:
    model, report = onnxpress.optimize(
        MODELS / "cnn_mnist.onnx", calibration=DATA / "cnn_mnist_calib.npz"
    )
    qdq = next(p for p in report.passes if p.name == "qdq")
    assert qdq.result.counts["layers_saturation_safe"] >= 1
    detail = next(d["saturation"] for d in qdq.result.details if "saturation" in d)
    assert detail["targets"] == ["avx2"] and all(
        layer["chosen"] in ("reround", "narrow", "u8") for layer in detail["layers"]
    )
    assert set(qdq.verification.targets) == {"avx2", "avx512-vnni", "arm64"}
    images = {"input": eval_images("cnn_mnist")}
    exact = EmulatedRunner(model, EXACT)(images)[0]
    avx2 = EmulatedRunner(model, PAIR_SATURATING)(images)[0]
    assert np.mean(exact.argmax(1) == avx2.argmax(1)) >= 0.997
    assert not any(r.at_risk for r in assess(model, [images]))


def _optimize(spec: str, verify: str = "numeric") -> tuple[onnx.ModelProto, dict]:
    model, report = onnxpress.optimize(
        MODELS / "cnn_mnist.onnx",
        f"fold-constants,fold-batchnorm,cleanup,{spec}",
        calibration=DATA / "cnn_mnist_calib.npz",
        verify=verify,
    )
    qdq = next(p for p in report.passes if p.name == "qdq")
    return model, next(d["saturation"] for d in qdq.result.details if "saturation" in d)


def test_u8_weights_keep_every_value_and_compute_exactly_on_avx2() -> None:
    # one calibration method for both: method=auto scores its candidates on this CPU's kernels
    # with the remedy off and on exact sums with it on, which differ on an AVX2 host
    full, skipped = _optimize("qdq{saturation=off,recover=false,method=mse}", "structure")
    assert "skipped" in skipped
    model, detail = _optimize("qdq{saturation=u8,recover=false,method=mse}")
    assert detail["layers"] and {layer["chosen"] for layer in detail["layers"]} == {"u8"}
    assert all(layer["weights_changed"] == 0 for layer in detail["layers"])
    widened = [layer for layer in integer_layers(model) if layer.weight.dtype == np.uint8]
    assert len(widened) == len(detail["layers"])
    before = {layer.name: layer.weight.value for layer in integer_layers(full)}
    for layer in widened:
        assert layer.weight.value is not None and np.all(layer.weight.zero_point == 128)
        codes = layer.weight.value.astype(np.int16) - 128
        np.testing.assert_array_equal(codes, before[layer.name])
    images = {"input": eval_images("cnn_mnist", 200)}
    exact = EmulatedRunner(model, EXACT)(images)[0]
    np.testing.assert_array_equal(EmulatedRunner(model, PAIR_SATURATING)(images)[0], exact)
    np.testing.assert_array_equal(exact, EmulatedRunner(full, EXACT)(images)[0])
    host = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    on_host = host.run(None, images)[0]  # within a requantization step (rounding ties)
    assert (
        np.abs(on_host - exact).max() <= 0.05
        and np.mean(on_host.argmax(1) == exact.argmax(1)) >= 0.995
    )
    assert not any(r.at_risk for r in assess(model, [images]))


def test_auto_takes_u8_where_the_fast_remedies_miss_the_tolerance() -> None:
    _, strict = _optimize("qdq{saturation-tolerance=0}")
    assert {layer["chosen"] for layer in strict["layers"]} == {"u8"}
    _, loose = _optimize("qdq{saturation-tolerance=1}")
    assert "u8" not in {layer["chosen"] for layer in loose["layers"]}
    for layer in loose["layers"]:  # the fast remedy kept is the closer one
        errors = layer["errors"]
        assert errors[layer["chosen"]] == min(errors["reround"], errors["narrow"])
        assert errors["u8"] == 0.0


def test_exact_targets_keep_full_8_bit_weights() -> None:
    model, report = onnxpress.optimize(
        MODELS / "cnn_mnist.onnx",
        calibration=DATA / "cnn_mnist_calib.npz",
        targets=["avx512-vnni", "arm64+dotprod"],
    )
    qdq = next(p for p in report.passes if p.name == "qdq")
    assert "layers_saturation_safe" not in qdq.result.counts
    peaks = [int(np.abs(layer.weight.value).max()) for layer in integer_layers(model)]
    assert peaks and max(peaks) == 127
    assert set(qdq.verification.targets) == {"avx512-vnni", "arm64+dotprod"}


def test_default_verification_catches_the_avx2_loss_without_the_remedy() -> None:
    """sr_photos loses about 2.4 dB on AVX2 with full 8-bit weights (30.5 vs 32.8 dB)."""
    with pytest.raises(
        VerificationError, match=r"'qdq'.* on (avx2 \(its int8 arithmetic|this CPU \(avx2\))"
    ):
        onnxpress.optimize(
            MODELS / "sr_photos.onnx",
            "fold-constants,cleanup,qdq{saturation=off,recover=false}",
            calibration=DATA / "sr_photos_calib.npz",
        )


class _Reader(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self.batches = iter([{"input": images[i : i + 32]} for i in range(0, len(images), 32)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def test_fix_saturation_repairs_onnxruntimes_own_qdq_model(tmp_path: Path) -> None:
    with np.load(DATA / "cnn_mnist_calib.npz", allow_pickle=False) as data:
        calib = data[next(iter(data.files))][:128].astype(np.float32)
    quantized = tmp_path / "ort.onnx"
    quantize_static(
        str(MODELS / "cnn_mnist.onnx"),
        str(quantized),
        _Reader(calib),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    foreign = onnx.load(str(quantized))
    risks_before = [r for r in assess(foreign, [{"input": calib[:64]}]) if r.at_risk]
    assert risks_before, "onnxruntime's full-range weights saturate on AVX2"
    repaired, report = onnxpress.optimize(
        foreign, "fix-saturation", [{"input": calib[:64]}], targets=["avx2"]
    )
    fix = report.passes[0]
    assert fix.result.counts["layers_saturation_safe"] >= len(risks_before)  # margin: 1.25x
    images = {"input": eval_images("cnn_mnist")}
    reference = EmulatedRunner(foreign, EXACT)(images)[0]
    before = EmulatedRunner(foreign, PAIR_SATURATING)(images)[0]
    after = EmulatedRunner(repaired, PAIR_SATURATING)(images)[0]
    assert task_score(reference, after).value < task_score(reference, before).value
    # untouched: activation scales and the graph's shape
    assert [n.op_type for n in repaired.graph.node] == [n.op_type for n in foreign.graph.node]


def test_calibration_is_scored_on_exact_sums_where_this_cpu_saturates_and_the_output_will_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On an AVX2 host, qdq's auto/refit/fallback candidates are scored under exact int32
    arithmetic unless the output is meant to run saturated (saturation=off for an AVX2 target)."""
    from onnxpress.passes.qdq import recover

    avx2, vnni = TARGETS["avx2"], TARGETS["avx512-vnni"]
    monkeypatch.setattr(recover, "host_target", lambda: avx2)
    assert recover.scoring_arithmetic((avx2, vnni), "auto") == EXACT
    assert recover.scoring_arithmetic((vnni,), "off") == EXACT
    assert recover.scoring_arithmetic((avx2,), "off") is None
    monkeypatch.setattr(recover, "host_target", lambda: vnni)
    assert recover.scoring_arithmetic((avx2, vnni), "auto") is None
    # the emulated scoring is the emulation: a saturating model scores apart under the two
    model, _ = _optimize("qdq{saturation=off,recover=false}", "structure")
    images = [{"input": eval_images("cnn_mnist", 100)}]
    float_model = onnx.load(MODELS / "cnn_mnist.onnx")
    exact = recover.Evaluator(float_model, images, recover.fidelity, EXACT)
    saturated = recover.Evaluator(float_model, images, recover.fidelity, PAIR_SATURATING)
    np.testing.assert_array_equal(
        exact.run(model)[0][0], EmulatedRunner(model, EXACT)(images[0])[0]
    )
    assert saturated.drop(model)[1] > 2 * exact.drop(model)[1]
