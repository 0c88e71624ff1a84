"""LSTM on TVM as a loop (onnxpress.backends.tvm.lstm): every direction, peepholes, initial states,
layouts, checked against onnxruntime (layout=1 against onnx's reference evaluator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.build import build, export, import_relax
from onnxpress.backends.tvm.prepare import (
    LOOP_GRU_PIPELINE,
    PREPARE_PIPELINE,
    UnsupportedOpsError,
    prepare,
    with_dynamic_lstm,
)
from onnxpress.backends.tvm.runtime import CompiledModel, run_compiled
from onnxpress.backends.tvm.targets import parse_target
from onnxpress.core.manager import VerifyConfig

STEPS, BATCH, IN, HID = 5, 2, 3, 4


def lstm_model(
    direction: str = "forward",
    *,
    peepholes: bool = True,
    states: bool = True,
    layout: int = 0,
    steps: int = STEPS,
    **attrs: object,
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    inits = {
        "W": rng.normal(0, 0.5, (dirs, 4 * HID, IN)),
        "R": rng.normal(0, 0.5, (dirs, 4 * HID, HID)),
        "B": rng.normal(0, 0.5, (dirs, 8 * HID)),
        "P": rng.normal(0, 0.5, (dirs, 3 * HID)),
    }
    x_shape = [BATCH, steps, IN] if layout else [steps, BATCH, IN]
    s_shape = [BATCH, dirs, HID] if layout else [dirs, BATCH, HID]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "B", "", "", "", "P" if peepholes else ""]
    if states:
        names[5:7] = ["h0", "c0"]
        inputs += [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, s_shape) for n in ("h0", "c0")
        ]
    while not names[-1]:
        names.pop()
    node = helper.make_node(
        "LSTM",
        names,
        ["Y", "Y_h", "Y_c"],
        name="lstm",
        hidden_size=HID,
        direction=direction,
        layout=layout,
        **attrs,
    )
    graph = helper.make_graph(
        [node],
        "lstm",
        inputs,
        [helper.make_empty_tensor_value_info(o) for o in ("Y", "Y_h", "Y_c")],
        [
            numpy_helper.from_array(v.astype(np.float32), k)
            for k, v in inits.items()
            if k != "P" or peepholes
        ],
    )
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("peepholes", [True, False])
def test_loop_lstm_matches_onnxruntime(tmp_path: Path, direction: str, peepholes: bool) -> None:
    model = lstm_model(direction, peepholes=peepholes, states=peepholes)
    result = compile_model(model, "x86", tmp_path / "lstm")
    errors = result.manifest["verification"]["errors"]
    assert set(errors) == {"Y", "Y_h", "Y_c"} and max(errors.values()) <= 1e-4


def test_batch_first_layout(tmp_path: Path) -> None:
    model = lstm_model("bidirectional", layout=1)
    prepared = prepare(model, pipeline=LOOP_GRU_PIPELINE, verify=VerifyConfig(level="structure"))
    target = parse_target("x86")
    library = export(build(import_relax(prepared), target), target, tmp_path)
    rng = np.random.default_rng(1)
    feed = {
        "X": rng.standard_normal((BATCH, STEPS, IN)).astype(np.float32),
        "h0": rng.standard_normal((BATCH, 2, HID)).astype(np.float32),
        "c0": rng.standard_normal((BATCH, 2, HID)).astype(np.float32),
    }
    expected = ReferenceEvaluator(model).run(None, feed)
    got = CompiledModel(library)(*feed.values())
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_long_lstm_stays_one_loop(tmp_path: Path) -> None:
    model = lstm_model(steps=300, states=False)
    text = import_relax(prepare(model, pipeline=LOOP_GRU_PIPELINE)).script()
    assert text.count("R.call_tir(") == 1 and "for step in range(300)" in text
    result = compile_model(model, "x86", tmp_path / "long")
    assert max(result.manifest["verification"]["errors"].values()) <= 1e-4


def test_unsupported_lstm_attributes_are_named() -> None:
    model = lstm_model(input_forget=1)
    with pytest.raises(UnsupportedOpsError, match=r"LSTM \(input_forget\) \(1: 'lstm'\)"):
        import_relax(prepare(model, pipeline=LOOP_GRU_PIPELINE))


def test_masked_lstm_is_unrolled_with_its_lengths(tmp_path: Path) -> None:
    """A fused masked loop (sequence_lens) goes through lower-lstm{masked-only=true}: the loop
    kernel runs full-length sequences only. Checked on lengths 0..T against onnxruntime."""
    from rnn_exports import masked_loop

    import onnxpress

    fused, _ = onnxpress.optimize(masked_loop("lstm", 4, "bidirectional"))
    assert "LSTM" in {n.op_type for n in fused.graph.node}
    result = compile_model(fused, "x86", tmp_path / "m", input_shapes={"x": [3, 4, 3], "lens": [3]})
    passes = {p["name"]: p["counts"] for p in result.manifest["prepare"]["passes"]}
    assert passes["lower-lstm"]["lstm_lowered"] == 1
    feed = {
        "x": np.random.default_rng(0).standard_normal((3, 4, 3)).astype(np.float32),
        "lens": np.array([4, 0, 2], np.int64),
    }
    expected = onnxpress.core.verify.Runner(fused)(feed)
    got = run_compiled(tmp_path / "m", feed)
    for want, have in zip(expected, got.values(), strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_fast_activations_and_packed_weights() -> None:
    """The recurrence kernels' sigmoid / tanh polynomials (vectorized with the step) stay
    within 1e-6 of numpy, and R^T is packed so that block b holds units b*U .. b*U+U of
    every gate for every k."""
    tvm = pytest.importorskip("tvm")
    from tvm.script import tirx as T

    from onnxpress.backends.tvm.rnn import fast_exp, fast_sigmoid, fast_tanh, packed_recurrent

    @T.prim_func
    def activations(
        x: T.Buffer((64,), "float32"),
        e: T.Buffer((64,), "float32"),
        s: T.Buffer((64,), "float32"),
        h: T.Buffer((64,), "float32"),
    ) -> None:
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "global_symbol": "main"})
        for i in T.vectorized(64):
            e[i] = fast_exp(x[i])
            s[i] = fast_sigmoid(x[i])
            h[i] = fast_tanh(x[i])

    library = tvm.compile(tvm.IRModule({"main": activations}), target="llvm")
    x = np.linspace(-12, 12, 64).astype(np.float32)
    out = [tvm.runtime.tensor(np.zeros(64, np.float32)) for _ in range(3)]
    library["main"](tvm.runtime.tensor(x), *out)
    e, s, h = (o.numpy().astype(np.float64) for o in out)
    np.testing.assert_allclose(e, np.exp(x.astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(s, 1 / (1 + np.exp(-x.astype(np.float64))), atol=1e-6)
    np.testing.assert_allclose(h, np.tanh(x.astype(np.float64)), atol=1e-6)

    r = np.arange(4 * 32 * 32, dtype=np.float32).reshape(4 * 32, 32)  # [G*H, H], H = 32
    packed = packed_recurrent(r, 4)
    assert packed.shape == (2, 32, 4, 16)  # 16-unit blocks
    block, k, gate, unit = 1, 5, 2, 3
    assert packed[block, k, gate, unit] == r[gate * 32 + block * 16 + unit, k]


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_dynamically_quantized_lstm_compiles_as_onnxruntime_runs_it(
    tmp_path: Path, per_channel: bool
) -> None:
    """quantize_dynamic's DynamicQuantizeLSTM: lowered by lower-dynamic-lstm at prepare, and
    the library matches onnxruntime's contrib kernel (not the float LSTM)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(lstm_model("bidirectional", states=True), tmp_path / "float.onnx")
    quantize_dynamic(
        tmp_path / "float.onnx",
        tmp_path / "dynamic.onnx",
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        reduce_range=True,  # no int16 saturation in onnxruntime's AVX2 kernel (see passes)
    )
    model = onnx.load(tmp_path / "dynamic.onnx")
    assert "DynamicQuantizeLSTM" in {n.op_type for n in model.graph.node}
    result = compile_model(model, "x86", tmp_path / "dynamic")
    assert result.report is not None
    lowering = next(p for p in result.report.passes if p.name == "lower-dynamic-lstm")
    assert lowering.result.counts["dynamicquantizelstm_lowered"] == 1
    errors = result.manifest["verification"]["errors"]
    assert set(errors) == {"Y", "Y_h", "Y_c"} and max(errors.values()) <= 1e-4


def test_only_a_model_with_the_contrib_lstm_gets_its_lossy_lowering() -> None:
    """lower-dynamic-lstm is lossy: in every compile's pipeline it would switch the passes
    after it to onnxruntime's integer kernels on a QDQ model (a QDQ conv net then failed
    cleanup's check against fake-quant outputs). It runs after fold-constants, and only
    where the op is."""
    plain = lstm_model("forward")
    assert with_dynamic_lstm(plain, LOOP_GRU_PIPELINE) == LOOP_GRU_PIPELINE
    contrib = onnx.ModelProto()
    contrib.CopyFrom(plain)
    contrib.graph.node[0].op_type = "DynamicQuantizeLSTM"
    contrib.graph.node[0].domain = "com.microsoft"
    for pipeline in (LOOP_GRU_PIPELINE, PREPARE_PIPELINE):
        passes = with_dynamic_lstm(contrib, pipeline).split(",")
        assert passes[passes.index("fold-constants") + 1] == "lower-dynamic-lstm"
