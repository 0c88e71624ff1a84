"""QDQ -> integer lowering on TVM (onnxpress.backends.tvm.int8): structure of the lowered Relax module,
int8 dtypes in the compiled kernels, and numerics against onnxruntime's QDQ run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_helpers import conv_model, quantize, tie_model

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.build import import_relax  # noqa: E402
from onnxpress.backends.tvm.int8 import lower_qdq_to_integer  # noqa: E402
from onnxpress.backends.tvm.int8_kernels import (  # noqa: E402
    AVX2_S16,
    VNNI,
    dot_isa,
    pack_weight,
    packed_gemm,
)
from onnxpress.backends.tvm.prepare import prepare  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402
from onnxpress.backends.tvm.verify import onnxruntime_spread, quantization_steps  # noqa: E402
from onnxpress.core.emulated_runner import EmulatedRunner  # noqa: E402
from onnxpress.core.targets import EXACT  # noqa: E402

HOST = parse_target("x86")
PORTABLE = parse_target("x86-64")  # no VNNI: Relax's own integer conv2d/matmul
HAS_VNNI = dot_isa(tvm_target(HOST)) == VNNI
node = helper.make_node


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def matmul_model() -> onnx.ModelProto:
    """3-D MatMul with a weight, then scores = h . h^T (two activations)."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            node("MatMul", ["x", "w"], ["h0"], name="proj"),
            node("Add", ["h0", "b"], ["h"]),
            node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
            node("MatMul", ["h", "ht"], ["y"], name="scores"),
        ],
        "matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 6])],
        [_init("w", rng.normal(0, 0.3, (10, 20))), _init("b", rng.normal(0, 0.1, 20))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _lowered(model: onnx.ModelProto, spec: object) -> tuple[object, dict[str, object]]:
    mod = import_relax(prepare(model, None))
    lowered, result = lower_qdq_to_integer(mod, tvm_target(spec))
    return lowered, result.to_json()


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_conv_model_lowers_and_matches_onnxruntime(tmp_path: Path, activations: str) -> None:
    qdq, _ = quantize(conv_model(), f"qdq{{activations={activations}}}")
    avx2 = parse_target("avx2")  # vpmaddubsw / vpmaddwd kernels (test_int8_avx2.py)
    for spec in (HOST, PORTABLE, *([avx2] if avx2.runs_here() else [])):
        _, done = _lowered(qdq, spec)
        lowered = done["lowered"]
        assert isinstance(lowered, dict)
        assert lowered == {"conv2d": 2, "conv2d (grouped)": 1, "max_pool2d": 1, "matmul": 1}
        result = compile_model(qdq, spec, tmp_path / spec.name)
        check = result.manifest["verification"]
        assert check["metric"] in ("max-abs/step", "max-abs/step, max-rel")
        assert check["errors"]["y"] <= 1.0  # within one quantization step of onnxruntime
        spread = check["onnxruntime_spread"]["y"]  # shallow: onnxruntime near exact sums
        assert 0.0 <= spread < 1.0 and check["limits"]["y"] == pytest.approx(1.0 + spread)
        # the host's own kernels: vpdpbusd with VNNI, AVX2's pair (int16) kernels without
        kernel = {VNNI: "vnni", AVX2_S16: "avx2"}.get(dot_isa(tvm_target(spec)), "relax")
        assert result.manifest["int8"]["kernel"] == kernel
        if kernel == "avx2":  # the 3-channel stem on the packed int16 / u8 x s8 GEMM
            assert result.manifest["int8"]["layers"][0]["kernel"].startswith("avx2-")


def conv1d_model() -> onnx.ModelProto:
    """Conv1d (bias, same padding) -> Relu -> grouped strided Conv1d: an audio front end."""
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [
            node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1], name="conv1"),
            node("Relu", ["c1"], ["r1"]),
            node("Conv", ["r1", "w2"], ["y"], strides=[2], group=4, name="conv2"),
        ],
        "conv1d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 15])],
        [
            _init("w1", rng.normal(0, 0.3, (16, 8, 3))),
            _init("b1", rng.normal(0, 0.1, 16)),
            _init("w2", rng.normal(0, 0.3, (16, 4, 4))),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv1d_lowers_to_integer_kernels(tmp_path: Path) -> None:
    # as a conv2d of height 1; Relax's float form of a quantized Conv1d could land a level
    # off the exact sums (wav2vec2's dynamo export: 3.1 steps, after: 3e-5)
    qdq, _ = quantize(conv1d_model())
    for spec in (HOST, PORTABLE):
        _, done = _lowered(qdq, spec)
        assert done["lowered"] == {"conv2d": 1, "conv2d (grouped)": 1}
        result = compile_model(qdq, spec, tmp_path / spec.name)
        assert result.manifest["verification"]["errors"]["y"] <= 1.0


def conv3d_model() -> onnx.ModelProto:
    """Conv3d (bias, padded, strided in depth) -> Relu -> Conv3d dilated in depth: a video
    front end."""
    rng = np.random.default_rng(6)
    graph = helper.make_graph(
        [
            node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 6, strides=[2, 1, 1], name="c1"),
            node("Relu", ["c1"], ["r1"]),
            node("Conv", ["r1", "w2"], ["y"], dilations=[2, 1, 1], pads=[2, 0, 0, 1, 0, 0]),
        ],
        "conv3d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 7, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 4, 6])],
        [
            _init("w1", rng.normal(0, 0.3, (16, 4, 3, 3, 3))),
            _init("b1", rng.normal(0, 0.1, 16)),
            _init("w2", rng.normal(0, 0.3, (8, 16, 2, 3, 1))),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv3d_lowers_to_integer_kernels(tmp_path: Path) -> None:
    # as a conv2d over its depth taps stacked as channels, taken from the 8-bit values
    # (padded with the zero point: the relu's uint8 zero point is 0, the input's is not)
    qdq, _ = quantize(conv3d_model())
    for spec in (HOST, PORTABLE):
        _, done = _lowered(qdq, spec)
        assert done["lowered"] == {"conv2d": 2} and not done["kept_float"]
        result = compile_model(qdq, spec, tmp_path / spec.name)
        assert result.manifest["verification"]["errors"]["y"] <= 1.0


def test_u8_weights_lower_like_int8(tmp_path: Path) -> None:
    """Weights that qdq{saturation=u8} moved to uint8 (zero point 128) lower to the same
    integer kernels as their int8 values, and match onnxruntime's u8 x u8 run."""
    qdq, _ = quantize(conv_model(), "qdq{saturation=u8,saturation-tolerance=0}", targets=["avx2"])
    u8 = [t for t in qdq.graph.initializer if t.data_type == TensorProto.UINT8 and t.dims]
    assert any(len(t.dims) == 4 for t in u8), "some conv weight is u8"
    _, done = _lowered(qdq, PORTABLE)
    assert done["lowered"] == {"conv2d": 2, "conv2d (grouped)": 1, "max_pool2d": 1, "matmul": 1}
    result = compile_model(qdq, PORTABLE, tmp_path / "u8")
    assert result.manifest["verification"]["errors"]["y"] <= 1.0


def test_lowered_module_has_no_float_conv_and_int8_kernels() -> None:
    qdq, _ = quantize(conv_model())
    before = import_relax(prepare(qdq, None))
    lowered, result = lower_qdq_to_integer(before, tvm_target(PORTABLE))
    convs = [line for line in lowered.script().splitlines() if "R.nn.conv2d(" in line]
    assert len(convs) == 3
    for line in convs[:2]:  # lv: R.Tensor(shape, dtype="int32") = R.nn.conv2d(uint8, int8 W)
        assert 'dtype="int32") = R.nn.conv2d(' in line and 'out_dtype="int32"' in line
    # the depthwise conv: a float conv of the 8-bit values (exact sums), cast to int32
    assert [layer["kernel"] for layer in result.layers] == ["relax", "relax", "float-exact-grouped", "relax"]  # fmt: skip
    assert "R.astype(lv" in lowered.script() and "R.nn.conv2d(" in convs[2]
    float_convs = [line for line in before.script().splitlines() if "R.nn.conv2d(" in line]
    assert all('dtype="float32") = R.nn.conv2d(' in line for line in float_convs)


@pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no AVX512-VNNI")
def test_vnni_kernel_is_exact_and_uses_vpdpbusd(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows, depth, cols = 8, 36, 32
    a = rng.integers(0, 256, (rows, depth), dtype=np.uint8)
    w = rng.integers(-128, 128, (depth, cols), dtype=np.int8)
    func = packed_gemm(VNNI, rows, depth, cols)
    assert "vpdpbusd" in func.script()
    shapes = [([int(d) for d in p.shape], str(p.dtype)) for p in func.params]  # the buffers
    assert shapes == [([8, 36], "uint8"), ([2, 9, 16, 4], "int8"), ([8, 32], "int32")]
    lib = tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm_target(HOST)
    )
    out = tvm.runtime.tensor(np.zeros((rows, cols), np.int32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(pack_weight(VNNI, w)), out)
    np.testing.assert_array_equal(out.numpy(), a.astype(np.int64) @ w.astype(np.int64))
    qdq, _ = quantize(conv_model())
    result = compile_model(qdq, HOST, tmp_path / "vnni")
    if shutil.which("objdump"):
        asm = subprocess.run(
            ["objdump", "-d", str(result.library)], capture_output=True, text=True, check=True
        ).stdout
        assert "vpdpbusd" in asm


def test_weight_matmul_lowers_and_two_activations_stay_float(tmp_path: Path) -> None:
    qdq, _ = quantize(matmul_model())
    _, done = _lowered(qdq, HOST)
    assert done["lowered"] == {"matmul": 1}
    assert done["kept_float"] == {"matmul: two activations (kept in float: faster)": 1}
    result = compile_model(qdq, HOST, tmp_path / "mm")
    assert result.manifest["verification"]["errors"]["y"] <= 1.0


def test_int8_off_keeps_float_fake_quant(tmp_path: Path) -> None:
    qdq, _ = quantize(matmul_model())
    result = compile_model(qdq, PORTABLE, tmp_path / "off", int8="off")
    assert result.manifest["int8"] is None
    assert result.manifest["verification"]["metric"] == "max-rel"


def test_float_model_is_not_touched(tmp_path: Path) -> None:
    result = compile_model(matmul_model(), PORTABLE, tmp_path / "float")
    assert result.manifest["int8"] is None


def test_quantization_step_of_outputs() -> None:
    qdq, _ = quantize(conv_model())
    steps = quantization_steps(qdq)
    # y = Gemm(DQ(activation), DQ(weight)) + bias: one step of the activation read by the Gemm
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    gemm = producer["y"]
    dq = producer[gemm.input[0]]
    assert dq.op_type == "DequantizeLinear"
    assert steps["y"] == pytest.approx(float(inits[dq.input[1]]))
    assert quantization_steps(conv_model()) == {"y": None}


def test_a_quantized_output_is_checked_in_levels(tmp_path: Path) -> None:
    # a model whose output is the 8-bit tensor itself (cut after a QuantizeLinear): its
    # error is counted in levels; it read as levels / scale "steps" and failed the check
    qdq, _ = quantize(conv_model())
    producer = {o: n for n in qdq.graph.node for o in n.output}
    gemm_input = producer[producer["y"].input[0]]  # the Gemm's activation DequantizeLinear
    quantized = gemm_input.input[0]
    cut = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(qdq)).extract_model(
        ["x"], [quantized]
    )
    assert quantization_steps(cut) == {quantized: 1.0}
    result = compile_model(cut, PORTABLE, tmp_path / "levels")
    check = result.manifest["verification"]
    assert check["metric"].startswith("max-abs/step") and check["errors"][quantized] <= 1.0


def test_spread_is_onnxruntime_s_distance_from_exact_sums_in_steps() -> None:
    qdq, _ = quantize(conv_model())
    step = quantization_steps(qdq)["y"]
    assert step is not None
    feed = {"x": np.random.default_rng(4).normal(size=(1, 3, 9, 9)).astype(np.float32)}
    exact = EmulatedRunner(qdq, EXACT)(feed)
    # the exact result is 0 steps from itself; onnxruntime's runs (its quantizers' inputs
    # nudged by a few ulps, verify.nudged) land within float rounding of it on this input
    assert onnxruntime_spread(qdq, feed, exact, {"y": step})["y"] == pytest.approx(0.0, abs=1e-4)
    shifted = [exact[0] + np.float32(2.5 * step)]
    assert onnxruntime_spread(qdq, feed, shifted, {"y": step})["y"] == pytest.approx(2.5, 1e-3)
    assert onnxruntime_spread(qdq, feed, shifted, {"y": None}) == {}


def test_quantize_rounds_ties_to_even_here_and_in_cuda_source(tmp_path: Path) -> None:
    """ONNX rounds half to even. Relax legalizes quantize with TIR round, which TVM lowers
    to llvm.nearbyint on CPUs and nearbyintf in CUDA source (not roundf: ties away)."""
    halves = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49, 7.5, -7.5, 100.5, -200.5]
    x = np.array([halves], np.float32) * np.float32(0.25)
    expected = np.array([[0, 2, 2, 4, 0, -2, -2, 0, 8, -8, 100, -128]], np.float32) * 0.25
    for int8 in ("auto", "off"):
        result = compile_model(tie_model(), HOST, tmp_path / int8, int8=int8)
        got = CompiledModel(result.library)(x)[0]
        np.testing.assert_array_equal(got, expected)
    compile_model(tie_model(), "cuda:sm_80", tmp_path / "cuda")
    blob = (tmp_path / "cuda" / "model.so").read_bytes()
    assert b"nearbyintf" in blob and b"roundf(" not in blob


def test_hand_scheduled_kernels_are_left_alone_by_the_default_schedules() -> None:
    """dlight skips a PrimFunc only with ``tirx.is_scheduled``: with the older ``tir.`` name
    the CPU rules rescheduled im2col into one parallel loop of 4.9 M iterations (a 0.26 ms
    copy took 9.3 ms in ResNet-18 at batch 8) and the packed int8 GEMMs as well."""
    from onnxpress.backends.tvm.int8_kernels import im2col
    from onnxpress.backends.tvm.schedule import schedule_rules

    target = tvm_target(HOST)
    kernels = {
        "im2col": im2col((1, 30, 30, 3), (7, 7), (2, 2), (1, 1), (12, 12), 144, 148),
        "gemm": packed_gemm(VNNI, 32, 64, 32),
    }
    for name, func in kernels.items():
        assert func.attrs["tirx.is_scheduled"], name
        mod = tvm.IRModule({"main": func})
        with target:
            scheduled = tvm.s_tir.dlight.ApplyDefaultSchedule(*schedule_rules(target))(mod)
        tvm.ir.assert_structural_equal(scheduled["main"], func)
