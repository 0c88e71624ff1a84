"""conv_as_conv2d.py: float Conv1d runs as a conv2d of height 1 in the blocked layout (plain,
strided to an output length with no vector-width divisor, padded, dilated, grouped and
depthwise), Conv3d as a conv2d over its depth taps stacked as channels (strided, padded,
dilated in depth; grouped ones left alone), symbolic lengths keep Relax's conv1d, and
compiled models match onnxruntime on this CPU and in AVX2 code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from tvm_kernels import compiled_xy, relax_calls, relu_chain, xy_model

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.build import import_relax  # noqa: E402
from onnxpress.backends.tvm.conv_as_conv2d import conv_as_conv2d_pass  # noqa: E402
from onnxpress.backends.tvm.prepare import prepare  # noqa: E402
from onnxpress.backends.tvm.schedule import layout_passes  # noqa: E402

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
# (out channels, kernel, stride, pads, dilation, group) of each layer; 24 channels in
LAYERS = [
    (32, 3, 2, (0, 0), 1, 1),  # 75 -> 37 samples: no vector width divides 37
    (32, 5, 1, (2, 2), 2, 4),  # grouped, dilated, padded: 37 -> 33
    (32, 3, 1, (1, 1), 1, 32),  # depthwise
    (20, 2, 2, (0, 1), 1, 1),  # asymmetric padding, 20 channels (a padded block)
]


def conv1d_net(length: int = 75) -> onnx.ModelProto:
    """Conv1d layers of LAYERS with biases and a GELU-like Tanh between them."""
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits = []
    channels, name = 24, "x"
    for index, (out, kernel, stride, pads, dilation, group) in enumerate(LAYERS):
        w = rng.normal(size=(out, channels // group, kernel)).astype(np.float32) * 0.3
        b = rng.normal(size=out).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"w{index}"), numpy_helper.from_array(b, f"b{index}")]
        conv = f"c{index}"
        nodes.append(
            helper.make_node(
                "Conv",
                [name, f"w{index}", f"b{index}"],
                [conv],
                kernel_shape=[kernel],
                strides=[stride],
                pads=[pads[0], pads[1]],
                dilations=[dilation],
                group=group,
            )
        )
        name = f"t{index}" if index < len(LAYERS) - 1 else "y"
        nodes.append(helper.make_node("Tanh", [conv], [name]))
        channels = out
    return xy_model(nodes, inits, [1, 24, length], [1, 20, 17])


def test_every_conv1d_becomes_a_blocked_conv2d() -> None:
    mod = import_relax(prepare(conv1d_net()))
    assert relax_calls(mod).count("relax.nn.conv1d") == 4
    with AVX512:
        ops = relax_calls(tvm.transform.Sequential(layout_passes(AVX512))(mod))
    assert "relax.nn.conv1d" not in ops and "relax.nn.conv2d" not in ops
    kernels = [op for op in ops if op.endswith("_nchwc")]
    assert kernels == ["conv2d_nchwc", "group_conv2d_nchwc", "depthwise_nchwc", "conv2d_nchwc"]
    # one conversion back to NCW, after the last layer (height_one.py: the Tanh between
    # layers runs on the 4-D tensors)
    assert ops.count("from_blocked") == 1 and ops.count("relax.squeeze") == 1


def test_the_rewrite_keeps_the_convolution_s_arithmetic() -> None:
    mod = import_relax(prepare(conv1d_net()))
    rewritten = conv_as_conv2d_pass()(mod)
    text = rewritten["main"].script()
    assert "R.nn.conv1d" not in text and text.count("R.nn.conv2d") == 4
    assert "strides=[1, 2]" in text and "dilation=[1, 2]" in text and "groups=32" in text
    assert "padding=[0, 0, 0, 1]" in text  # (top, left, bottom, right): width's 0 and 1
    x = np.random.default_rng(1).standard_normal((1, 24, 75)).astype(np.float32)
    results = []
    for module in (mod, rewritten):
        built = tvm.compile(module, target="llvm")
        vm = relax.VirtualMachine(built, tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x))
        results.append((out if hasattr(out, "numpy") else out[0]).numpy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_a_symbolic_length_or_another_dtype_keeps_relax_s_conv1d() -> None:
    def module(length: Any, dtype: str) -> Any:
        builder = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 8, length), dtype))
        w = relax.const(np.ones((4, 8, 3), dtype))
        with builder.function("main", [x]):
            out = builder.emit(relax.op.nn.conv1d(x, w))
            builder.emit_func_output(out)
        return builder.get()

    def rewritten(length: Any, dtype: str) -> str:
        return str(conv_as_conv2d_pass()(module(length, dtype))["main"].script())

    assert "R.nn.conv1d" not in rewritten(16, "float32")
    assert "R.nn.conv1d" in rewritten(tvm.tirx.Var("n", "int64"), "float32")
    assert "R.nn.conv1d" in rewritten(16, "float16")


@pytest.mark.parametrize("target", ["x86", "avx2"])  # this CPU, AVX2 code (8 lanes)
def test_compiled_conv1d_model_matches_onnxruntime(target: str, tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((1, 24, 75)).astype(np.float32)
    got, expected = compiled_xy(conv1d_net(), target, tmp_path / "out", x)
    assert got.shape == expected.shape == (1, 20, 17)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# (out channels, kernel, strides, pads (begins, ends), dilations, group); 6 channels in
LAYERS_3D = [
    (16, (3, 3, 3), (2, 1, 1), (1, 1, 1, 1, 1, 1), (1, 1, 1), 1),  # 7 -> 4 in depth
    (16, (2, 3, 1), (1, 2, 1), (1, 0, 0, 0, 1, 0), (2, 1, 1), 1),  # dilated in depth
    (16, (3, 1, 1), (1, 1, 1), (1, 0, 0, 1, 0, 0), (1, 1, 1), 4),  # grouped: left alone
    (8, (1, 1, 1), (2, 2, 2), (0, 0, 0, 0, 0, 0), (1, 1, 1), 1),  # 1x1x1, stride 2
]


def conv3d_net() -> onnx.ModelProto:
    """Conv3d layers of LAYERS_3D with biases and Relu between them, x [1, 6, 7, 9, 10]."""
    layers = [
        (out, kernel, {"strides": s, "pads": p, "dilations": d, "group": g})
        for out, kernel, s, p, d, g in LAYERS_3D
    ]
    return relu_chain("Conv", layers, [1, 6, 7, 9, 10], [1, 8, 2, 2, 5])


def test_conv3d_becomes_a_blocked_conv2d_over_stacked_depth_taps() -> None:
    mod = import_relax(prepare(conv3d_net()))
    rewritten = conv_as_conv2d_pass()(mod)["main"].script()
    assert rewritten.count("R.nn.conv3d") == 1 and "groups=4" in rewritten  # the grouped one
    assert rewritten.count("R.nn.conv2d") == 3
    # three depth taps of 6 channels, two of 16 (the dilated one), none to stack for 1x1x1
    assert rewritten.count("R.concat") == 2
    with AVX512:
        ops = relax_calls(tvm.transform.Sequential(layout_passes(AVX512))(mod))
    assert [op for op in ops if op.endswith("_nchwc")] == ["conv2d_nchwc"] * 3
    assert ops.count("relax.nn.conv3d") == 1


@pytest.mark.parametrize("target", ["x86", "avx2"])
def test_compiled_conv3d_model_matches_onnxruntime(target: str, tmp_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((1, 6, 7, 9, 10)).astype(np.float32)
    got, expected = compiled_xy(conv3d_net(), target, tmp_path / "out", x)
    assert got.shape == expected.shape == (1, 8, 2, 2, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
