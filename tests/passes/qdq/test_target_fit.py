"""qdq target fit (``passes/qdq/target_fit.py``): a candidate is scored over all the scoring
batches and over the verifier's first ``MAX_CALIBRATION_BATCHES`` alone, the worse of the
two; layers are ranked on this CPU's onnxruntime unless a target's arithmetic makes the
error its own; the candidates of one run share their quantized weights."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnxpress.passes.qdq.recover import MetricInputs
from onnxpress.passes.qdq.saturation import Policy, apply, plan
from onnxpress.passes.qdq.target_fit import HOST_RANKING_SHARE, TargetEvaluator, task_fit
from qdq_helpers import View, batches, conv_model, quantize

from onnxpress.core.targets import PAIR_SATURATING, parse_targets
from onnxpress.core.verify import MAX_CALIBRATION_BATCHES


def _noisy_first_batches(noise: float) -> MetricInputs:
    rng = np.random.default_rng(0)
    count = 2 * MAX_CALIBRATION_BATCHES
    reference = [[rng.standard_normal((1, 3, 5)).astype(np.float32)] for _ in range(count)]
    outputs = [
        [ref[0] + (noise * rng.standard_normal(ref[0].shape) if i < count // 2 else 0)]
        for i, ref in enumerate(reference)
    ]
    return MetricInputs(onnx.ModelProto(), [{}] * count, outputs, reference, ["y"])


def test_the_verifiers_batches_alone_can_be_the_worse_score() -> None:
    inputs = _noisy_first_batches(0.06)  # nsr ~0.06 on the first half, 0 on the second
    half = MetricInputs(
        inputs.model,
        inputs.batches[:MAX_CALIBRATION_BATCHES],
        inputs.outputs[:MAX_CALIBRATION_BATCHES],
        inputs.reference[:MAX_CALIBRATION_BATCHES],
        inputs.output_names,
    )
    whole = MetricInputs(
        inputs.model,
        inputs.batches[:3],  # fewer batches than the verifier's: one span only
        inputs.outputs[:3],
        inputs.reference[:3],
        inputs.output_names,
    )
    assert task_fit(half) < -1.0  # over the nsr budget (0.05) on the verifier's batches
    assert task_fit(inputs) == task_fit(half)  # ... and so over it, though the mean is not
    pairs = zip(inputs.outputs, inputs.reference, strict=True)
    noise = np.sqrt(np.mean([np.mean((o[0] - r[0]) ** 2) for o, r in pairs]))
    over_all = noise / np.std(np.concatenate([r[0] for r in inputs.reference]))
    assert over_all < 0.05
    assert task_fit(whole) < -1.0


def test_ranking_runs_on_this_cpu_unless_a_target_adds_its_own_error() -> None:
    model = conv_model()
    evaluator = TargetEvaluator(model, batches(model, 2), parse_targets(["avx2", "host"]))
    assert evaluator.judges[0] is None and PAIR_SATURATING in evaluator.judges
    evaluator.worst = PAIR_SATURATING
    evaluator.drops = {None: 1.5, PAIR_SATURATING: 1.6}  # the quantization's own error
    assert evaluator.ranking().judges == [None]  # type: ignore[attr-defined]
    evaluator.drops = {None: 0.2, PAIR_SATURATING: 1.6}  # saturation on AVX2's kernels
    assert HOST_RANKING_SHARE * 1.6 > 0.2
    assert evaluator.ranking().judges == [PAIR_SATURATING]  # type: ignore[attr-defined]
    evaluator.worst = None
    assert evaluator.ranking().judges == [None]  # type: ignore[attr-defined]
    ranked = evaluator.ranking()
    drop, _ = ranked.drop(model)  # the float model itself: no drop
    assert drop == 0.0 and evaluator.drops == {None: 0.2, PAIR_SATURATING: 1.6}


def test_the_candidates_of_one_run_quantize_each_weight_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    convert = importlib.import_module("onnxpress.passes.qdq.convert")  # not qdq's convert()
    calls: list[tuple[int, ...]] = []
    original = convert.quantize_weight

    def counted(values: np.ndarray, axis: int | None, reduce_range: bool = False) -> Any:
        calls.append(values.shape)
        return original(values, axis, reduce_range)

    monkeypatch.setattr(convert, "quantize_weight", counted)
    model = conv_model()
    spec = "qdq{max-drop=0.0,metric=fidelity}"  # any int8 error is a drop: every candidate
    _, record = quantize(model, spec, calibration=batches(model, 4, seed=2), verify="off")
    fallback = next(d["fallback"] for d in record.result.details if "fallback" in d)
    assert fallback["evaluations"] > 3  # many candidates were built
    assert sorted(calls) == sorted([(8, 3, 3, 3), (12, 8, 3, 3), (12, 1, 3, 3), (5, 48)])


def _shared_bias_convs() -> onnx.ModelProto:
    """Four 3x3 convs of 16 channels reading one bias constant (as torch's exporter shares
    equal biases), each followed by Relu: u8 activations near 255 against wide weights put
    pairs at risk of AVX2's int16 saturation in every layer."""
    rng = np.random.default_rng(3)
    inits = [onnx.numpy_helper.from_array(np.full(16, 0.05, np.float32), "b")]
    nodes, x, channels = [], "x", 3
    for i in range(4):
        w = rng.normal(0, 0.5, (16, channels, 3, 3)).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        conv = onnx.helper.make_node(
            "Conv", [x, f"w{i}", "b"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"
        )
        nodes += [conv, onnx.helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, channels = f"r{i}", 16
    graph = onnx.helper.make_graph(
        nodes,
        "shared_bias",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, 16, 8, 8])],
        inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_remedies_find_their_layers_in_every_candidate() -> None:
    # The DequantizeLinears of a shared bias are numbered in graph order; a candidate that
    # keeps an earlier layer in float numbers them differently. Remedies planned on the fully
    # quantized graph are found by layer, not by those names (mobilevit's export failed the
    # default optimize with a KeyError here, and a bias could land in the wrong layer).
    model = _shared_bias_convs()
    calibration = batches(model, 2, seed=1, low=0, high=4)
    spec = "qdq{method=minmax,saturation=off,recover=false%s}"
    full, _ = quantize(model, spec % "", calibration=calibration, verify="off")
    candidate, _ = quantize(model, spec % ",exclude=conv0", calibration=calibration, verify="off")
    planned = plan(full, calibration, Policy(remedy="narrow"))
    assert [layer.name for layer, _, _ in planned][:3] == ["conv0", "conv1", "conv2"]
    graph = gs.import_onnx(candidate)
    assert apply(graph, planned) == len(planned) - 1  # conv0 is float there: skipped
    view = View(gs.export_onnx(graph))
    for layer, _, change in planned[1:]:
        weight, scale, _ = view.dq(layer.name, 1)
        bias, bias_scale, _ = view.dq(layer.name, 2)
        np.testing.assert_array_equal(weight, change.weight)
        np.testing.assert_array_equal(scale, change.scale)
        np.testing.assert_array_equal(bias, change.bias)
        np.testing.assert_array_equal(bias_scale, change.bias_scale)
