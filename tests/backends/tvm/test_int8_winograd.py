"""Exact integer Winograd F(2x2, 3x3) and F(4x4, 3x3) for quantized convs on AVX2
(int8_winograd.py): the integer transforms give the direct convolution's int32 sums exactly
(F(4x4) through wrapped int32 arithmetic and the inverse of 9), the layers that fit are
recorded as ``avx2-s16-winograd`` / ``-winograd-f4``, and a compiled QDQ network gives
bit-identical outputs with and without them, within one quantization step of onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_helpers import quantize

from onnxpress.backends.tvm import int8_winograd
from onnxpress.backends.tvm.int8_winograd import F2, F4, Transform, choose, fits, transform_weight

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target  # noqa: E402

AVX2 = parse_target("avx2")
runs_avx2 = pytest.mark.skipif(not AVX2.runs_here(), reason="this CPU has no AVX2 + FMA")
VNNI = parse_target("avx512-vnni")
runs_vnni = pytest.mark.skipif(not VNNI.runs_here(), reason="this CPU has no AVX-512 VNNI")


def _wrapped(values: np.ndarray) -> np.ndarray:
    """int64 values as the int32 arithmetic of the kernels holds them (modulo 2^32)."""
    return (values & 0xFFFFFFFF).astype(np.uint32).view(np.int32).astype(np.int64)


@pytest.mark.parametrize("aligned", [False, True], ids=["mixed", "aligned"])
@pytest.mark.parametrize("transform", [F2, F4], ids=["f2", "f4"])
def test_integer_transforms_give_the_exact_direct_sums(transform: Transform, aligned: bool) -> None:
    """Extreme operands, 64 channels: d at +-255 and weights at -128/127 mixed, or all at
    255 and 127 (F(4x4)'s int32 sums then wrap); every output of every tile equals the
    direct sum, from the int32 products and wrapped int32 sums the kernels compute, after
    the exact division by the scale."""
    rng = np.random.default_rng(0)
    channels, out_channels, size, m = 64, 16, transform.size, transform.m
    d = rng.choice([-255, 255, 0, 37], size=(channels, size, size)).astype(np.int64)
    w = rng.choice([-128, 127, 1], size=(out_channels, channels, 3, 3)).astype(np.int8)
    if aligned:
        d, w = np.full_like(d, 255), np.full_like(w, 127)
    assert fits(w, (1, 1), (1, 1), transform)
    bt, at = transform.bt, transform.at
    v = np.einsum("ai,cij,bj->abc", bt, d, bt).reshape(transform.points, channels)
    assert np.abs(v).max() < 2**15  # int16
    u = transform_weight(w, transform)
    assert np.abs(u).max() < 2**15  # int16
    m_full = np.einsum("tc,tco->to", v, u).reshape(size, size, out_channels)
    y_full = np.einsum("ra,abo,sb->rso", at, m_full, at)
    y = _wrapped(np.einsum("ra,abo,sb->rso", at, _wrapped(m_full), at))
    y = _wrapped(y * transform.odd_inverse) >> transform.shift
    direct = np.zeros((m, m, out_channels), np.int64)
    for r in range(m):
        for s in range(m):
            direct[r, s] = np.einsum("cij,ocij->o", d[:, r : r + 3, s : s + 3], w.astype(np.int64))
    np.testing.assert_array_equal(y, direct)
    if aligned and transform is F4:
        assert np.abs(y_full).max() >= 2**31  # the wrapped arithmetic was exercised


def test_compiled_output_transform_undoes_the_scale_through_wrapped_sums() -> None:
    """The compiled F(4x4) output kernel on M values whose exact transform is beyond int32
    (operands at 255 and 127, 64 channels): the inverse of 9 and the shift still give the
    direct sums, so the compiled int32 arithmetic wraps as the exactness argument needs."""
    channels, out_channels, transform = 64, 16, F4
    d = np.full((channels, 6, 6), 255, np.int64)
    w = np.full((out_channels, channels, 3, 3), 127, np.int8)
    v = np.einsum("ai,cij,bj->abc", transform.bt, d, transform.bt).reshape(36, channels)
    m_full = np.einsum("tc,tco->to", v, transform_weight(w, transform))
    at = transform.at
    y_full = np.einsum("ra,abo,sb->rso", at, m_full.reshape(6, 6, out_channels), at)
    assert np.abs(y_full).max() >= 2**31  # the output transform's sums wrap
    m_acc = _wrapped(m_full)
    kernel = int8_winograd.output_transform(1, (1, 1), (4, 4), 1, out_channels, out_channels, F4)
    lib = tvm.compile(
        tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
        target=tvm.target.Target({"kind": "llvm"}),
    )
    out = tvm.runtime.tensor(np.zeros((1, 4, 4, out_channels), np.int32))
    lib["main"](tvm.runtime.tensor(m_acc.reshape(36, 1, out_channels).astype(np.int32)), out)
    direct = 255 * 127 * 9 * channels
    np.testing.assert_array_equal(out.numpy(), np.full((1, 4, 4, out_channels), direct))


@pytest.mark.parametrize("out_channels", [17, 20])
def test_compiled_output_transform_with_channels_that_are_no_multiple_of_8(
    out_channels: int,
) -> None:
    """Random wrapped M values: the compiled kernel (one 17-lane or 4-lane vector) agrees
    with numpy's wrapped int32 arithmetic."""
    m_acc = np.random.default_rng(0).integers(-(2**20), 2**20, (36, 1, out_channels))
    kernel = int8_winograd.output_transform(1, (1, 1), (4, 4), 1, out_channels, out_channels, F4)
    lib = tvm.compile(
        tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
        target=tvm.target.Target({"kind": "llvm"}),
    )
    out = tvm.runtime.tensor(np.zeros((1, 4, 4, out_channels), np.int32))
    lib["main"](tvm.runtime.tensor(m_acc.astype(np.int32)), out)
    y = _wrapped(np.einsum("ra,abo,sb->rso", F4.at, m_acc.reshape(6, 6, out_channels), F4.at))
    np.testing.assert_array_equal(out.numpy()[0], _wrapped(y * F4.odd_inverse) >> F4.shift)


def test_f4_where_the_output_has_many_tiles_and_the_sums_fit() -> None:
    w = np.full((32, 32, 3, 3), 3, np.int8)
    assert choose(w, (1, 1), (1, 1), (24, 24)) is F4  # 36 tiles
    assert choose(w, (1, 1), (1, 1), (14, 14), batch=2) is F4  # 32 tiles
    # 16 tiles: each F(4x4) weight would serve 16 GEMM rows (streamed, not multiplied)
    assert choose(w, (1, 1), (1, 1), (14, 14)) is F2
    assert choose(w, (1, 1), (1, 1), (7, 7), batch=8) is F2  # ragged 2 x 2 tiles of 4
    assert choose(w, (2, 2), (1, 1), (14, 14)) is None
    # 64 * 255 * sum|w| >= 2^31: F(4x4) would lose the top bits, F(2x2) keeps them
    heavy = np.full((16, 256, 3, 3), 100, np.int8)
    assert not fits(heavy, (1, 1), (1, 1), F4) and choose(heavy, (1, 1), (1, 1), (28, 28)) is F2


def test_only_exactly_representable_3x3_stride_1_convs_fit() -> None:
    w = np.ones((32, 32, 3, 3), np.int8)
    assert fits(w, (1, 1), (1, 1))
    assert not fits(w, (2, 2), (1, 1))
    assert not fits(w, (1, 1), (2, 2))
    assert not fits(np.ones((32, 8, 3, 3), np.int8), (1, 1), (1, 1))  # too few channels
    assert not fits(np.ones((32, 32, 1, 1), np.int8), (1, 1), (1, 1))
    # 4 * 255 * sum|w| must fit int32 for the wrapped int32 arithmetic to stay exact
    assert not fits(np.full((16, 2048, 3, 3), 127, np.int8), (1, 1), (1, 1))
    assert fits(w, (1, 1), (1, 1), F4)


def conv_net(height: int = 13, width: int = 11) -> onnx.ModelProto:
    """Conv 3x3 (16 -> 24, padded) -> Relu -> Conv 3x3 (24 -> 32, valid) -> Relu ->
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
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, 1, 1])],
        [weight("w1", 24, 16), weight("w2", 32, 24), weight("w3", 16, 32)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matches_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hw: tuple[int, int], kernels: list[str],
    target: str = "avx2",
) -> None:  # fmt: skip
    """Compile conv_net(*hw) for ``target`` with Winograd (its layers on ``kernels``) and
    without; the two libraries agree bit for bit and stay within one step of onnxruntime."""
    qdq, _ = quantize(conv_net(*hw), "qdq{saturation=off}", targets=["avx512-vnni"])
    result = compile_model(qdq, target, tmp_path / "winograd")
    assert [layer["kernel"] for layer in result.manifest["int8"]["layers"]] == kernels
    assert result.manifest["verification"]["errors"]["y"] <= 1.0  # one quantization step
    monkeypatch.setattr(int8_winograd, "fits", lambda *args: False)
    direct = compile_model(qdq, target, tmp_path / "direct")
    assert "winograd" not in str(direct.manifest["int8"]["layers"])
    x = np.random.default_rng(2).standard_normal((2, 16, *hw)).astype(np.float32) * 2
    got = CompiledModel(result.library)(x)[0]
    np.testing.assert_array_equal(got, CompiledModel(direct.library)(x)[0])
    assert np.abs(got).max() > 0


@runs_avx2
@pytest.mark.parametrize(
    ("hw", "first"),
    [((13, 11), "avx2-s16-winograd"), ((14, 13), "avx2-s16-winograd-f4")],
    ids=["f2", "f4"],
)
def test_compiled_winograd_layers_match_the_direct_kernel_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hw: tuple[int, int], first: str
) -> None:
    """The first conv's output is 13 x 11 (F(2x2)) or 14 x 13 (F(4x4)), the second's 11 x 9
    or 12 x 11 (F(2x2), valid): ragged tiles both ways."""
    _matches_direct(tmp_path, monkeypatch, hw, [first, "avx2-s16-winograd", "avx2-s16"])


@runs_vnni
def test_vnni_runs_f4_on_vpdpwssd_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With VNNI, F(4x4) runs its int16 GEMM on vpdpwssd (half vpdpbusd's products a step,
    a quarter of the products); F(2x2) would not pay, so a layer too small for F(4x4) stays
    on vpdpbusd. Outputs 18 x 17 and 16 x 15 at batch 2: 50 and 32 tiles, ragged."""
    kernels = ["vnni-s16-winograd-f4", "vnni-s16-winograd-f4", "vnni"]
    _matches_direct(tmp_path, monkeypatch, (18, 17), kernels, target="avx512-vnni")
    w = np.full((32, 32, 3, 3), 3, np.int8)
    assert choose(w, (1, 1), (1, 1), (14, 14), f2=False) is None  # 16 tiles: no F(4x4)
