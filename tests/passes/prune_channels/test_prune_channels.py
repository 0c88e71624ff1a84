"""prune-channels: exact shapes after pruning, and numerics against the original model with
the pruned channels' contribution removed (their consumer weights zeroed), to 1e-5."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from channel_graphs import (
    Net,
    block_model,
    chain_model,
    ffn_model,
    flatten_model,
    grouped_model,
    gru_model,
    residual_se_model,
    split_slice_model,
)
from onnx import numpy_helper
from onnxpress.passes.prune_channels.importance import MacModel
from prune_helpers import assert_same, masked, removed

import onnxpress
from onnxpress import CalibrationData, PassContext, PassResult
from onnxpress.analysis.channels.groups import ChannelGroups
from onnxpress.core.errors import PipelineError
from onnxpress.core.ir import to_graph, to_model
from onnxpress.core.pipeline import parse_pipeline
from onnxpress.core.stats import model_stats
from onnxpress.core.verify import Runner, check_structure

MODELS = Path(__file__).resolve().parents[3] / "models"


def prune(
    model: onnx.ModelProto, spec: str, calibration: list[dict[str, np.ndarray]] | None = None
) -> tuple[onnx.ModelProto, PassResult]:
    """Run the pass alone, then the structural check (checker + strict shape inference)."""
    data = CalibrationData.from_batches(calibration) if calibration else None
    ctx = PassContext(template=model, original=model, calibration=data)
    graph = to_graph(model)
    result = parse_pipeline(spec)[0].run(graph, ctx)
    pruned = to_model(graph, model)
    check_structure(pruned)
    return pruned, result


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """node name -> its weight inputs (initializers), in input order."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: [inits[i] for i in n.input if i in inits] for n in model.graph.node}


def attribute(model: onnx.ModelProto, node: str, name: str) -> Any:
    found = next(n for n in model.graph.node if n.name == node)
    return next(onnx.helper.get_attribute_value(a) for a in found.attribute if a.name == name)


def test_chain_through_bn_pool_pad_resize() -> None:
    model = chain_model()
    pruned, result = prune(model, "prune-channels{ratio=0.5}")
    w = weights(pruned)
    assert w["conv1"][0].shape == (4, 3, 3, 3) and w["conv1"][1].shape == (4,)
    assert [p.shape for p in w["bn1"]] == [(4,)] * 4 and w["y"][0].shape == (4, 4, 3, 3)
    assert result.counts == {"nodes_rewritten": 3, "groups_pruned": 1, "channels_removed": 4}
    assert_same(masked(model, {"y.w": (1, removed(result, "conv1"))}), pruned)


def test_residual_with_squeeze_excitation() -> None:
    model = residual_se_model()
    pruned, result = prune(model, "prune-channels{ratio=0.5}")
    w = weights(pruned)
    assert w["stem"][0].shape == (4, 3, 3, 3) and w["c1"][0].shape == (4, 4, 3, 3)
    assert w["c2"][0].shape == (4, 4, 3, 3) and w["se_reduce"][0].shape == (2, 4, 1, 1)
    assert w["se_expand"][0].shape == (4, 2, 1, 1) and w["y"][0].shape == (2, 4, 3, 3)
    assert [p.shape for p in w["inorm"]] == [(4,), (4,)]
    stem, c1, se = (removed(result, g) for g in ("stem", "c1", "se_reduce"))
    zeros = {
        "c1.w": (1, stem),
        "se_reduce.w": (1, stem),
        "y.w": (1, stem),
        "c2.w": (1, c1),
        "se_expand.w": (1, se),
    }
    assert_same(masked(model, zeros), pruned)


def test_concat_residual_and_depthwise_in_one_block() -> None:
    model = block_model()
    pruned, result = prune(model, "prune-channels{ratio=0.5}")
    w = weights(pruned)
    assert w["stem"][0].shape == (4, 3, 3, 3) and w["conv_a"][0].shape == (2, 4, 3, 3)
    assert w["conv_b"][0].shape == (2, 4, 3, 3) and w["dw"][0].shape == (4, 1, 3, 3)
    assert w["conv_p"][0].shape == (4, 4, 3, 3) and w["y"][0].shape == (2, 4, 3, 3)
    assert attribute(pruned, "dw", "group") == 4
    stem, a, b = (removed(result, g) for g in ("stem", "conv_a", "conv_b"))
    zeros = {
        "conv_a.w": (1, stem),
        "conv_b.w": (1, stem),
        "y.w": (1, stem),
        "conv_p.w": (1, np.concatenate([a, 4 + b])),
    }
    assert_same(masked(model, zeros), pruned)


def test_grouped_conv_keeps_the_same_channels_in_every_partition() -> None:
    model = grouped_model()
    pruned, result = prune(model, "prune-channels{ratio=0.5}")
    w = weights(pruned)
    assert w["conv1"][0].shape == (4, 3, 3, 3) and w["gconv"][0].shape == (4, 2, 3, 3)
    assert w["y"][0].shape == (2, 4, 3, 3)
    conv1, gconv = removed(result, "conv1"), removed(result, "gconv")
    zeros = {"gconv.w": (1, conv1), "y.w": (1, np.concatenate([gconv, 3 + gconv]))}
    assert_same(masked(model, zeros), pruned)


@pytest.mark.parametrize("reshape", [False, True])
def test_flatten_or_reshape_into_a_dense_layer(reshape: bool) -> None:
    model = flatten_model(reshape)
    pruned, result = prune(model, "prune-channels{ratio=0.5}")
    w = weights(pruned)
    assert w["conv"][0].shape == (2, 3, 3, 3)
    assert w["y"][0].shape == ((32, 5) if reshape else (5, 32))
    features = (16 * removed(result, "conv")[:, None] + np.arange(16)).reshape(-1)
    assert_same(masked(model, {"fc.w": (0 if reshape else 1, features)}), pruned)


def test_split_and_slice_on_the_channel_axis() -> None:
    model = split_slice_model()
    pruned, result = prune(model, "prune-channels{ratio=0.5}")
    w = weights(pruned)
    assert w["conv"][0].shape == (5, 3, 3, 3) and w["y"][0].shape == (2, 4, 3, 3)
    assert w["split"][0].tolist() == [2, 3]
    assert w["slice"][0].tolist() == [1] and w["slice"][1].tolist() == [3]
    assert "only 1 channel(s)" in [r.reason for r in result.refusals]
    first, last = removed(result, "conv[0:3]"), removed(result, "conv[4:8]")
    assert_same(masked(model, {"y.w": (1, np.concatenate([first, 3 + last]))}), pruned)


def test_transformer_ffn_hidden_units() -> None:
    model = ffn_model()
    pruned, result = prune(model, "prune-channels{ratio=0.5}")
    w = weights(pruned)
    assert w["fc1"][0].shape == (8, 8) and w["fc1_bias"][0].shape == (8,)
    assert w["fc2"][0].shape == (8, 8)
    assert_same(masked(model, {"w2": (0, removed(result, "fc1"))}), pruned)


def test_gru_hidden_units() -> None:
    model = gru_model()
    pruned, result = prune(model, "prune-channels{ratio=0.25}")
    w = weights(pruned)
    assert [p.shape for p in w["gru"]] == [(1, 18, 3), (1, 18, 6), (1, 36)]
    assert attribute(pruned, "gru", "hidden_size") == 6
    assert next(n for n in pruned.graph.node if n.name == "gru").input[5:] == []
    assert "ConstantOfShape" not in [n.op_type for n in pruned.graph.node]
    assert w["y"][0].shape == (2, 6)
    units = removed(result, "gru")
    # A unit whose rows of W, R and B are zero stays at zero from a zero initial state.
    rows = (8 * np.arange(6)[:, None] + units).reshape(-1)
    gates = rows[: 3 * len(units)]
    zeros = {"W": (1, gates), "R": (1, gates), "B": (1, rows)}
    assert_same(masked(model, zeros), pruned)


def test_refused_group_leaves_the_model_unchanged() -> None:
    net = Net()
    net.conv(net.op("Relu", [net.conv("x", "c1", 3, 4)], "relu"), "y", 4, 2)
    model = net.model({"x": ["N", 3, 8, 8]}, ["y", "relu"])
    pruned, result = prune(model, "prune-channels{ratio=0.5}")
    assert not result.changed
    assert {r.node: r.reason for r in result.refusals} == {
        "c1": "reaches graph output 'relu'",
        "y": "reaches graph output 'y'",
    }
    assert_same(model, pruned, tol=0.0)


def test_options() -> None:
    options = parse_pipeline("prune-channels{ratio=0.3,criterion=l1,multiple=8}")[0].options
    assert (options.ratio, options.criterion, options.multiple) == (0.3, "l1", 8)
    assert parse_pipeline("prune-channels{macs=0.6}")[0].spec() == "prune-channels{macs=0.6}"
    for bad in ("ratio=0.3,macs=0.5", "ratio=1.0", "macs=0", "multiple=0", "criterion=l3"):
        with pytest.raises(PipelineError):
            parse_pipeline(f"prune-channels{{{bad}}}")
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(chain_model(), "prune-channels{criterion=activation}")


def test_multiple_min_channels_include_exclude() -> None:
    net = Net()
    net.conv(net.op("Relu", [net.conv("x", "c1", 3, 32)], "relu"), "y", 32, 2)
    model = net.model({"x": ["N", 3, 8, 8]}, ["y"])
    assert weights(prune(model, "prune-channels{ratio=0.3,multiple=8}")[0])["c1"][0].shape[0] == 24
    assert (
        weights(prune(model, "prune-channels{ratio=0.9,min-channels=5}")[0])["c1"][0].shape[0] == 5
    )
    _, result = prune(residual_se_model(), "prune-channels{include=[c*],exclude=[stem]}")
    assert [d["group"] for d in result.details] == ["c1"] and result.counts["groups_excluded"] == 1


@pytest.mark.parametrize("build", [block_model, grouped_model, gru_model, chain_model])
def test_mac_model_matches_the_pruned_model(build: Any) -> None:
    model = build()
    pruned, result = prune(model, "prune-channels{ratio=0.5}")
    groups = PassContext(template=model, original=model).analysis(ChannelGroups, to_graph(model))
    index = {g.name: g.index for g in groups.groups}
    counts = {index[d["group"]]: d["kept"] for d in result.details if d["kind"] == "group"}
    macs = MacModel(model, groups)
    assert macs.total == model_stats(model).macs
    assert macs.macs(counts) == pytest.approx(model_stats(pruned).macs)


def _calibration(model: onnx.ModelProto, batches: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    shape = [d.dim_value or 16 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(batches)]


def _error(
    reference: onnx.ModelProto, model: onnx.ModelProto, feeds: list[dict[str, Any]]
) -> float:
    ref = np.concatenate([Runner(reference)(f)[0].ravel() for f in feeds])
    new = np.concatenate([Runner(model)(f)[0].ravel() for f in feeds])
    return float(np.linalg.norm(ref - new) / np.linalg.norm(ref))


def test_reconstruction_refits_the_consumers() -> None:
    for build in (chain_model, ffn_model, lambda: flatten_model(reshape=True)):
        model = build()
        data = _calibration(model)
        plain, _ = prune(model, "prune-channels{ratio=0.5,reconstruct=false}", data)
        refit, result = prune(model, "prune-channels{ratio=0.5}", data)
        assert result.counts["layers_refit"] == 1
        record = next(d for d in result.details if d["kind"] == "refit")
        assert record["error_after"] < 0.5 * record["error_before"]
        assert _error(model, refit, data) < 0.9 * _error(model, plain, data)
        assert [o.name for o in refit.graph.output] == [o.name for o in model.graph.output]


def test_data_aware_criteria() -> None:
    model = chain_model()
    data = _calibration(model, 1)
    gamma = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "bn1.gamma"))
    _, result = prune(model, "prune-channels{ratio=0.5,criterion=bn-gamma}")
    assert sorted(removed(result, "conv1")) == sorted(np.argsort(np.abs(gamma))[:4])
    errors = {}
    for criterion in ("l1", "activation", "reconstruction"):
        spec = f"prune-channels{{ratio=0.5,criterion={criterion},reconstruct=false}}"
        pruned, _ = prune(model, spec, data)
        errors[criterion] = _error(model, pruned, data)
    # ThiNet's greedy choice targets the consumer's output error (here: the model output).
    assert errors["reconstruction"] <= min(errors.values()) + 1e-9


def test_macs_target_through_the_pass_manager() -> None:
    model = block_model()
    data = _calibration(model)
    for allocation in ("uniform", "sensitivity"):
        _out, report = onnxpress.optimize(
            model,
            f"prune-channels{{macs=0.6,allocation={allocation}}}",
            calibration=data,
            verify=onnxpress.VerifyConfig(budget=1.0),
        )
        record = report.passes[0]
        assert record.after.macs <= 0.6 * record.before.macs
        assert record.after.bytes < record.before.bytes and record.verification.value is not None


def test_prunes_after_fold_batchnorm() -> None:
    model = chain_model()
    out, _report = onnxpress.optimize(
        model, "fold-batchnorm,prune-channels{ratio=0.5}", verify="structure"
    )
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    assert weights(out)["conv1"][0].shape == (4, 3, 3, 3)


def test_bundled_cnn_keeps_its_accuracy_at_60_percent_macs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("models_evaluate", MODELS / "evaluate.py")
    assert spec is not None and spec.loader is not None
    evaluate = sys.modules["models_evaluate"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    out, report = onnxpress.optimize(
        MODELS / "cnn_mnist.onnx",
        "prune-channels{macs=0.6,allocation=uniform}",
        calibration=MODELS / "data" / "cnn_mnist_calib.npz",
        verify="structure",
    )
    onnx.save(out, str(tmp_path / "cnn_pruned.onnx"))
    before = evaluate.evaluate(MODELS / "cnn_mnist.onnx").value
    after = evaluate.evaluate(tmp_path / "cnn_pruned.onnx", kind="cnn_mnist").value
    assert report.after.macs <= 0.6 * report.before.macs
    assert after >= before - 0.015
