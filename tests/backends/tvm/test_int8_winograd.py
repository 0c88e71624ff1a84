"""Exact integer Winograd F(2x2, 3x3) for quantized convs on AVX2 (int8_winograd.py): the
integer transforms give the direct convolution's int32 sums exactly, the layers that fit
are recorded as ``avx2-s16-winograd``, and a compiled QDQ network gives bit-identical
outputs with and without it, within one quantization step of onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_helpers import quantize

from onnxpress.backends.tvm import int8_winograd
from onnxpress.backends.tvm.int8_winograd import AT, BT, fits, transform_weight

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target  # noqa: E402

AVX2 = parse_target("avx2")
runs_avx2 = pytest.mark.skipif(not AVX2.runs_here(), reason="this CPU has no AVX2 + FMA")


def test_integer_transforms_give_the_exact_direct_sums() -> None:
    """Extreme operands: d at +-255 and weights at -128/127, 64 channels; every 2x2 output
    of every tile equals the direct sum, after the exact division by 4."""
    rng = np.random.default_rng(0)
    channels, out_channels = 64, 16
    d = rng.choice([-255, 255, 0, 37], size=(channels, 4, 4)).astype(np.int64)
    w = rng.choice([-128, 127, 1], size=(out_channels, channels, 3, 3)).astype(np.int8)
    v = np.einsum("ai,cij,bj->abc", BT, d, BT).reshape(16, channels)
    assert np.abs(v).max() <= 1020  # int16
    u = transform_weight(w)
    assert np.abs(u).max() <= 9 * 128  # int16
    m = np.einsum("tc,tco->to", v, u).reshape(4, 4, out_channels)
    y4 = np.einsum("ra,abo,sb->rso", AT, m, AT)
    assert np.all(y4 % 4 == 0)
    direct = np.zeros((2, 2, out_channels), np.int64)
    for r in range(2):
        for s in range(2):
            direct[r, s] = np.einsum("cij,ocij->o", d[:, r : r + 3, s : s + 3], w.astype(np.int64))
    np.testing.assert_array_equal(y4 // 4, direct)


def test_only_exactly_representable_3x3_stride_1_convs_fit() -> None:
    w = np.ones((32, 32, 3, 3), np.int8)
    assert fits(w, (1, 1), (1, 1))
    assert not fits(w, (2, 2), (1, 1))
    assert not fits(w, (1, 1), (2, 2))
    assert not fits(np.ones((32, 8, 3, 3), np.int8), (1, 1), (1, 1))  # too few channels
    assert not fits(np.ones((32, 32, 1, 1), np.int8), (1, 1), (1, 1))
    # 4 * 255 * sum|w| must fit int32 for the wrapped int32 arithmetic to stay exact
    assert not fits(np.full((16, 2048, 3, 3), 127, np.int8), (1, 1), (1, 1))


def conv_net() -> onnx.ModelProto:
    """Conv 3x3 (16 -> 24, 13 x 11, padded) -> Relu -> Conv 3x3 (24 -> 32, valid) -> Relu ->
    Conv 3x3 stride 2 (direct) -> GlobalAveragePool; odd sizes give ragged tiles."""
    rng = np.random.default_rng(5)

    def weight(name: str, o: int, i: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal((o, i, 3, 3)) / np.sqrt(9 * i)).astype(np.float32), name
        )

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 0, 1, 2], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="c2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], strides=[2, 2], name="c3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "int8_winograd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 13, 11])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, 1, 1])],
        [weight("w1", 24, 16), weight("w2", 32, 24), weight("w3", 16, 32)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@runs_avx2
def test_compiled_winograd_layers_match_the_direct_kernel_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qdq, _ = quantize(conv_net(), "qdq{saturation=off}", targets=["avx512-vnni"])
    result = compile_model(qdq, "avx2", tmp_path / "winograd")
    kernels = [layer["kernel"] for layer in result.manifest["int8"]["layers"]]
    assert kernels == ["avx2-s16-winograd", "avx2-s16-winograd", "avx2-s16"]
    assert result.manifest["verification"]["errors"]["y"] <= 1.0  # one quantization step
    monkeypatch.setattr(int8_winograd, "fits", lambda *args: False)
    direct = compile_model(qdq, "avx2", tmp_path / "direct")
    assert "winograd" not in str(direct.manifest["int8"]["layers"])
    x = np.random.default_rng(2).standard_normal((2, 16, 13, 11)).astype(np.float32) * 2
    got = CompiledModel(result.library)(x)[0]
    np.testing.assert_array_equal(got, CompiledModel(direct.library)(x)[0])
    assert np.abs(got).max() > 0
