"""The compile-time check of backends/tvm/verify.py: the quantization step of an output written
by a normalization is per element (the step above it times |scale| / the row's deviation,
where that amplifies the error); a dynamically quantized model's float outputs are held to
the tolerance beyond onnxruntime's own spread under nudged dynamic quantizers; integer-kernel
ops are checked against exact sums where onnxruntime's kernels saturate int16 pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_helpers import quantize, tie_model

pytest.importorskip("tvm")

from onnxpress.backends.tvm import verify as tvm_verify
from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.targets import parse_target
from onnxpress.backends.tvm.verify import (
    NUDGE,
    dynamic_nudged,
    dynamic_spread,
    input_spread,
    normalized_steps,
    nudged,
    onnxruntime_spread,
    quantization_steps,
    reference_runner,
)
from onnxpress.core.emulated_runner import exact_int8_runner
from onnxpress.core.targets import TARGETS, host_target
from onnxpress.core.verify import Runner, random_inputs

PORTABLE = parse_target("x86-64")


def norm_model(op: str = "LayerNormalization", opset: int = 17) -> onnx.ModelProto:
    """x [2, 6, 32] -> MatMul -> + x -> normalization over the last axis -> Reshape [2, 192]."""
    rng = np.random.default_rng(3)
    gamma = rng.normal(0, 2.0, 32).astype(np.float32)
    gamma[5] = 0.0  # a channel that writes its bias on both sides
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (32, 32)).astype(np.float32), "w"),
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(np.array([2, 192], np.int64), "shape"),
    ]
    inputs = ["s", "gamma"]
    if op == "LayerNormalization":
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "beta"))
        inputs.append("beta")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "x"], ["s"], name="residual"),
        helper.make_node(op, inputs, ["n"], name="norm", axis=-1, epsilon=1e-5),
        helper.make_node("Reshape", ["n", "shape"], ["y"], name="flat"),
    ]
    graph = helper.make_graph(
        nodes,
        "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 192])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).normal(0, 0.3, (2, 6, 32)).astype(np.float32)}


def test_normalized_output_has_a_step_per_element() -> None:
    qdq, _ = quantize(norm_model())
    step = quantization_steps(qdq)["y"]
    assert step is not None
    feed = _feed()
    steps = normalized_steps(qdq, feed, {"y": step})
    assert steps["y"].shape == (2, 192)
    # the step above the LayerNorm times |gamma| / the row's deviation, read at its input,
    # where that gain passes 1 (the zero channel and the small ones keep the step above)
    probe = onnx.ModelProto()
    probe.CopyFrom(qdq)
    probe.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, None))
    s = Runner(probe)(feed)[1].astype(np.float64)
    sigma = np.sqrt(s.var(axis=-1, keepdims=True) + 1e-5)
    gamma = np.abs(numpy_helper.to_array(norm_model().graph.initializer[1]).astype(np.float64))
    want = (step * np.maximum(gamma / sigma, 1.0)).reshape(2, 192)
    np.testing.assert_allclose(steps["y"], want, rtol=1e-6)
    assert np.ptp(steps["y"]) > 0.5 * np.max(steps["y"])  # not one scalar in disguise
    assert np.min(steps["y"]) == pytest.approx(step)  # never finer than the step above
    # the spread is counted in those per-element steps: onnxruntime's result moved by 2.5
    # of them reads 2.5 further from the exact sums, give or take onnxruntime's own spread
    ours = Runner(qdq)(feed)
    base = onnxruntime_spread(qdq, feed, ours, steps)["y"]
    shifted = [ours[0] + (2.5 * steps["y"]).astype(np.float32)]
    assert abs(onnxruntime_spread(qdq, feed, shifted, steps)["y"] - 2.5) <= base + 1e-3


def test_rms_normalization_divides_by_the_root_mean_square() -> None:
    model = norm_model("RMSNormalization", 23)
    qdq, _ = quantize(model)
    step = quantization_steps(qdq)["y"]
    assert step is not None
    feed = _feed()
    probe = onnx.ModelProto()
    probe.CopyFrom(qdq)
    probe.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, None))
    s = Runner(probe)(feed)[1].astype(np.float64)
    rms = np.sqrt((s * s).mean(axis=-1, keepdims=True) + 1e-5)
    gamma = np.abs(numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64))
    want = np.broadcast_to(step * np.maximum(gamma / rms, 1.0), s.shape).reshape(2, 192)
    np.testing.assert_allclose(normalized_steps(qdq, feed, {"y": step})["y"], want, rtol=1e-6)


def test_outputs_not_written_by_a_normalization_keep_their_scalar_step() -> None:
    qdq, _ = quantize(norm_model())
    cut = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(qdq)).extract_model(["x"], ["s"])
    assert quantization_steps(cut)["s"] is not None
    assert normalized_steps(cut, _feed(), quantization_steps(cut)) == {}
    assert normalized_steps(qdq, _feed(), {"y": None}) == {}


def test_compile_checks_a_normalized_output_in_its_steps(tmp_path: Path) -> None:
    qdq, _ = quantize(norm_model())
    result = compile_model(qdq, PORTABLE, tmp_path / "norm")
    check = result.manifest["verification"]
    assert check["metric"] == "max-abs/step (normalized)"
    assert check["errors"]["y"] <= check["limits"]["y"]


def test_spread_counts_a_tie_that_another_float_order_would_round_the_other_way() -> None:
    # a float result on a quantizer's rounding tie lands one level off when computed in
    # another order (a TVM LayerNorm before RoBERTa's first quantizer): onnxruntime's own
    # run with every quantizer's input nudged by a few ulps moves it, and the spread says so
    model = tie_model()
    ties = {"x": (np.arange(12).reshape(1, 12) + 0.5).astype(np.float32) * np.float32(0.25)}
    off = {"x": (np.arange(12).reshape(1, 12) + 0.3).astype(np.float32) * np.float32(0.25)}
    for feed, want in ((ties, 1.0), (off, 0.0)):
        expected = Runner(model)(feed)
        spread = onnxruntime_spread(model, feed, expected, {"y": 0.25})
        assert spread["y"] == pytest.approx(want), feed
    nudged_model = nudged(model, 1.0 + 2.0**-21)
    onnx.checker.check_model(nudged_model)
    quantizer = nudged_model.graph.node[0]
    moved = {t.name: numpy_helper.to_array(t) for t in nudged_model.graph.initializer}
    assert quantizer.input[1] != "s" and moved[quantizer.input[1]] < moved["s"]
    assert nudged_model.graph.node[1].input[1] == "s"  # the DequantizeLinear keeps its scale


def dynamic_conv_net(folder: Path, layers: int = 6) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(float, quantize_dynamic'd) chain of 3x3 Conv + Relu: DynamicQuantizeLinear before
    every ConvInteger, the int32 sums scaled back to float after it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    nodes, inits, x, cin = [], [], "x", 3
    for i in range(layers):
        std = (2.0 / (9 * cin)) ** 0.5
        w = rng.normal(0, std, (8, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.1, 8).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4, name=f"cv{i}"),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        x, cin = f"r{i}", 8
    graph = helper.make_graph(
        nodes,
        "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8, 10, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, folder / "float.onnx")
    quantize_dynamic(folder / "float.onnx", folder / "dynamic.onnx", weight_type=QuantType.QInt8)
    return model, onnx.load(folder / "dynamic.onnx")


def test_dynamic_quantizers_are_nudged_and_the_spread_measured(tmp_path: Path) -> None:
    float_model, model = dynamic_conv_net(tmp_path)
    quantizers = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    assert len(quantizers) == 6
    moved = dynamic_nudged(model, 1.0 + NUDGE)
    onnx.checker.check_model(moved)
    producer = {o: n for n in moved.graph.node for o in n.output}
    for node in moved.graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            assert producer[node.input[0]].op_type == "Mul"
    assert len(moved.graph.node) == len(model.graph.node) + 6
    feed = {"x": np.random.default_rng(3).normal(size=(1, 3, 10, 10)).astype(np.float32)}
    spread = dynamic_spread(model, feed, Runner(model)(feed))
    assert set(spread) == {"r5"} and 0.0 < spread["r5"] < 0.05
    assert dynamic_spread(float_model, feed, Runner(float_model)(feed)) == {}


def test_compile_holds_a_dynamic_model_to_its_spread(tmp_path: Path) -> None:
    # lower-conv-integer's scale-1 DequantizeLinear is not a quantization step of the
    # output: the check was max-abs 1.0 in the output's float units before
    _, model = dynamic_conv_net(tmp_path)
    result = compile_model(model, PORTABLE, tmp_path / "lib")
    check = result.manifest["verification"]
    assert check["metric"] == "max-rel"
    spread = check["onnxruntime_spread"]["r5"]
    assert spread > 0 and check["limits"]["r5"] == pytest.approx(1e-4 + spread)
    assert check["errors"]["r5"] <= check["limits"]["r5"]


def cancelling_matmuls(cancel: bool) -> onnx.ModelProto:
    """y = x @ w1 + x @ w2, with w2 = -w1 + 1e-4 noise when ``cancel`` (the sums cancel to
    about 1e-4 of their size: their rounding is most of the result), else w2 = w1."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(256, 16)).astype(np.float32)
    w2 = (-w1 + 1e-4 * rng.normal(size=(256, 16))).astype(np.float32) if cancel else w1
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"]),
            helper.make_node("MatMul", ["x", "w2"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "cancel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_input_spread_measures_how_far_rounding_at_the_inputs_moves_the_outputs() -> None:
    feed = {"x": np.random.default_rng(1).normal(size=(4, 256)).astype(np.float32)}
    for cancel, low, high in ((True, 1e-3, 0.1), (False, 0.0, 1e-5)):
        runner = Runner(cancelling_matmuls(cancel))
        spread = input_spread(runner, feed, runner(feed))
        assert low < spread["y"] < high, (cancel, spread)
    ids = {"x": np.arange(4, dtype=np.int64)}  # no float input: nothing to move
    gather = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gather", ["table", "x"], ["y"])],
            "lookup",
            [helper.make_tensor_value_info("x", TensorProto.INT64, [4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
            [numpy_helper.from_array(np.ones((8, 3), np.float32), "table")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    runner = Runner(gather)
    assert input_spread(runner, ids, runner(ids)) == {}


def test_compile_holds_an_ill_conditioned_output_to_the_tolerance_beyond_its_spread(
    tmp_path: Path,
) -> None:
    result = compile_model(cancelling_matmuls(True), PORTABLE, tmp_path / "lib")
    check = result.manifest["verification"]
    spread = check["onnxruntime_spread"]["y"]
    assert spread > 1e-3 and check["limits"]["y"] == pytest.approx(1e-4 + spread)
    assert check["errors"]["y"] <= check["limits"]["y"]


def test_max_rel_matches_shared_infinities_and_refuses_others() -> None:
    """A -inf that both runtimes give (a log of zero) is no error; one that only one gives,
    or a NaN against a value, is infinite. The scale is the finite values' largest."""
    from onnxpress.backends.tvm.runtime import max_rel

    ref = np.array([-np.inf, 2.0, -4.0, np.nan], np.float32)
    new = np.array([-np.inf, 2.0, -4.0004, np.nan], np.float32)
    assert max_rel(ref, new) == pytest.approx(1e-4, rel=1e-3)
    assert max_rel(ref, np.array([np.inf, 2.0, -4.0, np.nan], np.float32)) == np.inf
    assert max_rel(ref, np.array([-np.inf, np.nan, -4.0, np.nan], np.float32)) == np.inf
    assert max_rel(ref, np.array([-np.inf, 2.0, -4.0, 1.0], np.float32)) == np.inf


def dynamic_mlp(folder: Path) -> onnx.ModelProto:
    """quantize_dynamic's MLP 64 -> 256 -> 10 with full 8-bit weights (uniform, as torch
    initializes Linear): two MatMulInteger, their zero points both 0."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    w1 = rng.uniform(-0.125, 0.125, (64, 256)).astype(np.float32)
    w2 = rng.uniform(-0.0625, 0.0625, (256, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "f")
    quantize_dynamic(folder / "f", folder / "q", weight_type=QuantType.QInt8)
    return onnx.load(folder / "q")


def test_integer_kernels_are_checked_against_exact_sums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On x86 without VNNI onnxruntime's MatMulInteger sums u8 x s8 pairs in int16 and
    saturates (0.15 max-rel from the exact sums on this MLP), where TVM sums exactly: compile
    refused the library there. The reference now runs on onnxruntime's exact kernels on such
    a CPU (patched to one here, so the check holds on any CPU), after the zero point that
    cleanup shares between the two layers is copied for each (onnxruntime's rewrite to those
    kernels failed on it)."""
    monkeypatch.setattr(tvm_verify, "host_target", lambda: TARGETS["avx2"])
    model = dynamic_mlp(tmp_path)
    assert reference_runner(model) is exact_int8_runner
    result = compile_model(model, PORTABLE, tmp_path / "lib")
    assert result.manifest["verification"]["errors"]["y"] <= 1e-5
    feed = random_inputs(model, 0)[0]
    exact = onnx.reference.ReferenceEvaluator(model).run(None, feed)[0]
    assert np.abs(exact_int8_runner(model)(feed)[0] - exact).max() <= 1e-5 * np.abs(exact).max()
    if host_target().saturates:  # what the check had compared with
        assert np.abs(Runner(model)(feed)[0] - exact).max() > 0.01 * np.abs(exact).max()
