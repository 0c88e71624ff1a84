"""svd: every op form factors into the expected two nodes and matches a truncated SVD on
onnxruntime; shared weights are factored once; refusals carry reasons; full rank is lossless."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnxpress.passes.svd import Svd, SvdOptions

node = helper.make_node


def truncate(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def with_weight(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    """``model`` with initializer ``name`` replaced (the reference for a factored weight)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return out


def factor(
    kit: SimpleNamespace, model: onnx.ModelProto, **options: Any
) -> tuple[onnx.ModelProto, Any]:
    return kit.run_pass(Svd(SvdOptions(min_params=0, **options)), model)


def assert_close(
    kit: SimpleNamespace, expected: onnx.ModelProto, actual: onnx.ModelProto, rtol: float = 1e-4
) -> None:
    feeds = kit.feeds(expected, seed=1)
    want, got = kit.run_ort(expected, feeds), kit.run_ort(actual, feeds)
    for name, ref in want.items():
        scale = float(np.max(np.abs(ref)))
        np.testing.assert_allclose(got[name], ref, rtol=0, atol=rtol * scale, err_msg=name)


def weights(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def matmul_model(kit: SimpleNamespace, left: bool, k: int = 12, n: int = 10) -> onnx.ModelProto:
    (w,) = weights(0, (n, k) if left else (k, n))
    inputs = ["W", "x"] if left else ["x", "W"]
    shape = [2, k, 3] if left else [2, 3, k]
    return kit.model(
        [node("MatMul", inputs, ["y"], name="mm")], {"x": shape}, {"y": None}, {"W": w}
    )


@pytest.mark.parametrize("left", [False, True])
def test_matmul_weight_on_either_side(kit: SimpleNamespace, left: bool) -> None:
    model = matmul_model(kit, left)
    out, result = factor(kit, model, rank=3)
    assert kit.ops(out) == ["MatMul", "MatMul"]
    u, v = kit.initializer(out, "W_svd_u"), kit.initializer(out, "W_svd_v")
    assert (u.shape, v.shape) == (((3, 12), (10, 3)) if left else ((12, 3), (3, 10)))
    w = kit.initializer(model, "W")
    assert_close(kit, with_weight(model, "W", truncate(w, 3)), out)
    (detail,) = result.details
    assert detail["form"] == ("matmul-left" if left else "matmul")
    assert (detail["k"], detail["n"], detail["rank"]) == (12, 10, 3)
    assert (detail["params_before"], detail["params_after"]) == (120, 66)
    assert detail["output_error"] is None and 0 < detail["weight_error"] < 1
    assert result.counts == {"factored": 1, "nodes_rewritten": 1, "params_saved": 54}


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [None, "row", "full"])
def test_gemm_flags_scales_and_bias(
    kit: SimpleNamespace, trans_a: int, trans_b: int, bias: str | None
) -> None:
    k, n, m = 12, 10, 4
    a_shape = [k, m] if trans_a else [m, k]
    b, c_row, c_full = weights(1, (n, k) if trans_b else (k, n), (n,), (m, n))
    inits = {"B": b}
    inputs = ["a", "B"]
    if bias:
        inits["C"] = c_row if bias == "row" else c_full
        inputs.append("C")
    model = kit.model(
        [
            node(
                "Gemm",
                inputs,
                ["y"],
                name="gemm",
                alpha=0.5,
                beta=2.0,
                transA=trans_a,
                transB=trans_b,
            )
        ],
        {"a": a_shape},
        {"y": None},
        inits,
    )
    out, result = factor(kit, model, rank=4)
    assert kit.ops(out) == ["Gemm", "Gemm"]
    first, second = out.graph.node
    assert kit.initializer(out, "B_svd_u").shape == (k, 4)
    assert kit.initializer(out, "B_svd_v").shape == (4, n)
    assert {a.name: helper.get_attribute_value(a) for a in second.attribute} == {
        "alpha": 1.0,
        "beta": 2.0,
        "transA": 0,
        "transB": 0,
    }
    assert list(second.input[2:]) == (["C"] if bias else [])
    assert helper.get_attribute_value(first.attribute[0]) == trans_a
    assert_close(kit, with_weight(model, "B", truncate(b, 4)), out)
    assert result.details[0]["rank"] == 4


def conv_model(kit: SimpleNamespace, groups: int, **attrs: Any) -> onnx.ModelProto:
    c, m = 4 * groups, 6 * groups
    w, b = weights(2, (m, c // groups, 3, 3), (m,))
    return kit.model(
        [node("Conv", ["x", "W", "b"], ["y"], name="conv", group=groups, **attrs)],
        {"x": [2, c, 9, 8]},
        {"y": None},
        {"W": w, "b": b},
    )


CONV_CASES = {
    "plain": (1, {}),
    "stride-pad": (1, {"strides": [2, 1], "pads": [1, 0, 2, 1]}),
    "dilation": (1, {"dilations": [2, 1], "pads": [1, 1, 1, 1]}),
    "groups-stride": (2, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "same-upper": (1, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
}


def conv_reference(w: np.ndarray, groups: int, rank: int, scheme: str) -> np.ndarray:
    out = np.empty_like(w)
    mg = w.shape[0] // groups
    for g in range(groups):
        block = w[g * mg : (g + 1) * mg]  # [Mg, Cg, kh, kw]
        if scheme == "channel":
            out[g * mg : (g + 1) * mg] = truncate(block.reshape(mg, -1), rank).reshape(block.shape)
        else:
            mat = block.transpose(1, 2, 0, 3).reshape(block.shape[1] * 3, mg * 3)
            back = truncate(mat, rank).reshape(block.shape[1], 3, mg, 3).transpose(2, 0, 1, 3)
            out[g * mg : (g + 1) * mg] = back
    return out


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_conv_schemes(kit: SimpleNamespace, case: str, scheme: str) -> None:
    groups, attrs = CONV_CASES[case]
    model = conv_model(kit, groups, **attrs)
    out, result = factor(kit, model, rank=2, scheme=scheme, min_gain=-1.0)
    if scheme == "spatial" and "auto_pad" in attrs:
        assert kit.ops(out) == ["Conv"]
        assert "auto_pad SAME" in result.refusals[0].reason
        return
    assert kit.ops(out) == ["Conv", "Conv"]
    first, second = out.graph.node
    u, v = kit.initializer(out, "W_svd_u"), kit.initializer(out, "W_svd_v")
    if scheme == "channel":
        assert u.shape == (2 * groups, 4, 3, 3) and v.shape == (6 * groups, 2, 1, 1)
    else:
        assert u.shape == (2 * groups, 4, 3, 1) and v.shape == (6 * groups, 2, 1, 3)
    assert list(second.input) == [first.output[0], "W_svd_v", "b"]
    w = kit.initializer(model, "W")
    assert_close(kit, with_weight(model, "W", conv_reference(w, groups, 2, scheme)), out)
    (detail,) = result.details
    assert detail["groups"] == groups and detail["rank"] == 2


def test_gru_input_weight_is_factored_and_recurrent_weight_refused(kit: SimpleNamespace) -> None:
    hidden, size = 4, 20
    w, r, b = weights(3, (1, 3 * hidden, size), (1, 3 * hidden, hidden), (1, 6 * hidden))
    model = kit.model(
        [
            node(
                "GRU",
                ["x", "W", "R", "B"],
                ["", "h"],
                name="gru",
                hidden_size=hidden,
                linear_before_reset=1,
            )
        ],
        {"x": [5, 2, size]},
        {"h": None},
        {"W": w, "R": r, "B": b},
    )
    out, result = factor(kit, model, rank=3)
    assert kit.ops(out) == ["MatMul", "GRU"]
    assert kit.initializer(out, "W_svd_u").shape == (size, 3)
    assert kit.initializer(out, "W_svd_v").shape == (1, 3 * hidden, 3)
    assert_close(kit, with_weight(model, "W", truncate(w[0], 3)[None]), out)
    assert [r.reason for r in result.refusals] == [
        "R 'R' is applied inside the recurrence of the fused GRU op; factor the unrolled form "
        "(MatMul per step) instead"
    ]


def test_shared_weight_is_factored_once(kit: SimpleNamespace) -> None:
    # An unrolled recurrence: the same W is applied twice, in sequence.
    (w,) = weights(4, (16, 16))
    model = kit.model(
        [
            node("MatMul", ["x", "W"], ["h1"], name="step0"),
            node("Tanh", ["h1"], ["t1"], name="tanh"),
            node("MatMul", ["t1", "W"], ["y"], name="step1"),
        ],
        {"x": [3, 16]},
        {"y": None},
        {"W": w},
    )
    out, result = factor(kit, model, rank=4)
    assert kit.ops(out) == ["MatMul", "MatMul", "Tanh", "MatMul", "MatMul"]
    assert sorted(t.name for t in out.graph.initializer) == ["W_svd_u", "W_svd_v"]
    assert result.details[0]["nodes"] == ["step0", "step1"]
    assert result.counts == {"factored": 1, "nodes_rewritten": 2, "params_saved": 256 - 128}
    assert_close(kit, with_weight(model, "W", truncate(w, 4)), out)


@pytest.mark.parametrize("other", ["add", "left"])
def test_shared_weight_with_another_use_is_refused(kit: SimpleNamespace, other: str) -> None:
    (w,) = weights(5, (16, 16))
    second = (
        node("Add", ["x", "W"], ["z"], name="other")
        if other == "add"
        else node("MatMul", ["W", "x"], ["z"], name="other")
    )
    model = kit.model(
        [node("MatMul", ["x", "W"], ["y"], name="mm"), second],
        {"x": [16, 16]},
        {"y": None, "z": None},
        {"W": w},
    )
    out, result = factor(kit, model, rank=2)
    assert kit.ops(out) == ["MatMul", "Add" if other == "add" else "MatMul"]
    reasons = {r.node: r.reason for r in result.refusals}
    assert "refusing rather than factoring it for one user only" in reasons["mm"]
    assert not result.changed


def test_refusals_name_their_reason(kit: SimpleNamespace) -> None:
    w3, w1d, small = weights(6, (2, 8, 8), (4, 8, 5), (4, 4))
    model = kit.model(
        [
            node("MatMul", ["x", "y0"], ["a"], name="both-computed"),
            node("MatMul", ["x", "W3"], ["b"], name="rank3"),
            node("Conv", ["img", "K1"], ["c"], name="conv1d"),
            node("MatMul", ["x4", "S"], ["d"], name="small"),
        ],
        {"x": [2, 8, 8], "y0": [2, 8, 8], "img": [1, 8, 20], "x4": [3, 4]},
        {"a": None, "b": None, "c": None, "d": None},
        {"W3": w3, "K1": w1d, "S": small},
    )
    _, result = kit.run_pass(Svd(SvdOptions(rank=1, scheme="spatial", min_params=20)), model)
    assert {r.node: r.reason for r in result.refusals} == {
        "both-computed": "no constant weight: both operands are computed",
        "rank3": "weight 'W3' has rank 3; only 2-D weights are factored",
        "conv1d": "spatial scheme needs a 2-D kernel; this conv's kernel is 1-D",
        "small": "16 params < min-params 20",
    }


FORMS = ["matmul", "matmul-left", "gemm", "conv-channel", "conv-spatial"]


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    form=st.sampled_from(FORMS),
    k=st.integers(1, 9),
    n=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    groups=st.sampled_from([1, 2]),
    stride=st.integers(1, 2),
)
def test_full_rank_is_lossless(
    kit: SimpleNamespace, form: str, k: int, n: int, seed: int, groups: int, stride: int
) -> None:
    rng = np.random.default_rng(seed)
    if form.startswith("conv"):
        w = rng.standard_normal((n * groups, k, 3, 3)).astype(np.float32)
        model = kit.model(
            [
                node(
                    "Conv",
                    ["x", "W"],
                    ["y"],
                    name="op",
                    group=groups,
                    strides=[stride, 1],
                    pads=[1, 0, 1, 1],
                )
            ],
            {"x": [1, k * groups, 7, 6]},
            {"y": None},
            {"W": w},
        )
        scheme = form.split("-")[1]
    else:
        shape, inputs, x = {
            "matmul": ((k, n), ["x", "W"], [2, 3, k]),
            "matmul-left": ((n, k), ["W", "x"], [2, k, 3]),
            "gemm": ((n, k), ["x", "W"], [3, k]),
        }[form]
        w = rng.standard_normal(shape).astype(np.float32)
        attrs = {"transB": 1, "alpha": 1.5} if form == "gemm" else {}
        op = "Gemm" if form == "gemm" else "MatMul"
        model = kit.model(
            [node(op, inputs, ["y"], name="op", **attrs)], {"x": x}, {"y": None}, {"W": w}
        )
        scheme = "channel"
    out, result = factor(kit, model, rank=10_000, min_gain=-100.0, scheme=scheme)
    assert result.counts["factored"] == 1
    assert_close(kit, model, out, rtol=1e-4)
