"""qdq calibration and accuracy recovery: flat calibration memory, every range method within
budget, bias correction, accuracy-aware fallback (built-in and Python metrics), option text,
and the bundled CNN's held-out accuracy."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from onnxpress.passes.qdq import MetricInputs, register_metric
from onnxpress.passes.qdq.calibrate import observe
from onnxpress.passes.qdq.recover import Evaluator, FallbackResult, greedy_fallback
from qdq_helpers import View, batches, conv_relu_model, quantize, weights

import onnxpress
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.errors import PipelineError
from onnxpress.core.pipeline import parse_pipeline

node = helper.make_node
MODELS = Path(__file__).resolve().parents[3] / "models"


def test_calibration_memory_is_flat(kit: SimpleNamespace) -> None:
    model = conv_relu_model(kit)

    def stream(count: int) -> CalibrationData:
        def source() -> Iterator[dict[str, np.ndarray]]:
            rng = np.random.default_rng(count)
            for _ in range(count):
                yield {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}

        return CalibrationData(source, count, "generator")

    peaks, sizes = [], []
    for count in (100, 1000):
        tracemalloc.start()
        obs = observe(model, ["x", "r1", "y"], {"x": 1}, stream(count), histogram_bins=2048)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        sizes.append(obs.nbytes)
        assert obs.batches == count and obs.ranges["x"].total == count * 192  # type: ignore[union-attr]
    assert sizes[0] == sizes[1]  # the observers' state does not depend on the batch count
    # 10x the batches, about the same peak, and far below the activations seen (3 KB a batch)
    assert peaks[1] < 2 * peaks[0] and peaks[1] < 0.1 * 1000 * 3072


def outlier_mlp(kit: SimpleNamespace) -> onnx.ModelProto:
    """fc1 makes channel 0 huge; fc2 ignores it, but a per-tensor uint8 range fitted to it
    flattens every other channel of fc2's input to zero: fc2 is the one sensitive layer."""
    w1, w2, w3 = weights(9, (8, 16), (16, 16), (16, 4))
    w1[:, 0] *= 1000.0
    w2[0, :] = 0.0
    return kit.model(
        [
            node("Gemm", ["x", "W1"], ["h1"], name="fc1"),
            node("Relu", ["h1"], ["r1"], name="relu1"),
            node("Gemm", ["r1", "W2"], ["h2"], name="fc2"),
            node("Relu", ["h2"], ["r2"], name="relu2"),
            node("Gemm", ["r2", "W3"], ["y"], name="fc3"),
        ],
        {"x": [32, 8]},
        {"y": None},
        {"W1": w1, "W2": w2, "W3": w3},
    )


def test_fallback_keeps_the_sensitive_layer_in_float(kit: SimpleNamespace) -> None:
    model = outlier_mlp(kit)
    calib = batches(model, count=4, seed=1)
    plain, record = quantize(
        model, "qdq{method=minmax,recover=false}", calibration=calib, verify="off"
    )
    assert View(plain).input_of("fc2", 1) is not None  # fully quantized, and bad:
    result, record = quantize(model, "qdq{method=minmax,max-drop=0.02}", calibration=calib)
    assert record.result.counts["fallback_layers"] == 1
    assert View(result).input_of("fc2", 1) is None  # fc2 alone went back to float
    assert View(result).input_of("fc1", 1).op_type == "DequantizeLinear"  # type: ignore[union-attr]
    reasons = {r.node: r.reason for r in record.result.refusals}
    assert "accuracy fallback" in reasons["fc2"] and "fc1" not in reasons
    summary = next(d["fallback"] for d in record.result.details if "fallback" in d)
    assert summary["initial_drop"] > 0.2 and summary["within_budget"]


def test_default_recovers_by_itself_when_the_task_budget_is_missed(kit: SimpleNamespace) -> None:
    """Without max-drop, a model over its task budget on any target gets the same fallback,
    judged by the task metric on this CPU and every target's emulated arithmetic."""
    model = outlier_mlp(kit)
    calib = batches(model, count=4, seed=1)
    result, record = quantize(model, "qdq{method=minmax}", calibration=calib)
    assert record.result.counts["fallback_layers"] >= 1
    assert View(result).input_of("fc2", 1) is None
    summary = next(d["fallback"] for d in record.result.details if "fallback" in d)
    assert summary["within_budget"] and summary["metric"].startswith("task")
    assert all(t["value"] <= t["limit"] for t in record.verification.targets.values())


def test_auto_keeps_the_setting_closest_to_float(kit: SimpleNamespace) -> None:
    model = conv_relu_model(kit)
    calib = batches(model, count=4, seed=1)
    _, record = quantize(model, calibration=calib)  # qdq defaults: method=auto
    tried = next(d["auto"] for d in record.result.details if "auto" in d)
    chosen = next(d["calibration"] for d in record.result.details if "calibration" in d)
    assert {(t["method"], t["bias_correction"]) for t in tried} == {
        (m, c) for m in ("mse", "minmax", "percentile") for c in (True, False)
    }
    assert [t["error"] for t in tried] == sorted(t["error"] for t in tried)
    assert (chosen["method"], chosen["bias_correction"]) == (
        tried[0]["method"],
        tried[0]["bias_correction"],
    )
    assert chosen["requested"] == "auto" and 0 < tried[0]["error"] < tried[-1]["error"]
    assert record.verification.value < 0.1
    _, plain = quantize(model, "qdq{bias-correction=false}", calibration=calib)
    tried = next(d["auto"] for d in plain.result.details if "auto" in d)
    assert len(tried) == 3 and not any(t["bias_correction"] for t in tried)


def test_a_registered_python_metric_drives_fallback(kit: SimpleNamespace) -> None:
    calls: list[int] = []

    def never_good_enough(inputs: MetricInputs) -> float:
        calls.append(len(inputs.batches))
        return 1.0 if inputs.outputs is inputs.reference else 0.0  # only float is good

    register_metric("test-never-good", never_good_enough)
    with pytest.raises(PipelineError, match="already registered"):
        register_metric("test-never-good", lambda inputs: 0.0)
    _, record = quantize(conv_relu_model(kit), "qdq{max-drop=0.5,metric=test-never-good}")
    assert calls and record.result.counts["fallback_layers"] == 2  # both convs gave up
    with pytest.raises(PipelineError, match="unknown metric 'nope'"):
        quantize(conv_relu_model(kit), "qdq{max-drop=0.5,metric=nope}")


def test_bias_correction_removes_the_mean_shift(kit: SimpleNamespace) -> None:
    rng = np.random.default_rng(10)
    w = np.abs(rng.normal(0.02, 0.01, (6, 4, 3, 3))).astype(np.float32)
    w[:, 0, 0, 0] = 4.0  # per-tensor scale 4/127: most weights round to 0 or 1 step
    model = kit.model(
        [node("Conv", ["x", "W"], ["y"], name="conv")], {"x": [2, 4, 6, 6]}, {"y": None}, {"W": w}
    )
    calib = batches(model, count=4, low=0.0, high=1.0)

    def mean_shift(spec: str) -> float:
        result, _ = quantize(model, spec, calibration=calib)
        shift = sum(
            (kit.run_ort(result, feeds)["y"] - kit.run_ort(model, feeds)["y"]).mean(axis=(0, 2, 3))
            for feeds in calib
        )
        return float(np.max(np.abs(shift)))

    before = mean_shift("qdq{per-channel=false,method=minmax,bias-correction=false}")
    after = mean_shift("qdq{per-channel=false,method=minmax}")  # on by default
    assert after < 0.2 * before


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_method_stays_within_budget(kit: SimpleNamespace, method: str) -> None:
    _, record = quantize(conv_relu_model(kit), f"qdq{{method={method}}}")
    calib = next(d["calibration"] for d in record.result.details if "calibration" in d)
    assert calib["method"] == method and calib["batches"] == 4
    assert record.verification.value < 0.1


def test_options_text_round_trips() -> None:
    (qdq,) = parse_pipeline(
        'qdq{method=entropy,bias-correction=false,max-drop=0.01,exclude=["re:.*attn.*",Softmax]}'
    )
    assert qdq.spec() == (
        "qdq{method=entropy,bias-correction=false,max-drop=0.01,exclude=[re:.*attn.*,Softmax]}"
    )
    with pytest.raises(PipelineError, match="percentile"):
        parse_pipeline("qdq{percentile=20}")


@pytest.mark.skipif(not (MODELS / "cnn_mnist.onnx").exists(), reason="bundled models missing")
def test_cnn_mnist_keeps_held_out_accuracy() -> None:
    calib = MODELS / "data" / "cnn_mnist_calib.npz"
    result, _ = onnxpress.optimize(
        MODELS / "cnn_mnist.onnx", "fold-constants,fold-batchnorm,cleanup,qdq", calib
    )
    data = np.load(MODELS / "data" / "cnn_mnist_eval.npz")
    images = (data["images"].astype(np.float32) / data["divisor"]).reshape(-1, 1, 28, 28)

    def accuracy(model: onnx.ModelProto) -> float:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return float(np.mean(session.run(None, {"input": images})[0].argmax(1) == data["labels"]))

    base = accuracy(onnx.load(str(MODELS / "cnn_mnist.onnx")))
    assert accuracy(result) >= base - 0.01 and base > 0.95


def test_agreement_is_top1_only_for_batch_by_class_outputs() -> None:
    from onnxpress.passes.qdq.recover import agreement

    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.1, 0.0]])
    flipped = logits.copy()
    flipped[3] = [0.2, 0.1, 0.0]  # one of four predictions changes
    args = (onnx.ModelProto(), [{}], [[flipped]], [[logits]], ["logits"])
    assert agreement(MetricInputs(*args)) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    detections = rng.uniform(0, 64, (2, 14, 64))  # [batch, 4 + classes, cells]
    noisy = detections + rng.normal(0, 0.64, detections.shape)
    args = (onnx.ModelProto(), [{}], [[noisy]], [[detections]], ["detections"])
    error = np.linalg.norm(noisy - detections) / np.linalg.norm(detections)
    assert agreement(MetricInputs(*args)) == pytest.approx(1 - error)


class _Additive(Evaluator):
    """A judge over stand-in 'models' (the excluded names): each layer adds its own drop."""

    def __init__(self, costs: dict[str, float]) -> None:
        self.costs, self.evaluations = costs, 0

    def drop(self, model: onnx.ModelProto) -> tuple[float, float]:
        self.evaluations += 1
        excluded: frozenset[str] = model  # type: ignore[assignment]
        return sum(v for k, v in self.costs.items() if k not in excluded), 0.0


def _fallback(costs: dict[str, float], budget: float) -> tuple[_Additive, FallbackResult]:
    judge = _Additive(costs)
    candidates = {name: "Conv" for name in costs}
    return judge, greedy_fallback(candidates, lambda excluded: excluded, judge, budget)  # type: ignore[arg-type,return-value]


def test_fallback_finds_the_shortest_prefix_in_logarithmic_evaluations() -> None:
    costs = {f"layer{i:02d}": 0.01 * (i % 7) for i in range(60)}
    costs.update(big1=0.5, big2=0.4, big3=0.3)
    judge, result = _fallback(costs, 0.2)
    assert result.excluded[:3] == ["big1", "big2", "big3"] and result.within_budget
    # the three big ones and the costliest small layers until the rest is within 0.2
    rest = sorted((v for k, v in costs.items() if not k.startswith("big")), reverse=True)
    shortest = next(n for n in range(len(rest)) if sum(rest[n:]) <= 0.2)
    assert len(result.excluded) == 3 + shortest
    assert result.final_drop <= 0.2 < sum(rest[shortest - 1 :])
    ranking = len(costs) + 1
    assert result.evaluations == judge.evaluations <= ranking + 2 * 7  # not one per layer
    assert [step.drop_after is not None for step in result.steps].count(True) < 14
    hopeless = greedy_fallback(
        {"a": "Conv"},
        lambda excluded: excluded,
        _Additive({"a": 0.1, "b": 1.0}),
        0.2,  # type: ignore[arg-type,return-value]
    )
    assert hopeless.excluded == ["a"] and not hopeless.within_budget


def test_fallback_ranks_a_deep_model_by_groups_first() -> None:
    """300 layers: groups are scored, then the layers of the most sensitive groups alone;
    the sensitive layers still lead, at about a fifth of the runs of one per layer."""
    from onnxpress.passes.qdq.recover import RANK_GROUPS, REFINED_LAYERS

    costs = {f"layer{i:03d}": 0.001 for i in range(300)}
    costs.update(layer017=0.5, layer018=0.3, layer250=0.4)
    judge, result = _fallback(costs, 0.2)
    assert result.excluded[:3] == ["layer017", "layer250", "layer018"] and result.within_budget
    assert all(step.group == 1 for step in result.steps[:3])
    one_fewer = frozenset(result.excluded[:-1])
    assert result.final_drop <= 0.2 < _Additive(costs).drop(one_fewer)[0]  # shortest prefix
    assert result.evaluations == judge.evaluations <= 1 + RANK_GROUPS + REFINED_LAYERS + 2 * 9
    unrefined = [step for step in result.steps if step.group > 1]
    assert unrefined and all(step.group == 10 for step in unrefined)
