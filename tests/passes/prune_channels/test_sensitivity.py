"""prune-channels' fast sensitivity curves agree with pruning and running the whole model per
trial, compare a Softmax head on its logits, and are cached on disk by model and data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxpress.passes.prune_channels import PruneChannels, PruneChannelsOptions
from onnxpress.passes.prune_channels.data import sensitivity_curves
from onnxpress.passes.prune_channels.importance import weight_norms
from onnxpress.passes.prune_channels.sensitivity import (
    cache_path,
    compared_outputs,
    fast_sensitivity_curves,
    load_curves,
)

import onnxpress
from onnxpress import PassContext
from onnxpress.analysis.channels.groups import ChannelGroups
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
