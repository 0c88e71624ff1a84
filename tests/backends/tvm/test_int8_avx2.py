"""int8 on AVX2 without VNNI (onnxpress.backends.tvm.int8_kernels AVX2_U8S8 / AVX2_S16):
vpmaddubsw runs exactly the pair-saturating arithmetic of the numpy reference, so it is used
only for weights that cannot saturate (checked in the kernel's K order); other layers take
the exact int16 kernel; compiled for ``--target avx2`` a QDQ model matches onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_helpers import quantize

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.int8_kernels import (  # noqa: E402
    AVX2_S16,
    AVX2_U8S8,
    DotIsa,
    choose,
    kernels,
    pack_weight,
    packed_gemm,
    with_int16_weights,
)
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402

AVX2 = parse_target("avx2")
runs_avx2 = pytest.mark.skipif(not AVX2.runs_here(), reason="this CPU has no AVX2 + FMA")


def pair_saturating(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """numpy reference of vpmaddubsw + vpmaddwd(1): sum_k of int16-saturated adjacent pairs."""
    products = a.astype(np.int64)[:, :, None] * w.astype(np.int64)[None]  # [M, K, N]
    pairs = products.reshape(a.shape[0], -1, 2, w.shape[1]).sum(axis=2)
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def _run(isa: DotIsa, a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, str]:
    rows, depth = a.shape
    cols = w.shape[1]
    func = packed_gemm(isa, rows, depth, cols)
    lib = tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm_target(AVX2)
    )
    out = tvm.runtime.tensor(np.zeros((rows, cols), np.int32))
    operand = tvm.runtime.tensor(a.astype(isa.a_dtype))
    lib["main"](operand, tvm.runtime.tensor(pack_weight(isa, w)), out)
    return out.numpy(), lib.mod.inspect_source("asm")


def test_avx2_target_offers_both_kernels() -> None:
    choice = kernels(tvm_target(AVX2))
    assert choice is not None
    assert choice.exact == AVX2_S16 and choice.saturation_safe == AVX2_U8S8
    assert AVX2_S16.exact and not AVX2_U8S8.exact
    assert kernels(tvm_target(parse_target("avx512-vnni"))).saturation_safe is None  # type: ignore[union-attr]


@runs_avx2
def test_u8s8_kernel_is_the_pair_saturating_arithmetic_and_uses_vpmaddubsw() -> None:
    rng = np.random.default_rng(0)
    rows, depth, cols = 12, 64, 32
    a = rng.integers(0, 256, (rows, depth), dtype=np.uint8)
    safe = rng.integers(-64, 65, (depth, cols), dtype=np.int8)  # |w0| + |w1| <= 128
    assert choose(kernels(tvm_target(AVX2)), safe) == (AVX2_U8S8, 0)  # type: ignore[arg-type]
    out, asm = _run(AVX2_U8S8, a, safe)
    exact = a.astype(np.int64) @ safe.astype(np.int64)
    np.testing.assert_array_equal(out, exact)
    np.testing.assert_array_equal(out, pair_saturating(a, safe))
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm
    # on full 8-bit weights the same kernel saturates exactly as the reference says
    wide = rng.integers(-128, 128, (depth, cols), dtype=np.int8)
    out, _ = _run(AVX2_U8S8, a, wide)
    np.testing.assert_array_equal(out, pair_saturating(a, wide))
    assert not np.array_equal(out, a.astype(np.int64) @ wide.astype(np.int64))


@runs_avx2
def test_unsafe_weights_take_the_exact_int16_kernel() -> None:
    rng = np.random.default_rng(1)
    rows, depth, cols = 12, 36, 16
    a = rng.integers(0, 256, (rows, depth), dtype=np.uint8)
    w = rng.integers(-128, 128, (depth, cols), dtype=np.int8)
    w[0, 0] = w[1, 0] = 127  # one pair at risk: 255 * 254 > 32767
    isa, risky = choose(kernels(tvm_target(AVX2)), w)  # type: ignore[arg-type]
    assert isa == AVX2_S16 and risky >= 1
    w[2:4] = -128  # the extremes survive the bytes' sign extension
    out, asm = _run(isa, a, w)
    np.testing.assert_array_equal(out, a.astype(np.int64) @ w.astype(np.int64))
    assert "vpmaddwd" in asm and "vpmaddubsw" not in asm
    # the weights stay bytes (half the memory of int16), widened as they are loaded
    assert pack_weight(isa, w).dtype == np.int8 and "vpmovsxbw" in asm
    # Winograd's transformed weights exceed a byte: the same kernel on int16 weights
    wide = with_int16_weights(isa)
    big = rng.integers(-25500, 25501, (depth, cols)).astype(np.int16)
    out, _ = _run(wide, a, big)
    assert pack_weight(wide, big).dtype == np.int16
    np.testing.assert_array_equal(out, a.astype(np.int64) @ big.astype(np.int64))
    # K order: the pair (0, 1) is at risk, the same weights at rows (1, 2) are not
    w2 = np.zeros((4, 1), np.int8)
    w2[1, 0] = w2[2, 0] = 127
    assert choose(kernels(tvm_target(AVX2)), w2)[0] == AVX2_U8S8  # type: ignore[arg-type]


def strong_conv_model() -> onnx.ModelProto:
    """Conv -> Relu -> Gemm with same-sign, large weights: 8-bit pairs that saturate int16."""
    rng = np.random.default_rng(3)
    w = rng.uniform(0.5, 1.0, (16, 8, 3, 3)).astype(np.float32)
    wf = rng.uniform(-1.0, -0.5, (4, 16 * 6 * 6)).astype(np.float32) / 50
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1, name="fc"),
        ],
        "strong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(wf, "wf")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@runs_avx2
@pytest.mark.parametrize("saturation", ["off", "narrow"])
def test_avx2_model_matches_onnxruntime_with_either_kernel(tmp_path: Path, saturation: str) -> None:
    """With the remedy off the weights would saturate: the exact kernel runs them. With
    ``optimize --target avx2`` and 7-bit weights (narrow) they are safe for any activation
    byte and vpmaddubsw runs them. Either way the
    library matches onnxruntime (exact int32 on this CPU) within one quantization step."""
    # with the remedy off, the model is verified for a VNNI CPU only (it fails on AVX2's)
    target = "avx2" if saturation == "narrow" else "avx512-vnni"
    qdq, _ = quantize(strong_conv_model(), f"qdq{{saturation={saturation}}}", targets=[target])
    result = compile_model(qdq, "avx2", tmp_path / saturation)
    assert result.manifest["target"]["name"] == "avx2"
    assert result.manifest["target"]["int8_target"] == "avx2"
    int8 = result.manifest["int8"]
    assert int8["kernel"] == "avx2"
    assert [layer["op"] for layer in int8["layers"]] == ["conv2d", "matmul"]
    conv = int8["layers"][0]
    if saturation == "off":
        assert conv["kernel"] == "avx2-s16" and conv["pairs_at_risk"] > 0
    else:
        assert {layer["kernel"] for layer in int8["layers"]} == {"avx2-u8s8"}
    check = result.manifest["verification"]
    assert check["errors"]["y"] <= 1.0  # within one quantization step of onnxruntime


def test_avx2_tiles_take_rows_that_divide_the_gemm() -> None:
    """6 rows x 2 column blocks is AVX2's first tile; where 6 does not divide the rows (a 112 x
    112 image) 4 rows x 3 blocks keep the 12 accumulators and no row is padded."""
    from onnxpress.backends.tvm.int8_kernels import tiles

    assert tiles(AVX2_S16, 96, 6 * 50) == (6, 2)
    assert tiles(AVX2_S16, 96, 112 * 112) == (4, 3)
    assert tiles(AVX2_U8S8, 96, 56 * 56) == (4, 3)
    assert tiles(AVX2_S16, 96, 49) == (6, 2)  # nothing divides 49: padded to 54
    # 8 blocks (3 does not divide them), 12 rows do not divide 112 x 112: padded rows
    assert tiles(AVX2_S16, 64, 112 * 112) == (6, 2)
