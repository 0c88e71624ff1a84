"""The verdict on a lossy pass (onnxpress.core.verdict): this CPU's onnxruntime run judges an
int8 model only where its arithmetic is a target's; otherwise the targets' emulations do, the
outcome shows the worst of them, and the host run is reported. End to end: full 8-bit weights
built for VNNI are kept on an AVX2 build machine (pretended here on a VNNI one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxpress
from onnxpress.core import manager, verdict
from onnxpress.core import targets as targets_module
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.errors import VerificationError
from onnxpress.core.int8_layers import integer_layers
from onnxpress.core.io import load_model
from onnxpress.core.manager import VerifyConfig
from onnxpress.core.pipeline import parse_pipeline
from onnxpress.core.report import VerifyOutcome
from onnxpress.core.targets import TARGETS
from onnxpress.core.verify import Comparison
from onnxpress.report.render import render_report

MODELS = Path(__file__).resolve().parents[2] / "models"
AVX2, VNNI, ARM = TARGETS["avx2"], TARGETS["avx512-vnni"], TARGETS["arm64"]


@pytest.fixture
def on_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this process runs on an AVX2 CPU without VNNI."""
    monkeypatch.setattr(targets_module, "host_target", lambda: AVX2)
    monkeypatch.setattr(verdict, "host_target", lambda: AVX2)


def nsr(value: float) -> Comparison:
    return Comparison("nsr", value, "y", 0.05)


def test_a_host_that_is_no_target_is_reported_not_judged(on_avx2: None) -> None:
    outcome = VerifyOutcome("numeric", "nsr", 0.3, 0.05, "y")
    judged = {"avx512-vnni": nsr(0.01), "arm64": nsr(0.02)}
    verdict.settle("qdq", outcome, nsr(0.3), judged, True, (VNNI, ARM), "")
    assert outcome.host_not_judged is not None
    assert outcome.host_not_judged["target"] == "avx2" and outcome.host_not_judged["value"] == 0.3
    assert (outcome.value, outcome.limit) == (0.02, 0.05)  # the worst target
    assert set(outcome.targets) == {"avx512-vnni", "arm64"}


def test_a_host_that_is_a_target_judges_and_is_named(on_avx2: None) -> None:
    outcome = VerifyOutcome("numeric", "nsr", 0.3, 0.05, "y")
    with pytest.raises(VerificationError, match=r"'qdq': output 'y' on this CPU \(avx2\)"):
        verdict.settle("qdq", outcome, nsr(0.3), {"avx2": nsr(0.01)}, True, (AVX2,), "")
    # a float model (no integer layers): every CPU computes it alike, this one judges
    with pytest.raises(VerificationError, match=r"'svd': output 'y' differs"):
        verdict.settle("svd", VerifyOutcome("numeric"), nsr(0.3), {}, False, (VNNI,), "")


def test_a_target_over_its_budget_fails_even_when_the_host_is_not_judged(on_avx2: None) -> None:
    judged = {"avx512-vnni": nsr(0.01), "arm64": nsr(float("nan"))}
    with pytest.raises(VerificationError, match=r"on arm64 \(its int8 arithmetic emulated\)"):
        verdict.settle("qdq", VerifyOutcome("numeric"), nsr(0.3), judged, True, (VNNI, ARM), "")


def test_vnni_weights_built_on_an_avx2_machine_stay_full_8_bit(on_avx2: None) -> None:
    """sr_photos with full 8-bit weights saturates AVX2's int16 pair sums (2.4 dB lost): built
    for avx512-vnni it is judged by the exact emulation, and no layer falls back to float."""
    model, report = onnxpress.optimize(
        MODELS / "sr_photos.onnx",
        "fold-constants,cleanup,qdq{saturation=off,method=mse}",
        calibration=MODELS / "data" / "sr_photos_calib.npz",
        targets=["avx512-vnni"],
    )
    qdq = report.passes[-1]
    assert qdq.result.counts.get("fallback_layers", 0) == 0
    host = qdq.verification.host_not_judged
    assert host is not None and host["target"] == "avx2" and host["metric"] == "nsr"
    assert set(qdq.verification.targets) == {"avx512-vnni"}
    assert qdq.verification.value == qdq.verification.targets["avx512-vnni"]["value"]
    peaks = [int(np.abs(layer.weight.value).max()) for layer in integer_layers(model)]
    assert peaks and max(peaks) == 127
    assert "qdq: this CPU (avx2) is not a target" in render_report(report)


def test_bisect_builds_and_judges_each_prefix_for_the_targets(
    on_avx2: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--bisect names no pass where the manager accepts the pipeline: its prefixes are built
    for the targets and judged as the manager judges (here by the VNNI emulation)."""
    seen: list[tuple[str, ...]] = []
    judge = manager.judge_targets

    def spy(*args: object) -> object:
        seen.append(tuple(t.name for t in args[-1]))  # type: ignore[attr-defined]
        return judge(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(manager, "judge_targets", spy)
    passes = parse_pipeline("fold-constants,cleanup,qdq{saturation=off,method=mse}")
    calibration = CalibrationData.from_path(MODELS / "data" / "sr_photos_calib.npz")
    model = load_model(MODELS / "sr_photos.onnx")
    assert manager.bisect(model, passes, VerifyConfig(), calibration, 0, (VNNI,)) is None
    assert seen and all(names == ("avx512-vnni",) for names in seen)
