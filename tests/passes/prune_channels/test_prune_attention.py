"""``prune-channels`` on multi-head attention in every exported form (``attention_graphs``):
the equivalence check (a head, or a head dimension, zeroed beforehand is removed and the
outputs stay exact on onnxruntime), the exact structure after the pass (q/k/v/o weights,
head Reshape shapes, fused-op attributes), masked-head importance, the MAC accounting of
the attention products, and the refusal reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from attention_graphs import FORMS, HEAD_DIM, HEADS, SEQ, D, attention_model
from onnx import helper, numpy_helper
from onnxpress.passes.prune_channels.heads import site_kept
from onnxpress.passes.prune_channels.rewrite import Pruner

import onnxpress
from onnxpress import PassContext
from onnxpress.analysis.channels.groups import ChannelGroups
from onnxpress.core.ir import to_graph, to_model
from onnxpress.core.verify import Runner


def calibration(seed: int = 1) -> onnxpress.CalibrationData:
    rng = np.random.default_rng(seed)
    return onnxpress.CalibrationData.from_batches(
        [{"x": rng.standard_normal((16, SEQ, D)).astype(np.float32)} for _ in range(2)]
    )


def assert_exact(original: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    x = np.random.default_rng(7).standard_normal((3, SEQ, D)).astype(np.float32)
    expected, actual = Runner(original)({"x": x})[0], Runner(pruned)({"x": x})[0]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def weight(model: onnx.ModelProto, node: str, index: int = 1) -> np.ndarray:
    """The constant input ``index`` of the node named ``node`` (an initializer)."""
    name = next(n.input[index] for n in model.graph.node if n.name == node)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return numpy_helper.to_array(tensor)


def attrs(model: onnx.ModelProto, node: str) -> dict[str, object]:
    found = next(n for n in model.graph.node if n.name == node)
    return {a.name: helper.get_attribute_value(a) for a in found.attribute}


def shape_tail(model: onnx.ModelProto, reshape: str, count: int) -> list[int]:
    """The trailing entries of a Reshape's shape: a constant, or a Concat's constants."""
    name = next(n.input[1] for n in model.graph.node if n.name == reshape)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if name in inits:
        return inits[name].tolist()[-count:]
    concat = next(n for n in model.graph.node if name in n.output)
    return np.concatenate([inits[i] for i in concat.input if i in inits]).tolist()[-count:]


def assert_structure(model: onnx.ModelProto, form: str, heads: int, dims: int) -> None:
    width = heads * dims
    if form == "fused":
        assert weight(model, "attention").shape == (D, 3 * width)
        assert weight(model, "attention", 2).shape == (3 * width,)
        found = attrs(model, "attention")
        assert found["num_heads"] == heads and found["qkv_hidden_sizes"] == [width] * 3
    else:
        for role in ("q", "k", "v"):
            assert weight(model, f"{role}/MatMul").shape == (D, width)
            assert weight(model, f"{role}/Add").shape == (width,)
    assert weight(model, "o/MatMul").shape == (width, D)
    if form in ("legacy", "dynamo", "dynamo-sdpa"):
        split = [heads, -1 if form == "legacy" else dims]
        for role in ("q", "k", "v"):
            assert shape_tail(model, f"{role}/Reshape", 2) == split
        assert shape_tail(model, "merge", 1) == [width]
    if form == "attention23":
        assert attrs(model, "attention")["q_num_heads"] == heads
    if form == "mha":
        assert attrs(model, "attention")["num_heads"] == heads
    if dims != HEAD_DIM and form in ("fused", "mha", "attention23", "dynamo-sdpa"):
        assert attrs(model, "attention")["scale"] == pytest.approx(1 / np.sqrt(HEAD_DIM))


@pytest.mark.parametrize("form", FORMS)
def test_a_zeroed_head_is_removed_exactly(form: str) -> None:
    model = attention_model(form, zero_head=2)
    out, report = onnxpress.optimize(
        model,
        passes="prune-channels{ratio=0.25,reconstruct=false,head-dims=false}",
        calibration=calibration(),
        verify="off",
    )
    result = report.passes[0].result
    site = next(d for d in result.details if d["kind"] == "attention")
    assert site["kept_heads"] == [0, 1, 3]
    assert site["head_importance"][2] == 0.0 and min(site["head_importance"][:2]) > 0
    assert result.counts["heads_removed"] == 1
    assert_structure(out, form, HEADS - 1, HEAD_DIM)
    assert_exact(model, out)


@pytest.mark.parametrize("form", FORMS)
def test_zeroed_head_dimensions_are_removed_exactly(form: str) -> None:
    model = attention_model(form, zero_dim=1)
    out, report = onnxpress.optimize(
        model, passes="prune-channels{ratio=0.25,reconstruct=false,heads=false}", verify="off"
    )
    result = report.passes[0].result
    assert result.counts["qk_dims_removed"] == result.counts["vo_dims_removed"] == HEADS
    assert_structure(out, form, HEADS, HEAD_DIM - 1)
    assert_exact(model, out)


@pytest.mark.parametrize("form", FORMS)
def test_macs_budget_counts_the_attention_products(form: str) -> None:
    """The MAC model scales q·kᵀ and scores·v with the kept heads; its estimate is what
    the statistics measure on the pruned model (com.microsoft Attention: its projection
    and attention MACs scale together with its kept q|k|v columns, a close estimate)."""
    model = attention_model(form, seed=3)
    out, report = onnxpress.optimize(
        model, passes="prune-channels{macs=0.7}", calibration=calibration(), verify="off"
    )
    result = report.passes[0].result
    allocation = next(d for d in result.details if d["kind"] == "allocation")
    measured = report.after.macs / report.before.macs
    assert measured == pytest.approx(
        allocation["macs_estimate"], abs=0.03 if form == "fused" else 5e-3
    )
    assert measured <= 0.7 + (0.03 if form == "fused" else 1e-6)
    assert allocation["cut"]["heads"] + allocation["cut"]["head_dims"] > 0
    x = np.random.default_rng(2).standard_normal((4, SEQ, D)).astype(np.float32)
    assert Runner(out)({"x": x})[0].shape == (4, SEQ, D)


def test_a_per_head_operand_is_refused_with_its_reason() -> None:
    model = attention_model("legacy")
    for tensor in model.graph.initializer:  # the score scale becomes one value per head
        if tensor.name == "sqrt_dim":
            values = np.full((1, HEADS, 1, 1), np.sqrt(HEAD_DIM), np.float32)
            tensor.CopyFrom(numpy_helper.from_array(values, "sqrt_dim"))
    out, report = onnxpress.optimize(model, passes="prune-channels{ratio=0.25}", verify="off")
    refusals = {r.node: r.reason for r in report.passes[0].result.refusals}
    reason = "Div 'scale': operand 'sqrt_dim' differs per head (or per head dimension)"
    assert refusals["q/MatMul"] == reason
    assert refusals["context:qk"] == f"query/key channels: {reason}"
    assert report.passes[0].result.counts.get("heads_removed", 0) == 0
    assert weight(out, "q/MatMul").shape == (D, D)  # the value dimensions can still go
    assert weight(out, "v/MatMul").shape == (D, HEADS * (HEAD_DIM - 1))


def test_bundled_transformer_allocates_one_budget_over_attention_ffn_and_width() -> None:
    """transformer_mnist at 0.6 MACs: the heads, head dimensions, FFN and residual width
    compete for one budget; the held-out accuracy stays above the 0.919 of the cut over
    heads and FFN alone (docs/BENCHMARKS.md), the width taking most of it."""
    models = Path(__file__).resolve().parents[3] / "models"
    out, report = onnxpress.optimize(
        models / "transformer_mnist.onnx",
        "prune-channels{macs=0.6}",
        calibration=models / "data" / "transformer_mnist_calib.npz",
        verify="off",
    )
    result = report.passes[0].result
    allocation = next(d for d in result.details if d["kind"] == "allocation")
    assert set(allocation["cut"]) == {"heads", "head_dims", "channels"}
    assert allocation["cut"]["channels"] > 0.3
    assert len([d for d in result.details if d["kind"] == "attention"]) == 2
    assert report.after.macs <= 0.6 * report.before.macs
    held_out = np.load(models / "data" / "transformer_mnist_eval.npz")
    images = (held_out["images"] / held_out["divisor"]).astype(np.float32)
    logits = Runner(out)({"input": images})[0]
    assert np.mean(logits.argmax(axis=1) == held_out["labels"]) > 0.94


@pytest.mark.parametrize("form", FORMS)
def test_query_key_and_value_head_sizes_may_differ(form: str) -> None:
    """3 heads of 3 query/key and 2 value dimensions: every form still runs, and the
    shapes (a shared or computed head-split shape gets its own copy per Reshape) follow."""
    model = attention_model(form)
    graph = to_graph(model)
    groups = PassContext(model, model).analysis(ChannelGroups, graph)
    (site,) = groups.sites
    order = np.arange(float(D))  # the later heads and dimensions score higher
    Pruner(graph, groups, site_kept(site, (3, 3, 2), order[:HEADS], order, order)).apply()
    out = to_model(graph, model)
    x = np.random.default_rng(3).standard_normal((2, SEQ, D)).astype(np.float32)
    assert Runner(out)({"x": x})[0].shape == (2, SEQ, D)
    assert weight(out, "o/MatMul").shape == (3 * 2, D)
    if form == "fused":
        assert attrs(out, "attention")["qkv_hidden_sizes"] == [9, 9, 6]
    else:
        assert weight(out, "q/MatMul").shape == (D, 9)
        assert weight(out, "v/MatMul").shape == (D, 6)
    if form in ("dynamo", "dynamo-sdpa"):
        assert shape_tail(out, "q/Reshape", 2) == [3, 3]
        assert shape_tail(out, "v/Reshape", 2) == [3, 2]
