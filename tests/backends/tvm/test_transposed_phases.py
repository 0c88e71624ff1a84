"""transposed_phases.py: a strided ConvTranspose runs as one conv2d over its output phases
(pose heads' 4x4 stride 2, odd kernels, output padding, unequal strides, stride 1; 1-D ones
through conv_as_conv2d.py's height-1 form, a HiFi-GAN upsampler's 16 / stride 8) in the
blocked layout, a kernel equal to its stride keeps the blocked upsample kernel, grouped
ones keep Relax's form, and compiled models match onnxruntime on this CPU and in AVX2
code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from tvm_kernels import compiled_xy, relax_calls, relu_chain, run_relax

tvm = pytest.importorskip("tvm")


from onnxpress.backends.tvm.build import import_relax  # noqa: E402
from onnxpress.backends.tvm.prepare import prepare  # noqa: E402
from onnxpress.backends.tvm.schedule import layout_passes  # noqa: E402
from onnxpress.backends.tvm.transposed_phases import (  # noqa: E402
    phase_weight,
    transposed_as_phases_pass,
)

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
# (out channels, kernel, strides, pads (top, left, bottom, right), output padding, group)
LAYERS = [
    (24, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), 1),  # pose / DCGAN upsampling: 5x6 -> 10x12
    (16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),  # output padding: 10x12 -> 20x24
    (8, (5, 3), (3, 1), (2, 1, 2, 1), (0, 0), 1),  # unequal strides, odd kernels
    (8, (3, 3), (1, 1), (1, 1, 1, 1), (0, 0), 1),  # stride 1: a flipped-kernel conv
    (8, (2, 2), (2, 2), (0, 0, 0, 0), (0, 0), 1),  # kernel = stride: the upsample kernel
    (8, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), 2),  # grouped: left to Relax
]


def deconv_net() -> onnx.ModelProto:
    """ConvTranspose layers of LAYERS with biases and Relu between them, x [1, 12, 5, 6]."""
    layers = []
    for out, kernel, strides, pads, output_padding, group in LAYERS:
        attrs = {"strides": strides, "pads": pads, "group": group}
        layers.append(
            (
                out,
                kernel,
                attrs | ({"output_padding": output_padding} if any(output_padding) else {}),
            )
        )
    # rows: 5 -> 10 -> 20 -> 58 -> 58 -> 116 -> 232; columns 6 -> 12 -> 24 -> 24 -> 24 -> 48 -> 96
    return relu_chain("ConvTranspose", layers, [1, 12, 5, 6], [1, 8, 232, 96])


def test_strided_transposed_convs_become_blocked_conv2d() -> None:
    mod = import_relax(prepare(deconv_net()))
    assert relax_calls(mod).count("relax.nn.conv2d_transpose") == 6
    with AVX512:
        ops = relax_calls(tvm.transform.Sequential(layout_passes(AVX512))(mod))
    assert ops.count("relax.nn.conv2d_transpose") == 1  # the grouped one
    blocked = [op for op in ops if op.endswith("_nchwc")]
    assert blocked.count("conv2d_nchwc") == 4 and blocked.count("upsample_nchwc") == 1


def test_phase_weight_puts_each_tap_in_its_phase() -> None:
    w = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)  # [C, O, kh, kw]
    phased = phase_weight(w, (2, 2))
    assert phased.shape == (3 * 2 * 2, 2, 2, 2)
    # output channel o = 1, phase (1, 0): tap (a, b) reads w[:, 1, 1 + (1 - a) * 2, (1 - b) * 2]
    np.testing.assert_array_equal(phased[1 * 4 + 1 * 2 + 0, :, 0, 1], w[:, 1, 3, 0])
    np.testing.assert_array_equal(phased[1 * 4 + 1 * 2 + 0, :, 1, 0], w[:, 1, 1, 2])
    odd = phase_weight(np.ones((1, 1, 3, 3), np.float32), (2, 2))  # 3 taps: phase 1 has one
    assert odd.shape == (4, 1, 2, 2) and odd[3].sum() == 1 and odd[0].sum() == 4


def test_the_rewrite_matches_relax_s_transposed_conv() -> None:
    mod = import_relax(prepare(deconv_net()))
    rewritten = transposed_as_phases_pass()(mod)
    assert relax_calls(rewritten).count("relax.nn.conv2d_transpose") == 2  # grouped, k = s
    x = np.random.default_rng(1).standard_normal((1, 12, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(run_relax(rewritten, x), run_relax(mod, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["x86", "avx2"])  # this CPU, AVX2 code (8 lanes)
def test_compiled_deconv_model_matches_onnxruntime(target: str, tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((1, 12, 5, 6)).astype(np.float32)
    got, expected = compiled_xy(deconv_net(), target, tmp_path / "out", x)
    assert got.shape == expected.shape == (1, 8, 232, 96)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_quantized_model_s_float_transposed_conv_takes_the_phases_too() -> None:
    """int8.py keeps a QDQ ConvTranspose float; its weight is a DequantizeLinear of a
    constant until constant folding, after which the pass runs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.integers(-127, 128, (12, 8, 4, 4)).astype(np.int8), "wq")
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
        helper.make_node(
            "ConvTranspose",
            ["xd", "wd"],
            ["y"],
            kernel_shape=[4, 4],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_deconv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 12])],
        [w, scale, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mod = import_relax(prepare(model))
    with AVX512:
        ops = relax_calls(tvm.transform.Sequential(layout_passes(AVX512))(mod))
    assert "relax.nn.conv2d_transpose" not in ops and "conv2d_nchwc" in ops


# ConvTranspose1d layers: a HiFi-GAN upsampler (16, stride 8), output padding, stride 1,
# grouped; (out channels, kernel, attributes); x [1, 16, 9]
LAYERS_1D = [
    (12, (16,), {"strides": [8], "pads": [4, 4]}),  # 9 -> 72 samples
    (8, (4,), {"strides": [2], "pads": [1, 1], "output_padding": [1]}),  # 72 -> 145
    (8, (3,), {"strides": [1], "pads": [1, 1]}),
    (8, (4,), {"strides": [2], "pads": [1, 1], "group": 2}),  # 145 -> 290, left to Relax
]


def test_transposed_conv1d_takes_the_phases_as_a_height_one_conv2d() -> None:
    model = relu_chain("ConvTranspose", LAYERS_1D, [1, 16, 9], [1, 8, 290])
    mod = import_relax(prepare(model))
    assert relax_calls(mod).count("relax.nn.conv1d_transpose") == 4
    with AVX512:
        ops = relax_calls(tvm.transform.Sequential(layout_passes(AVX512))(mod))
    assert "relax.nn.conv1d_transpose" not in ops
    assert ops.count("relax.nn.conv2d_transpose") == 1  # the grouped one, height 1
    assert [op for op in ops if op.endswith("_nchwc")].count("conv2d_nchwc") == 3


@pytest.mark.parametrize("target", ["x86", "avx2"])
def test_compiled_deconv1d_model_matches_onnxruntime(target: str, tmp_path: Path) -> None:
    model = relu_chain("ConvTranspose", LAYERS_1D, [1, 16, 9], [1, 8, 290])
    x = np.random.default_rng(5).standard_normal((1, 16, 9)).astype(np.float32)
    got, expected = compiled_xy(model, target, tmp_path / "out", x)
    assert got.shape == expected.shape == (1, 8, 290)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
