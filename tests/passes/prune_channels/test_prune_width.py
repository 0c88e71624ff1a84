"""prune-channels on a transformer's residual width: the embedding, every residual Add, the
LayerNorms and the projections reading and writing the stream, pruned as one group.

The numerics are checked on onnxruntime against a reference built independently from the
original initializers (every weight sliced at the kept channels, each LayerNorm then
normalizing over the kept channels only), and the least-squares refit is checked to restore
the outputs that the recomputed LayerNorm statistics move."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from width_graphs import (
    CONSUMERS,
    NORMS,
    PRODUCERS,
    WIDTH,
    inputs,
    node_weights,
    run_pass,
    transformer_model,
)

from onnxpress import PassContext, PassResult
from onnxpress.analysis.channels.groups import ChannelGroups
from onnxpress.core.ir import to_graph
from onnxpress.core.verify import Runner

MODELS = Path(__file__).resolve().parents[3] / "models"
# initializer name -> axis along which it carries the width
WIDTH_AXES = {
    "emb.w": 1, "emb.b": 0, "pos": 1, "head.w": 1,
    **{f"{n}.gamma": 0 for n in NORMS}, **{f"{n}.beta": 0 for n in NORMS},
    **{f"b{i}.{p}.w": 0 for i in range(2) for p in ("q", "k", "v", "fc1")},
    **{f"b{i}.{p}.w": 1 for i in range(2) for p in ("out", "fc2")},
    **{f"b{i}.{p}.b": 0 for i in range(2) for p in ("out", "fc2")},
}  # fmt: skip


def width_record(result: PassResult) -> dict:
    return next(d for d in result.details if d.get("kind") == "group" and d["group"] == "emb")


def reference(model: onnx.ModelProto, kept: np.ndarray) -> onnx.ModelProto:
    """The original graph with every width-carrying initializer sliced at ``kept``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    for tensor in out.graph.initializer:
        if tensor.name in WIDTH_AXES:
            values = np.take(numpy_helper.to_array(tensor), kept, axis=WIDTH_AXES[tensor.name])
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return out


def relative_error(expected: onnx.ModelProto, actual: onnx.ModelProto, x: np.ndarray) -> float:
    ref, new = Runner(expected)({"x": x})[0], Runner(actual)({"x": x})[0]
    return float(np.linalg.norm(new - ref) / np.linalg.norm(ref))


def test_width_is_one_group_with_its_layer_norms() -> None:
    model = transformer_model()
    ctx = PassContext(template=model, original=model)
    graph = to_graph(model)
    groups = ctx.analysis(ChannelGroups, graph)
    width = next(g for g in groups.groups if "emb" in g.producers)
    names = {n.outputs[0].name: n.name for n in graph.nodes}
    assert width.prunable and width.size == WIDTH
    assert {names[k] for k in width.producers} == set(PRODUCERS)
    assert {names[k] for k in width.consumers} == set(CONSUMERS)
    assert {names[k] for k in width.norms} == set(NORMS)


def test_width_pruning_matches_layer_norm_over_kept_channels() -> None:
    model = transformer_model()
    pruned, result = run_pass(model, "prune-channels{ratio=0.5,include=emb}")
    record = width_record(result)
    assert record["width"] and record["kept"] == WIDTH // 2
    assert result.counts["groups_pruned"] == 1  # the FFN neurons are not included
    w = node_weights(pruned)
    assert w["emb"][0].shape == (6, 4) and w["emb.bias"][0].shape == (4,)
    assert w["emb.pos"][0].shape == (5, 4) and w["y"][0].shape == (3, 4)
    assert all([p.shape for p in w[n]] == [(4,), (4,)] for n in NORMS)
    assert w["b0.q"][0].shape == (4, 8) and w["b1.fc1"][0].shape == (4, 16)
    assert w["b0.out"][0].shape == (8, 4) and w["b1.fc2"][0].shape == (16, 4)
    kept = np.setdiff1d(np.arange(WIDTH), record["removed"])
    expected = reference(model, kept)
    x = inputs(16, seed=3)
    got, want = Runner(pruned)({"x": x})[0], Runner(expected)({"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def silenced(model: onnx.ModelProto, removed: np.ndarray) -> onnx.ModelProto:
    """A copy whose stream carries zeros at ``removed``: every weight and bias writing those
    channels (embedding, positions, output projections, FFN down projections) and γ, β."""
    writers = ("emb.w", "b0.out.w", "b0.fc2.w", "b1.out.w", "b1.fc2.w")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in WIDTH_AXES and (not tensor.name.endswith(".w") or tensor.name in writers):
            values = numpy_helper.to_array(tensor).copy()
            np.moveaxis(values, WIDTH_AXES[tensor.name], 0)[removed] = 0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return out


def test_full_statistics_are_exact_when_the_removed_channels_are_zero() -> None:
    """norm-stats=full: each LayerNorm still divides by the original width (Pad / Slice), so
    pruning channels that carry zeros changes nothing; norm-stats=kept does change them."""
    removed = np.array([1, 4, 6])
    silent = silenced(transformer_model(), removed)
    spec = "prune-channels{ratio=0.375,include=emb,criterion=l2,norm-stats=%s}"
    full, result = run_pass(silent, spec % "full")
    assert width_record(result)["removed"] == removed.tolist()
    ops = [n.op_type for n in full.graph.node]
    assert ops.count("Pad") == ops.count("Slice") == len(NORMS)
    assert node_weights(full)["b0.q"][0].shape == (5, 8)  # the projections read 5 rows
    assert node_weights(full)["b0.ln1"][0].shape == (8,)  # γ zero on the 3 padded channels
    x = inputs(64, seed=5)
    want, got = Runner(silent)({"x": x})[0], Runner(full)({"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    kept, _ = run_pass(silent, spec % "kept")
    assert relative_error(silent, kept, x) > 0.05


def test_refit_restores_what_the_kept_statistics_move() -> None:
    model = transformer_model()
    calibration = [{"x": inputs(64, seed=s)} for s in range(4)]
    spec = "prune-channels{ratio=0.375,include=emb,reconstruct=%s}"
    plain, _ = run_pass(model, spec % "false")
    refit, result = run_pass(model, spec % "true", calibration)
    assert result.counts["layers_refit"] == len(CONSUMERS)
    held_out = inputs(256, seed=9)
    before, after = relative_error(model, plain, held_out), relative_error(model, refit, held_out)
    assert after < 0.75 * before


@pytest.mark.parametrize("criterion", ["activation", "reconstruction", "bn-gamma"])
def test_width_criteria(criterion: str) -> None:
    """Data-aware scores (mean |x| after each LayerNorm, ThiNet on the consumers) and γ."""
    model = transformer_model()
    calibration = [{"x": inputs(32, seed=s)} for s in range(2)]
    _, result = run_pass(model, f"prune-channels{{ratio=0.25,criterion={criterion}}}", calibration)
    assert width_record(result)["kept"] == 6


def test_refusals_name_the_layer_norm() -> None:
    spanning = transformer_model(final_axis=1)
    _, result = run_pass(spanning, "prune-channels{ratio=0.5}")
    reasons = {r.node: r.reason for r in result.refusals}
    assert "LayerNormalization 'final_ln': normalizes over axes 1..2" in reasons["emb"]
    assert "not the channel axis 2 alone" in reasons["emb"]


def test_transformer_mnist_width_and_ffn_at_0_6_macs() -> None:
    """The bundled transformer: the width joins the FFN neurons under one MACs budget."""
    data = np.load(MODELS / "data" / "transformer_mnist_eval.npz")
    calib = np.load(MODELS / "data" / "transformer_mnist_calib.npz")["input"]
    model = onnx.load(str(MODELS / "transformer_mnist.onnx"))
    pruned, result = run_pass(model, "prune-channels{macs=0.6}", [{"input": calib}])
    width = next(d for d in result.details if d.get("kind") == "group" and d["width"])
    assert width["group"] == "/embed/MatMul" and 16 <= width["kept"] < 64
    images = (data["images"][:500] / data["divisor"]).astype(np.float32)
    scores = Runner(pruned)({"input": images})[0]
    accuracy = float(np.mean(scores.argmax(1) == data["labels"][:500]))
    assert accuracy >= 0.93  # the FFN-only cut at 0.6: 0.918 on the 1000 digits
