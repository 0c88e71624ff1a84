"""qdq: Q/DQ placement per op pattern (exact structure, and what onnxruntime fuses it into),
per-channel axes, weight-only GRU, ignored scope, options and refusals."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper
from qdq_helpers import View, conv_relu_model, fused, quantize, weights

import onnxpress
from onnxpress.core.errors import CalibrationError, PipelineError
from onnxpress.core.pipeline import parse_pipeline

node = helper.make_node
# where a test states the converter's exact integers: a target whose kernels sum in int32, so
# no layer is narrowed against int16 pair saturation (tests/passes/qdq/test_saturation.py)
EXACT = ["avx512-vnni"]


def test_conv_relu_quantizes_after_the_relu_and_fuses(kit: SimpleNamespace, tmp_path: Path) -> None:
    model, record = quantize(conv_relu_model(kit), "qdq{float-heads=false}", targets=EXACT)
    view = View(model)
    assert view.ops_reading("x") == ["QuantizeLinear"]
    assert view.ops_reading("c1") == ["Relu"]  # no pair between Conv and Relu
    assert view.ops_reading("r1") == ["QuantizeLinear"]
    # without float heads a Conv's graph output is quantized too (QLinearConv), keeping its name
    assert view.producer["y"].op_type == "DequantizeLinear"
    assert view.by_name["conv2"].output[0] != "y"
    q, scale, axis = view.dq("conv1", 1)
    assert q.dtype == np.int8 and q.shape == (4, 3, 3, 3) and axis == 0 and scale.shape == (4,)
    assert np.abs(q).max() == 127
    bias, bias_scale, _ = view.dq("conv1", 2)
    x_scale, _ = view.activation_scale("conv1", 0)
    assert bias.dtype == np.int32
    np.testing.assert_allclose(bias_scale, x_scale * scale, rtol=1e-6)
    _, r_zero = view.activation_scale("conv2", 0)
    assert r_zero == 0  # a ReLU output uses the whole uint8 range
    assert record.result.counts["activation_qdq_pairs"] == 3
    assert record.verification.value < 0.05
    ops = fused(model, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["Relu"] == 0


def test_float_heads_keep_a_conv_output_that_nothing_quantized_reads(
    kit: SimpleNamespace, tmp_path: Path
) -> None:
    """Default: the last Conv (a graph output) and a Conv feeding only Exp run in float on int8
    inputs and weights; a Conv followed by a float Sigmoid and then a quantized Conv is not a
    head and keeps its output pair (as does a Conv read by a quantized Conv)."""
    w1, w2, w3, w4, w5 = weights(
        7, (4, 3, 3, 3), (2, 4, 1, 1), (3, 4, 1, 1), (4, 4, 1, 1), (2, 4, 1, 1)
    )
    model = kit.model(
        [
            node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            node("Relu", ["c1"], ["r1"], name="relu1"),
            node("Conv", ["r1", "W2"], ["box"], name="box"),
            node("Exp", ["box"], ["size"], name="exp"),
            node("Conv", ["r1", "W3"], ["y"], name="head"),
            node("Conv", ["r1", "W4"], ["m"], name="mid"),
            node("Sigmoid", ["m"], ["g"], name="gate"),
            node("Conv", ["g", "W5"], ["z"], name="after"),
        ],
        {"x": [1, 3, 6, 6]},
        {"y": None, "size": None, "z": None},
        {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5},
    )
    result, record = quantize(model)
    view = View(result)
    assert view.producer["y"].op_type == "Conv" and view.by_name["head"].output[0] == "y"
    assert view.ops_reading("box") == ["Exp"]
    assert view.ops_reading("r1") == ["QuantizeLinear"]
    assert view.ops_reading("m") == ["QuantizeLinear"]  # not a head: "after" is downstream
    for layer in ("conv1", "box", "head", "mid", "after"):
        # weights still 8-bit (u8 where the AVX2 target's saturation remedy chose it)
        assert view.dq(layer, 1)[0].dtype in (np.int8, np.uint8)
    assert record.result.counts["activation_qdq_pairs"] == 4  # x, r1, m, g
    ops = fused(result, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 3
    unfused, _ = quantize(model, "qdq{float-heads=false}")
    assert View(unfused).ops_reading("box") == ["QuantizeLinear"]
    assert fused(unfused, tmp_path)["QLinearConv"] == 5


def test_concat_of_wide_and_narrow_inputs_stays_float(kit: SimpleNamespace) -> None:
    """A YOLO-style output: pixel boxes (0..64) beside 0..1 scores. One shared scale would
    quantize the scores in steps of 0.25, so the Concat stays float; with a quantized reader
    (a Conv, whose input scale costs those bits anyway) it stays int8, and 3x apart shares."""
    w1, w2, w3 = weights(8, (2, 3, 1, 1), (3, 3, 1, 1), (2, 5, 1, 1))
    nodes = [
        node("Conv", ["x", "W1"], ["a"], name="a"),
        node("Mul", ["a", "k"], ["boxes"], name="scale"),
        node("Conv", ["x", "W2"], ["b"], name="b"),
        node("Sigmoid", ["b"], ["scores"], name="sigmoid"),
        node("Concat", ["boxes", "scores"], ["cat"], name="cat", axis=1),
    ]
    initializers = {"W1": w1, "W2": w2, "W3": w3, "k": np.array(64.0, np.float32)}
    model = kit.model(nodes, {"x": [1, 3, 4, 4]}, {"cat": None}, initializers)
    result, record = quantize(model)
    view = View(result)
    assert view.ops_reading("scores") == ["Concat"] and view.ops_reading("boxes") == ["Concat"]
    reasons = [r.reason for r in record.result.refusals if r.node == "cat"]
    assert len(reasons) == 1 and "stays float" in reasons[0]
    assert record.result.counts["concats_kept_float"] == 1
    shared, shared_record = quantize(model, "qdq{concat-spread=1000}")
    assert View(shared).ops_reading("scores") == ["QuantizeLinear"]
    assert shared_record.result.counts["concats_kept_float"] == 0
    read = kit.model(
        [*nodes, node("Conv", ["cat", "W3"], ["y"], name="c")],
        {"x": [1, 3, 4, 4]},
        {"y": None},
        initializers,
    )
    read_result, read_record = quantize(read)
    assert View(read_result).ops_reading("scores") == ["QuantizeLinear"]
    assert read_record.result.counts["concats_kept_float"] == 0
    with pytest.raises(PipelineError, match="concat-spread must be >= 1"):
        parse_pipeline("qdq{concat-spread=0.5}")


def test_matmul_weight_per_column_and_float_output(kit: SimpleNamespace, tmp_path: Path) -> None:
    w, b = weights(1, (8, 6), (6,))
    model = kit.model(
        [
            node("MatMul", ["x", "W"], ["m"], name="mm"),
            node("Add", ["m", "b"], ["y"], name="bias"),
            node("MatMul", ["y", "W2"], ["z"], name="mm2"),
            node("Relu", ["z"], ["out"], name="relu"),
        ],
        {"x": ["batch", 3, 8]},
        {"out": None},
        {"W": w, "b": b, "W2": w[:6]},
    )
    result, _ = quantize(model)
    view = View(result)
    q, scale, axis = view.dq("mm", 1)
    assert q.shape == (8, 6) and axis == 1 and scale.shape == (6,)
    assert view.ops_reading("m") == ["Add"]  # no pair between MatMul and its bias
    bias, bias_scale, _ = view.dq("bias", 1)  # the bias is int32, for MatMul+Add -> QGemm
    assert bias.dtype == np.int32
    np.testing.assert_allclose(bias_scale, view.activation_scale("mm", 0)[0] * scale, rtol=1e-6)
    assert view.ops_reading("y") == ["QuantizeLinear"]  # mm2 reads it quantized
    assert view.ops_reading("z") == ["Relu"] and view.ops_reading("out") == []
    ops = fused(result, tmp_path)
    assert ops["MatMulIntegerToFloat"] == 2 and ops["QLinearMatMul"] == 0


def test_a_batched_constant_matmul_b_is_per_tensor_and_runs(
    kit: SimpleNamespace, tmp_path: Path
) -> None:
    """DeBERTa's relative-position keys fold to a constant [heads, K, N] B: per column, its
    1-D zero point made onnxruntime's MatMulIntegerToFloat fail at run time."""
    (w,) = weights(3, (2, 8, 6))
    model = kit.model(
        [node("MatMul", ["x", "W"], ["y"], name="mm")], {"x": [2, 3, 8]}, {"y": None}, {"W": w}
    )
    result, _ = quantize(model)
    q, scale, axis = View(result).dq("mm", 1)
    assert q.shape == (2, 8, 6) and axis is None and np.ndim(scale) == 0
    assert fused(result, tmp_path)["MatMulIntegerToFloat"] == 1


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_axis_follows_trans_b(kit: SimpleNamespace, trans_b: int) -> None:
    w, b = weights(2, (6, 8) if trans_b else (8, 6), (6,))
    model = kit.model(
        [node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=trans_b)],
        {"x": [4, 8]},
        {"y": None},
        {"W": w, "b": b},
    )
    view = View(quantize(model, "qdq{bias-correction=false}", targets=EXACT)[0])  # b exactly, below
    _, scale, axis = view.dq("fc", 1)
    assert axis == (0 if trans_b else 1) and scale.shape == (6,)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1 if trans_b else 0) / 127, rtol=1e-6)
    bias, bias_scale, bias_axis = view.dq("fc", 2)
    x_scale, _ = view.activation_scale("fc", 0)
    np.testing.assert_allclose(bias_scale, x_scale * scale, rtol=1e-6)
    np.testing.assert_array_equal(bias, np.round(b / (x_scale * scale.astype(np.float64))))
    assert bias_axis == 0


@pytest.mark.parametrize(("group", "axis"), [(1, 1), (2, None)])
def test_conv_transpose_axis_one_or_per_tensor_when_grouped(
    kit: SimpleNamespace, group: int, axis: int | None
) -> None:
    w, b = weights(3, (4, 3, 3, 3), (3 * group,))
    model = kit.model(
        [
            node("ConvTranspose", ["x", "W", "b"], ["c"], name="up", group=group),
            node("Relu", ["c"], ["y"], name="relu"),
        ],
        {"x": [1, 4, 5, 5]},
        {"y": None},
        {"W": w, "b": b},
    )
    view = View(quantize(model)[0])
    _, scale, got_axis = view.dq("up", 1)
    assert got_axis == axis and scale.shape == ((3,) if axis == 1 else ())
    assert view.dq("up", 2)[0].dtype == np.int32


def test_concat_inputs_and_output_share_parameters(kit: SimpleNamespace, tmp_path: Path) -> None:
    wa, wb, wc = weights(4, (3, 2, 1, 1), (5, 2, 1, 1), (4, 8, 1, 1))
    model = kit.model(
        [
            node("Conv", ["x", "Wa"], ["a"], name="a"),
            node("Conv", ["x", "Wb"], ["b"], name="b"),
            node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
            node("Conv", ["cat", "Wc"], ["y"], name="c"),
        ],
        {"x": [1, 2, 4, 4]},
        {"y": None},
        {"Wa": wa, "Wb": 3 * wb, "Wc": wc},
    )
    result, _ = quantize(model)
    view = View(result)
    params = {view.activation_scale("cat", i) for i in (0, 1)} | {view.activation_scale("c", 0)}
    assert len(params) == 1  # one scale and zero point across the Concat
    assert fused(result, tmp_path)["QLinearConv"] == 2  # c, a float head, runs in float


def test_residual_add_and_maxpool(kit: SimpleNamespace, tmp_path: Path) -> None:
    w1, w2, w3 = weights(5, (4, 3, 3, 3), (4, 4, 3, 3), (2, 4, 1, 1))
    model = kit.model(
        [
            node("Conv", ["x", "W1"], ["c1"], name="stem", pads=[1, 1, 1, 1]),
            node("Relu", ["c1"], ["r1"], name="relu1"),
            node("MaxPool", ["r1"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
            node("Conv", ["p", "W2"], ["c2"], name="branch", pads=[1, 1, 1, 1]),
            node("Add", ["p", "c2"], ["s"], name="residual"),
            node("Relu", ["s"], ["r2"], name="relu2"),
            node("Conv", ["r2", "W3"], ["y"], name="head"),
        ],
        {"x": [1, 3, 8, 8]},
        {"y": None},
        {"W1": w1, "W2": w2, "W3": w3},
    )
    result, _ = quantize(model)
    view = View(result)
    assert view.activation_scale("pool", 0) == view.activation_scale("branch", 0)
    assert view.activation_scale("residual", 0) == view.activation_scale("branch", 0)
    assert view.producer[view.by_name["residual"].input[1]].op_type == "DequantizeLinear"
    assert view.ops_reading("s") == ["Relu"] and view.ops_reading("r2") == ["QuantizeLinear"]
    ops = fused(result, tmp_path)
    # the head Conv, a graph output, is a float head
    assert ops["QLinearAdd"] == 1 and ops["QLinearConv"] == 2 and ops["Relu"] == 0


def softmax_model(kit: SimpleNamespace) -> onnx.ModelProto:
    w, b = weights(6, (8, 5), (5,))
    return kit.model(
        [
            node("MatMul", ["x", "W"], ["m"], name="mm"),
            node("Add", ["m", "b"], ["logits"], name="bias"),
            node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
        ],
        {"x": [3, 8]},
        {"y": None},
        {"W": w, "b": b},
    )


def test_softmax_stays_float_unless_asked(kit: SimpleNamespace) -> None:
    result, record = quantize(softmax_model(kit))
    view = View(result)
    assert view.ops_reading("logits") == ["Softmax"]
    assert any(r.node == "softmax" and "extra-ops" in r.reason for r in record.result.refusals)
    result, _ = quantize(softmax_model(kit), "qdq{extra-ops=[Softmax]}")
    assert View(result).ops_reading("logits") == ["QuantizeLinear"]


def test_resize_and_gather_share_parameters(kit: SimpleNamespace) -> None:
    w1, w2, table = weights(7, (2, 2, 1, 1), (2, 2, 1, 1), (10, 4))
    model = kit.model(
        [
            node("Conv", ["x", "W1"], ["c"], name="c1"),
            node("Resize", ["c", "", "scales"], ["up"], name="resize", mode="nearest"),
            node("Conv", ["up", "W2"], ["y"], name="c2"),
            node("Gather", ["table", "ids"], ["emb"], name="embed", axis=0),
            node("MatMul", ["emb", "Wt"], ["z"], name="mm"),
        ],
        {"x": [1, 2, 4, 4]},
        {"y": None, "z": None},
        {
            "W1": w1,
            "W2": w2,
            "scales": np.array([1, 1, 2, 2], np.float32),
            "table": table,
            "ids": np.array([1, 3], np.int64),
            "Wt": table[:4, :3],
        },
    )
    view = View(quantize(model)[0])
    assert view.activation_scale("resize", 0) == view.activation_scale("c2", 0)
    q_table, table_scale, _ = view.dq("embed", 0)
    assert q_table.dtype == np.int8
    emb_scale, emb_zero = view.activation_scale("mm", 0)  # Gather output reuses the table's
    assert emb_scale == pytest.approx(float(table_scale)) and emb_zero == 0


@pytest.mark.parametrize("entry", ["conv1", "Relu", "re:conv[1]"])
def test_exclude_by_name_op_type_or_regex(kit: SimpleNamespace, entry: str) -> None:
    result, record = quantize(conv_relu_model(kit), f'qdq{{exclude=["{entry}"]}}')
    view = View(result)
    if entry == "Relu":  # Relu is not quantized anyway: nothing changes
        assert view.input_of("conv1", 1).op_type == "DequantizeLinear"  # type: ignore[union-attr]
        return
    assert view.input_of("conv1", 1) is None  # conv1 keeps its float weights
    assert view.input_of("conv2", 1).op_type == "DequantizeLinear"  # type: ignore[union-attr]
    assert any(r.node == "conv1" and "exclude" in r.reason for r in record.result.refusals)


def test_include_restricts_the_scope(kit: SimpleNamespace) -> None:
    view = View(quantize(conv_relu_model(kit), "qdq{include=[conv2]}")[0])
    assert view.input_of("conv1", 1) is None and view.ops_reading("x") == ["Conv"]
    assert view.dq("conv2", 1)[2] == 0


def gru_model(kit: SimpleNamespace) -> onnx.ModelProto:
    hidden = 32
    w, r, b = weights(8, (1, 3 * hidden, 4), (1, 3 * hidden, hidden), (1, 6 * hidden))
    return kit.model(
        [node("GRU", ["x", "W", "R", "B"], ["seq", "h"], name="gru", hidden_size=hidden)],
        {"x": [6, 2, 4]},
        {"h": None},
        {"W": w, "R": r, "B": b},
    )


def test_gru_is_weight_only(kit: SimpleNamespace) -> None:
    model = gru_model(kit)
    result, record = quantize(model)
    view = View(result)
    for index, shape in ((1, (1, 96, 4)), (2, (1, 96, 32))):
        q, scale, axis = view.dq("gru", index)
        assert q.dtype == np.int8 and q.shape == shape and axis == 1 and scale.shape == (96,)
    assert view.ops_reading("x") == ["GRU"] and "QuantizeLinear" not in kit.ops(result)
    assert view.by_name["gru"].input[3] == "B"  # the bias stays float
    assert record.result.counts["weights_int8_weight_only"] == 2
    assert record.after.bytes < 0.5 * record.before.bytes
    assert record.verification.value < 0.02


def test_fused_lstm_is_weight_only_with_float_peepholes(kit: SimpleNamespace) -> None:
    """A bidirectional LSTM with peepholes and initial states, as fuse-lstm writes it: W and
    R int8 per gate row (axis 1); B and the peepholes P stay float."""
    hidden = 16
    w, r, b, p = weights(
        9, (2, 4 * hidden, 4), (2, 4 * hidden, hidden), (2, 8 * hidden), (2, 3 * hidden)
    )
    model = kit.model(
        [
            node(
                "LSTM",
                ["x", "W", "R", "B", "", "h0", "c0", "P"],
                ["seq", "h", "c"],
                name="lstm",
                hidden_size=hidden,
                direction="bidirectional",
            )
        ],
        {"x": [5, 2, 4], "h0": [2, 2, hidden], "c0": [2, 2, hidden]},
        {"seq": None, "h": None, "c": None},
        {"W": w, "R": r, "B": b, "P": p},
    )
    result, record = quantize(model)
    view = View(result)
    for index, shape in ((1, (2, 64, 4)), (2, (2, 64, 16))):
        q, scale, axis = view.dq("lstm", index)
        assert q.dtype == np.int8 and q.shape == shape and axis == 1 and scale.shape == (64,)
    inputs = view.by_name["lstm"].input
    assert inputs[3] == "B" and inputs[7] == "P" and view.input_of("lstm", 5) is None
    assert record.result.counts["weights_int8_weight_only"] == 2
    assert record.verification.value < 0.02


def test_per_tensor_weights_and_int8_activations(kit: SimpleNamespace) -> None:
    view = View(
        quantize(conv_relu_model(kit), "qdq{per-channel=false,activations=int8}", targets=EXACT)[0]
    )
    _, scale, axis = view.dq("conv1", 1)
    assert axis is None and scale.shape == ()
    dq = view.input_of("conv1", 0)
    assert dq is not None and view.inits[dq.input[2]].dtype == np.int8
    assert int(view.inits[dq.input[2]]) == 0


def test_needs_calibration_data(kit: SimpleNamespace) -> None:
    with pytest.raises(CalibrationError, match="pass 'qdq' needs calibration data"):
        onnxpress.optimize(conv_relu_model(kit), passes="qdq")


def test_old_opset_is_upgraded_for_per_channel(
    kit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = conv_relu_model(kit)
    model.opset_import[0].version = 12
    result, record = quantize(model, targets=["avx512-vnni"])  # full int8 weights: no remedy
    assert [o.version for o in result.opset_import if o.domain == ""] == [13]
    assert {"opset_upgraded": {"from": 12, "to": 13}} in record.result.details
    q, scale, axis = View(result).dq("conv1", 1)
    assert q.dtype == np.int8 and axis == 0 and scale.shape == (4,)

    def refuse(*args: object) -> None:
        raise RuntimeError("no adapter for Conv\nmore detail")

    monkeypatch.setattr("onnxpress.passes.upgrade_opset.version_converter.convert_version", refuse)
    result, record = quantize(model)
    assert "QuantizeLinear" not in kit.ops(result)
    (refusal,) = record.result.refusals
    assert "opset 12" in refusal.reason and "(no adapter for Conv)" in refusal.reason
    result, _ = quantize(model, "qdq{per-channel=false}")  # opset 10 is enough per tensor
    assert View(result).dq("conv1", 1)[2] is None
