"""fold-batchnorm: BatchNormalization disappears into the Conv/ConvTranspose/Gemm/MatMul before it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxpress

node = helper.make_node


def bn_params(channels: int, prefix: str = "bn", seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"{prefix}_scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        f"{prefix}_bias": rng.standard_normal(channels).astype(np.float32),
        f"{prefix}_mean": rng.standard_normal(channels).astype(np.float32),
        f"{prefix}_var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def bn(x: str, y: str, prefix: str = "bn") -> onnx.NodeProto:
    params = [f"{prefix}_{p}" for p in ("scale", "bias", "mean", "var")]
    return node("BatchNormalization", [x, *params], [y], epsilon=1e-3, name=prefix)


def weights(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def fold(kit: SimpleNamespace, model: onnx.ModelProto) -> tuple[onnx.ModelProto, object]:
    """Run fold-batchnorm through the public API (verified on onnxruntime) and re-check."""
    folded, report = onnxpress.optimize(model, passes="fold-batchnorm")
    kit.same_outputs(model, folded)
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    return folded, report.passes[0].result


CONV_CASES = {
    "no-bias": dict(out=6, group=1, bias=False, attrs={}),
    "bias": dict(out=6, group=1, bias=True, attrs={"pads": [1, 1, 1, 1]}),
    "groups-2": dict(out=6, group=2, bias=True, attrs={}),
    "depthwise": dict(out=4, group=4, bias=False, attrs={"pads": [1, 1, 1, 1]}),
    "strided-dilated": dict(out=6, group=1, bias=True, attrs={"strides": [2, 2], "dilations": [2, 2]}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_batchnorm_folds_into_conv(kit: SimpleNamespace, case: str) -> None:
    spec = CONV_CASES[case]
    out, group = spec["out"], spec["group"]
    inits = {"W": weights(out, 4 // group, 3, 3)} | bn_params(out)
    inputs = ["x", "W"]
    if spec["bias"]:
        inits["B"] = weights(out, seed=2)
        inputs.append("B")
    conv = node("Conv", inputs, ["h"], group=group, name="conv", **spec["attrs"])
    model = kit.model([conv, bn("h", "y")], {"x": [2, 4, 9, 9]}, {"y": None}, inits)
    folded, result = fold(kit, model)
    assert kit.ops(folded) == ["Conv"]
    assert result.counts == {"folded": 1} and result.refusals == []
    assert (
        list(folded.graph.node[0].input)[:2] == ["x", "W"] and len(folded.graph.node[0].input) == 3
    )
    assert folded.graph.node[0].output == ["y"]
    assert {t.name for t in folded.graph.initializer} == {
        "W",
        "B" if spec["bias"] else "bn_bias_folded",
    }


@pytest.mark.parametrize("group", [1, 2])
def test_convtranspose_batchnorm_scales_the_output_channel_axis(
    kit: SimpleNamespace, group: int
) -> None:
    # W is [Cin=4, Cout/group=3, 3, 3]; the BN has Cout = 3 * group channels.
    channels = 3 * group
    inits = {"W": weights(4, 3, 3, 3)} | bn_params(channels)
    deconv = node("ConvTranspose", ["x", "W"], ["h"], group=group, strides=[2, 2], name="deconv")
    model = kit.model([deconv, bn("h", "y")], {"x": [1, 4, 5, 5]}, {"y": None}, inits)
    folded, result = fold(kit, model)
    assert kit.ops(folded) == ["ConvTranspose"]
    assert result.counts == {"folded": 1}
    assert kit.initializer(folded, "W").shape == (4, 3, 3, 3)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [False, True])
def test_gemm_batchnorm_respects_transb_alpha_beta(
    kit: SimpleNamespace, trans_b: int, with_c: bool
) -> None:
    inits = {"B": weights(*((6, 5) if trans_b else (5, 6)))} | bn_params(6)
    inputs = ["x", "B"]
    if with_c:
        inits["C"] = weights(1, 6, seed=3)  # [1, N]: per output feature
        inputs.append("C")
    gemm = node("Gemm", inputs, ["h"], alpha=0.5, beta=2.0, transB=trans_b, name="gemm")
    model = kit.model([gemm, bn("h", "y")], {"x": [3, 5]}, {"y": [3, 6]}, inits)
    folded, result = fold(kit, model)
    assert kit.ops(folded) == ["Gemm"]
    assert result.counts == {"folded": 1}
    attrs = {a.name: helper.get_attribute_value(a) for a in folded.graph.node[0].attribute}
    assert attrs == {"alpha": 0.5, "beta": 1.0, "transB": trans_b}
    assert len(folded.graph.node[0].input) == 3


@pytest.mark.parametrize("with_add", [False, True])
def test_matmul_batchnorm_folds_into_weight_and_bias_add(
    kit: SimpleNamespace, with_add: bool
) -> None:
    inits = {"W": weights(5, 6)} | bn_params(6)
    nodes = [node("MatMul", ["x", "W"], ["mm"], name="matmul")]
    if with_add:  # MatMul -> Add(bias) -> BN: the existing Add takes the shift
        inits["b"] = weights(6, seed=4)
        nodes.append(node("Add", ["mm", "b"], ["h"], name="add"))
    nodes.append(bn("h" if with_add else "mm", "y"))
    model = kit.model(nodes, {"x": [4, 5]}, {"y": [4, 6]}, inits)
    del model.graph.value_info[:]  # the output rank must come from shape inference
    folded, result = fold(kit, model)
    assert kit.ops(folded) == ["MatMul", "Add"]
    assert result.counts == {"folded": 1}
    assert folded.graph.node[1].output == ["y"]
    assert len(folded.graph.initializer) == 2


def test_chained_batchnorms_both_fold(kit: SimpleNamespace) -> None:
    inits = {"W": weights(4, 4, 1, 1)} | bn_params(4, "bn1") | bn_params(4, "bn2", seed=7)
    nodes = [
        node("Conv", ["x", "W"], ["h"], name="conv"),
        bn("h", "h1", "bn1"),
        bn("h1", "y", "bn2"),
    ]
    folded, result = fold(kit, kit.model(nodes, {"x": [1, 4, 3, 3]}, {"y": None}, inits))
    assert kit.ops(folded) == ["Conv"]
    assert result.counts == {"folded": 2}


def test_shared_weight_is_copied_not_changed(kit: SimpleNamespace) -> None:
    inits = {"W": weights(4, 4, 3, 3)} | bn_params(4)
    nodes = [
        node("Conv", ["x", "W"], ["h"], name="conv_bn"),
        bn("h", "y"),
        node("Conv", ["x", "W"], ["z"], name="conv_plain"),
    ]
    model = kit.model(nodes, {"x": [1, 4, 6, 6]}, {"y": None, "z": None}, inits)
    folded, result = fold(kit, model)
    assert sorted(kit.ops(folded)) == ["Conv", "Conv"]
    assert result.counts == {"folded": 1, "weights_copied": 1}
    np.testing.assert_array_equal(kit.initializer(folded, "W"), inits["W"])
    plain = next(n for n in folded.graph.node if n.name == "conv_plain")
    assert list(plain.input) == ["x", "W"]


REFUSED = {
    "after-relu": (
        [node("Conv", ["x", "W"], ["c"], name="conv"), node("Relu", ["c"], ["h"], name="relu")],
        {"y": None},
        "producer Relu 'relu' is not Conv/ConvTranspose/Gemm/MatMul",
    ),
    "two-consumers": (
        [node("Conv", ["x", "W"], ["h"], name="conv"), node("Relu", ["h"], ["z"], name="relu")],
        {"y": None, "z": None},
        "output of Conv 'conv' also feeds other nodes (2 consumers)",
    ),
    "graph-input": ([], {"y": None}, "input 'h' is a graph input: no producer to fold into"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unfoldable_batchnorm_is_refused_with_reason(kit: SimpleNamespace, case: str) -> None:
    nodes, outputs, reason = REFUSED[case]
    inputs = {"h": [1, 4, 5, 5]} if case == "graph-input" else {"x": [1, 4, 5, 5]}
    inits = bn_params(4) | ({} if case == "graph-input" else {"W": weights(4, 4, 1, 1)})
    model = kit.model([*nodes, bn("h", "y")], inputs, outputs, inits)
    folded, result = fold(kit, model)
    assert kit.ops(folded) == kit.ops(model)
    assert result.counts.get("folded", 0) == 0
    assert [(r.node, r.reason) for r in result.refusals] == [("bn", reason)]


def test_matmul_of_rank_three_is_refused(kit: SimpleNamespace) -> None:
    # [2, 6, 5] @ [5, 6]: BN's channel axis 1 is the 6 rows, not the weight's output columns.
    inits = {"W": weights(5, 6)} | bn_params(6)
    nodes = [node("MatMul", ["x", "W"], ["h"], name="matmul"), bn("h", "y")]
    model = kit.model(nodes, {"x": [2, 6, 5]}, {"y": None}, inits)
    del model.graph.value_info[:]
    folded, result = fold(kit, model)
    assert kit.ops(folded) == ["MatMul", "BatchNormalization"]
    [refusal] = result.refusals
    assert refusal.reason == "MatMul 'matmul' output has rank 3; BN's axis 1 is not its features"


def test_batchnorm_with_variable_statistics_is_refused(kit: SimpleNamespace) -> None:
    params = bn_params(4)
    inits = {"W": weights(4, 4, 1, 1)} | {k: v for k, v in params.items() if k != "bn_var"}
    nodes = [node("Conv", ["x", "W"], ["h"], name="conv"), bn("h", "y")]
    model = kit.model(nodes, {"x": [1, 4, 3, 3], "bn_var": [4]}, {"y": None}, inits)
    folded, report = onnxpress.optimize(model, passes="fold-batchnorm", verify="structure")
    assert kit.ops(folded) == ["Conv", "BatchNormalization"]
    assert [r.reason for r in report.passes[0].result.refusals] == [
        "scale, bias, mean and variance must all be constants"
    ]


def test_weights_are_exact_float64_folds(kit: SimpleNamespace) -> None:
    # The folded weight is W * gamma / sqrt(var + eps), computed in float64 and cast once.
    inits = {"W": weights(3, 2, 1, 1)} | bn_params(3)
    nodes = [node("Conv", ["x", "W"], ["h"], name="conv"), bn("h", "y")]
    folded, _ = fold(kit, kit.model(nodes, {"x": [1, 2, 2, 2]}, {"y": None}, inits))
    scale = inits["bn_scale"].astype(np.float64) / np.sqrt(
        inits["bn_var"].astype(np.float64) + float(np.float32(1e-3))
    )
    expected = (inits["W"].astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    np.testing.assert_array_equal(kit.initializer(folded, "W"), expected)
    shift = inits["bn_bias"] - inits["bn_mean"] * scale
    np.testing.assert_array_equal(
        kit.initializer(folded, "bn_bias_folded"), shift.astype(np.float32)
    )
    assert numpy_helper.to_array(folded.graph.initializer[0]).dtype == np.float32
