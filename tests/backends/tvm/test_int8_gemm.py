"""int8_gemm.py, the fused epilogue: Relax fuses a packed GEMM with its requantizing epilogue;
the rule computes the epilogue inside the GEMM's parallel tile loop (the int32 sums never
leave the tile), the library computes the same bytes as numpy, and a whole QDQ model still
matches onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdq_helpers import quantize, two_pointwise_convs

tvm = pytest.importorskip("tvm")

from tvm import relax, s_tir  # noqa: E402

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.int8_gemm import (  # noqa: E402
    epilogue_rule,
    has_packed_gemm,
    separate_epilogue,
)
from onnxpress.backends.tvm.int8_kernels import (  # noqa: E402
    AVX2_S16,
    pack_weight,
    packed_gemm,
)
from onnxpress.backends.tvm.schedule import cpu_pipeline  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402

ROWS, DEPTH, COLS = 48, 32, 48
SCALE, OUT_SCALE = 0.01, 0.5


def gemm_with_epilogue(weight: np.ndarray, correction: np.ndarray) -> Any:
    """int16 rows . int8 weights in the packed AVX2 kernel, then correction, scale, ReLU and a
    quantize to uint8: the chain the int8 lowering leaves after a 1x1 conv."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((ROWS, DEPTH), "int16"))
    with builder.function("main", [x]):
        with builder.dataflow():
            gvar = builder.add_func(packed_gemm(AVX2_S16, ROWS, DEPTH, COLS), "onnxpress_int8_gemm")
            acc = builder.emit(
                relax.call_tir(
                    gvar,
                    [x, relax.const(pack_weight(AVX2_S16, weight))],
                    relax.TensorType((ROWS, COLS), "int32"),
                )
            )
            y = builder.emit(relax.op.subtract(acc, relax.const(correction.reshape(1, COLS))))
            y = builder.emit(relax.op.astype(y, "float32"))
            y = builder.emit(relax.op.multiply(y, relax.const(SCALE, "float32")))
            y = builder.emit(relax.op.nn.relu(y))
            zero = relax.const(np.uint8(3))
            out = relax.op.quantize(y, relax.const(OUT_SCALE, "float32"), zero, out_dtype="uint8")
            out = builder.emit_output(builder.emit(out))
        builder.emit_func_output(out)
    return builder.get()


def _operands() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (ROWS, DEPTH)).astype(np.int16)
    w = rng.integers(-128, 128, (DEPTH, COLS)).astype(np.int8)
    return x, w, rng.integers(-500, 500, COLS).astype(np.int32)


def _fused_kernel() -> Any:
    """The one kernel Relax fuses from gemm_with_epilogue."""
    _, w, correction = _operands()
    with tvm_target(parse_target("avx2")):
        fused = tvm.transform.Sequential(
            [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
        )(gemm_with_epilogue(w, correction))
    kernels = [f for gv, f in fused.functions.items() if "gemm" in gv.name_hint]
    assert len(kernels) == 1  # the GEMM and the whole chain in one kernel
    return kernels[0]


def test_the_epilogue_is_computed_inside_the_gemm_tile_loop() -> None:
    kernel = _fused_kernel()
    assert has_packed_gemm(s_tir.Schedule(kernel))
    sch = epilogue_rule(8).apply(kernel, tvm_target(parse_target("avx2")), False)
    assert sch is not None
    blocks = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    assert len(blocks) == 3 and blocks[:2] == ["C_init", "C_update_o"]  # the rest inlined
    outer = sch.get_loops(sch.get_sblock("C_update_o"))[0]
    epilogue_loops = sch.get_loops(sch.get_sblock(blocks[2]))
    assert sch.get(epilogue_loops[0]).same_as(sch.get(outer))  # under the tile loop
    assert int(sch.get(epilogue_loops[-1]).kind) == 2  # vector lanes


def test_the_fallback_keeps_the_gemm_and_one_vectorized_epilogue_after_it() -> None:
    sch = s_tir.Schedule(_fused_kernel())
    assert separate_epilogue(sch, 8)
    blocks = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    assert len(blocks) == 3 and blocks[:2] == ["C_init", "C_update_o"]
    outer = sch.get_loops(sch.get_sblock("C_update_o"))[0]
    epilogue_loops = sch.get_loops(sch.get_sblock(blocks[2]))
    assert not sch.get(epilogue_loops[0]).same_as(sch.get(outer))  # a loop nest of its own
    assert int(sch.get(epilogue_loops[-1]).kind) == 2


@pytest.mark.skipif(not parse_target("avx2").runs_here(), reason="this CPU has no AVX2 + FMA")
def test_the_fused_kernel_computes_the_requantized_bytes() -> None:
    x, w, correction = _operands()
    target = tvm_target(parse_target("avx2"))
    executable = tvm.compile(
        gemm_with_epilogue(w, correction), target=target, relax_pipeline=cpu_pipeline(target)
    )
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    sums = x.astype(np.int64) @ w.astype(np.int64) - correction
    values = np.maximum(sums * np.float32(SCALE), 0) / OUT_SCALE
    expected = np.clip(np.round(values) + 3, 0, 255)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(np.int64) - expected).max() <= 1  # a rounding tie at most
    assert (got == expected).mean() > 0.99


def test_a_quantized_conv_chain_still_matches_onnxruntime(tmp_path: Path) -> None:
    qdq, _ = quantize(two_pointwise_convs(), "qdq{float-heads=false}", targets=["avx512-vnni"])
    result = compile_model(qdq, "x86", tmp_path / "lib")
    assert result.manifest["int8"]["lowered"]["conv2d"] == 2
    assert result.manifest["verification"]["errors"]["y"] <= 1.0


def test_depthwise_and_pointwise_convs_carry_their_epilogues(tmp_path: Path) -> None:
    """An inverted-residual block (1x1 expand, 3x3 depthwise, 1x1 project): Relax fuses each
    integer kernel with the requantization after it, and the library matches onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxpress.backends.tvm.build import import_relax
    from onnxpress.backends.tvm.int8 import lower_qdq_to_integer
    from onnxpress.backends.tvm.prepare import prepare
    from onnxpress.backends.tvm.schedule import cpu_lowering_passes

    rng = np.random.default_rng(6)
    weights = {
        "w1": rng.normal(0, 0.3, (32, 8, 1, 1)),
        "w2": rng.normal(0, 0.3, (32, 1, 3, 3)),
        "w3": rng.normal(0, 0.3, (8, 32, 1, 1)),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["a"], name="expand"),
            helper.make_node("Relu", ["a"], ["ra"]),
            helper.make_node("Conv", ["ra", "w2"], ["b"], name="dw", group=32, pads=[1] * 4),
            helper.make_node("Relu", ["b"], ["rb"]),
            helper.make_node("Conv", ["rb", "w3"], ["y"], name="project"),
        ],
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])],
        [numpy_helper.from_array(w.astype(np.float32), k) for k, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    qdq, _ = quantize(model, "qdq{float-heads=false}", targets=["avx512-vnni"])
    target = tvm_target(parse_target("avx2"))
    mod, _ = lower_qdq_to_integer(import_relax(prepare(qdq, None)), target)
    with target:
        fused = tvm.transform.Sequential(cpu_lowering_passes(target))(mod)
    names = [gv.name_hint for gv in fused.functions]
    assert any("depthwise" in n and "quantize" in n for n in names)
    assert sum("gemm" in n and "quantize" in n for n in names) >= 1
    result = compile_model(qdq, "avx2", tmp_path / "lib")
    assert result.manifest["verification"]["errors"]["y"] <= 1.0


@pytest.mark.parametrize(
    ("kernel", "strides", "dilation"), [((7, 7), (2, 2), (1, 1)), ((3, 2), (2, 1), (2, 3))]
)
def test_im2col_packs_unpadded_channels_and_zero_fills_the_depth(
    kernel: tuple[int, int], strides: tuple[int, int], dilation: tuple[int, int]
) -> None:
    """A 3-channel input: the depth is kh*kw*3 taps in (kh, kw, c) order rounded up to the
    GEMM's multiple of 4 (a 7x7 stem: 148, not 7x7x4), the taps past them are zero and the
    rows past the real ones repeat the last."""
    from onnxpress.backends.tvm.int8_kernels import GROUP, im2col, round_up

    kh, kw = kernel
    x = np.random.default_rng(7).integers(-300, 300, (2, 19, 17, 3)).astype(np.int16)
    out_h = (19 - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (17 - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    rows, taps = 2 * out_h * out_w, kh * kw * 3
    depth = round_up(taps, GROUP)
    assert depth > taps and (kernel != (7, 7) or depth == 148)
    func = im2col(x.shape, kernel, strides, dilation, (out_h, out_w), rows + 5, depth, "int16")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), "llvm")
    got = tvm.runtime.tensor(np.full((rows + 5, depth), 7, np.int16))
    lib["main"](tvm.runtime.tensor(x), got)
    patches = np.stack(
        [
            x[:, i * dilation[0] :, j * dilation[1] :][
                :, : out_h * strides[0] : strides[0], : out_w * strides[1] : strides[1]
            ][:, :out_h, :out_w]
            for i in range(kh)
            for j in range(kw)
        ],
        axis=3,
    ).reshape(rows, taps)
    expected = np.zeros((rows + 5, depth), np.int16)
    expected[:rows, :taps] = patches
    expected[rows:, :taps] = patches[-1]
    np.testing.assert_array_equal(got.numpy(), expected)
