"""prune-channels' fast sensitivity curves agree with pruning and running the whole model per
trial, compare a Softmax head on its logits (a sequence head by the CTC-level change of its
per-step distributions and greedy classes), and are cached on disk by model and data; the
allocation stays within the measured ratios while that reaches the target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxpress.passes.prune_channels import PruneChannels, PruneChannelsOptions
from onnxpress.passes.prune_channels.data import (
    _relative_error,
    sensitivity_curves,
    sequence_error,
)
from onnxpress.passes.prune_channels.importance import sensitivity_counts, weight_norms
from onnxpress.passes.prune_channels.sensitivity import (
    cache_path,
    compared_outputs,
    fast_sensitivity_curves,
    load_curves,
    sequence_axes,
)

import onnxpress
from onnxpress import PassContext
from onnxpress.analysis.channels.groups import ChannelGroup, ChannelGroups
from onnxpress.analysis.channels.layout import node_key
from onnxpress.core.ir import to_graph

MODELS = Path(__file__).resolve().parents[3] / "models"


def setting(name: str) -> tuple[onnx.ModelProto, ChannelGroups, list, dict, list]:
    model = onnx.load(str(MODELS / f"{name}.onnx"))
    graph = to_graph(model)
    groups = PassContext(template=model, original=model).analysis(ChannelGroups, graph)
    nodes = {node_key(n): n for n in graph.nodes}
    candidates = [g for g in groups.groups if g.producers and not g.refusals and g.size > 1]
    scores = {g.index: weight_norms(groups, g, nodes, 1) for g in candidates}
    with np.load(MODELS / "data" / f"{name}_calib.npz") as archive:
        batch = {"input": archive["input"][:16]}
    return model, groups, candidates, scores, [batch]


def test_fast_curves_match_whole_model_trials() -> None:
    damping = 1e-3
    model, groups, candidates, scores, batches = setting("cnn_mnist")
    slow = sensitivity_curves(groups, candidates, scores, model, batches, damping)
    fast = fast_sensitivity_curves(groups, candidates, scores, model, batches, damping)
    assert set(fast) == set(slow) and len(fast) >= 3
    for index in slow:
        assert fast[index][0] == pytest.approx(slow[index][0])
        # same trials; the refit reads rows thinned for the full input width (a few % apart)
        np.testing.assert_allclose(fast[index][1], slow[index][1], rtol=0.1, atol=1e-4)


def test_softmax_outputs_are_compared_on_logits() -> None:
    model = onnx.load(str(MODELS / "ctc_lines.onnx"))
    softmax = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    assert softmax.op_type == "Softmax"
    assert compared_outputs(model) == [softmax.input[0]]
    assert sequence_axes(model) == [2]
    assert sequence_axes(onnx.load(str(MODELS / "cnn_mnist.onnx"))) == [None]


def test_sequence_error_is_the_change_of_distributions_and_greedy_classes() -> None:
    rng = np.random.default_rng(0)
    logits = 3.0 * rng.normal(size=(4, 10, 5))
    shifted = logits + rng.normal(size=(4, 10, 1))  # every step's distribution unchanged
    assert sequence_error([logits], [shifted], 2) == pytest.approx(0.0, abs=1e-12)
    assert _relative_error([[logits]], [[shifted]]) > 0.1  # what the logits' L2 would say
    flipped = logits.copy()
    best = flipped[0, 0].argmax()
    flipped[0, 0, best] = flipped[0, 0].min() - 1.0  # one of 40 steps reads another class
    error = sequence_error([logits], [flipped], 2)
    assert error > 1 / 40
    nudged = logits.copy()
    nudged[0, 0, best] -= 0.1  # the same step, still the same class: a small change
    assert 0.0 < sequence_error([logits], [nudged], 2) < error / 10


class _Macs:
    """MACs of two layers as their groups' kept fractions times their base cost."""

    def __init__(self, sizes: dict[int, int], base: dict[int, float]) -> None:
        self.sizes, self.base = sizes, base
        self.total = sum(base.values())

    def macs(self, counts: dict[int, int]) -> float:
        return sum(self.base[g] * counts[g] / self.sizes[g] for g in self.base)


def test_allocation_stays_within_measured_ratios_while_it_can() -> None:
    groups = [ChannelGroup(i, f"g{i}", 8, (), (), (), (), ()) for i in range(2)]
    macs = _Macs({0: 8, 1: 8}, {0: 100.0, 1: 100.0})
    # group 0 looks free up to 75 % and would be taken to 1 channel on the extrapolation
    curves = {0: ([0.25, 0.5, 0.75], [0.0, 0.0, 0.001]), 1: ([0.25, 0.5, 0.75], [0.1, 0.2, 0.4])}
    order: list[tuple[int, float]] = []
    counts = sensitivity_counts(groups, macs, 0.6 * macs.total, curves, 1, 1, order=order)  # type: ignore[arg-type]
    assert counts == {0: 2, 1: 7}  # 25 + 87.5 MACs of 200
    assert [index for index, _ in order[:6]] == [0] * 6 and order[-1][1] <= 0.6 * macs.total
    counts = sensitivity_counts(groups, macs, 0.1 * macs.total, curves, 1, 1)  # type: ignore[arg-type]
    assert counts[0] + counts[1] <= 2


def test_curves_are_cached_by_model_and_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONNXPRESS_CACHE_DIR", str(tmp_path))
    model = onnx.load(str(MODELS / "cnn_mnist.onnx"))
    calibration = MODELS / "data" / "cnn_mnist_calib.npz"
    spec = "prune-channels{macs=0.7,batches=1}"
    first, report = onnxpress.optimize(model, spec, calibration=calibration, verify="structure")
    stored = sorted((tmp_path / "sensitivity").glob("*.json"))
    assert len(stored) == 1
    assert {"kind": "sensitivity", "cached": False} in report.passes[0].result.details
    again, report = onnxpress.optimize(model, spec, calibration=calibration, verify="structure")
    assert {"kind": "sensitivity", "cached": True} in report.passes[0].result.details
    assert again.SerializeToString() == first.SerializeToString()
    stored[0].write_text("{not json")  # a damaged entry is measured again, not trusted
    assert load_curves(stored[0].stem) is None
    monkeypatch.setenv("ONNXPRESS_CACHE_DIR", "off")
    assert cache_path("x") is None
    assert PruneChannels(PruneChannelsOptions(macs=0.7)).options.macs == 0.7
