"""Convolution legalization of the CPU pipeline (onnxpress.backends.tvm.conv_packed): regular
convolutions read weights packed in the tile's channel blocks (packed once, at compile time),
1x1 convolutions on images of whole vectors run as a GEMM over the flattened image, and
both match TVM's own legalization; matmuls by constant weights read panel-packed weights;
skipped without TVM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.conv_packed import (  # noqa: E402
    conv_kernel_layout_pass,
    packed_block,
)
from onnxpress.backends.tvm.schedule import cpu_pipeline  # noqa: E402

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})


def conv_module(cin: int, size: int, cout: int, kernel: int, weight: np.ndarray) -> Any:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, cin, size, size), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = relax.op.nn.conv2d(x, relax.const(weight), padding=kernel // 2)
            out = builder.emit_output(builder.emit(relax.op.nn.relu(builder.emit(conv))))
        builder.emit_func_output(out)
    return builder.get()


def test_block_is_the_tile_plans_channel_span() -> None:
    assert packed_block(1, 512, 7, 7, 16, 32) == 32  # two vectors of 16 beside 7 columns
    assert packed_block(1, 64, 56, 56, 16, 32) == 64  # four vectors beside 4 columns
    assert packed_block(1, 64, 56, 56, 8, 16) == 16  # AVX2: two vectors of 8 (16 registers)
    assert packed_block(1, 3, 8, 8, 16, 32) == 0  # no vector of channels


@pytest.mark.parametrize(
    "kernel, size, target, marker",
    [
        (3, 7, AVX512, "T.int64(1), T.int64(16), T.int64(3), T.int64(3), T.int64(32)"),
        (3, 7, AVX2, "T.int64(4), T.int64(16), T.int64(3), T.int64(3), T.int64(8)"),
        (1, 8, AVX512, "T.int64(64)"),  # the flattened 8 x 8 image
    ],
)
def test_legalized_kernels_and_results(kernel: int, size: int, target: Any, marker: str) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((32, 16, kernel, kernel)).astype(np.float32)
    mod = conv_module(16, size, 32, kernel, weight)
    lowered = cpu_pipeline(target, blocked=False)(mod)
    kernels = {g.name_hint: f for g, f in lowered.functions.items() if "conv" in g.name_hint}
    assert list(kernels) == ["fused_conv2d_relu"]  # packing folded away, relu fused
    assert marker in kernels["fused_conv2d_relu"].script()
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if not tvm.target.codegen.target_has_features("avx2", host):
        return
    x = rng.standard_normal((1, 16, size, size)).astype(np.float32)

    def run(pipeline: Any, module: Any) -> np.ndarray:
        vm = relax.VirtualMachine(
            tvm.compile(module, target=AVX2, relax_pipeline=pipeline), tvm.cpu()
        )
        return np.asarray(vm["main"](tvm.runtime.tensor(x)).numpy())

    expected = run(relax.get_default_pipeline(AVX2), conv_kernel_layout_pass(8)(mod))
    np.testing.assert_allclose(
        run(cpu_pipeline(AVX2, blocked=False), mod), expected, rtol=1e-5, atol=1e-5
    )


def verified_and_lowered(
    node: Any, x_shape: list[int], y_shape: list[int], weights: list[np.ndarray], tmp: Path
) -> str:
    """Compile the one-node model ``x -> node(x, w, b) -> y`` with compile_model (which checks
    it against onnxruntime) and return its CPU pipeline's TVMScript for AVX-512."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxpress.backends.tvm.backend import compile_model

    graph = helper.make_graph(
        [node],
        "one_node",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(w, n) for w, n in zip(weights, ("w", "b"), strict=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    result = compile_model(model, "x86", tmp / "one_node")
    assert result.manifest["verification"]["errors"]["y"] <= 1e-5
    with AVX512:
        mod = tvm.relax.frontend.onnx.from_onnx(model, keep_params_in_input=False)
        return str(cpu_pipeline(AVX512, blocked=False)(mod).script())


@pytest.mark.parametrize(
    "kernel, stride, pads, output_padding, blocks",
    [
        (2, 2, 0, 0, True),  # U-Net upsampling: one 1x1 conv per kernel position
        (3, 2, 1, 1, False),  # overlapping windows: TVM's own legalization
    ],
)
def test_transposed_convolutions_match_onnxruntime(
    kernel: int, stride: int, pads: int, output_padding: int, blocks: bool, tmp_path: Path
) -> None:
    from onnx import helper

    rng = np.random.default_rng(4)
    weight = rng.standard_normal((16, 32, kernel, kernel)).astype(np.float32)  # [C, O, kh, kw]
    bias = rng.standard_normal(32).astype(np.float32)
    size = 8
    out = (size - 1) * stride - 2 * pads + kernel + output_padding
    node = helper.make_node(
        "ConvTranspose",
        ["x", "w", "b"],
        ["y"],
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[pads] * 4,
        output_padding=[output_padding] * 2,
    )
    text = verified_and_lowered(
        node, [1, 16, size, size], [1, 32, out, out], [weight, bias], tmp_path
    )
    packed = "(T.int64(2), T.int64(2), T.int64(16), T.int64(32))"  # [kh, kw, C, O], folded
    assert (packed in text) == blocks


@pytest.mark.parametrize(
    "rows, columns, panel",
    [
        (1, 40, 8),  # a matrix-vector product: panels of one vector
        (8, 40, 8),
        (16, 40, 8),  # 5 vectors: no stack divides them
        (128, 48, 48),  # the register tile's 3 vectors (AVX-512) side by side
    ],
)
def test_matmuls_read_panel_packed_weights(
    rows: int, columns: int, panel: int, tmp_path: Path
) -> None:
    """A matmul by constant weights reads them packed in panels of its register tile's
    columns (matmul_panel), folded at compile time, and matches onnxruntime."""
    from onnx import helper

    from onnxpress.backends.tvm.matmul_legalize import matmul_panel

    assert matmul_panel([rows], columns, 16, 32) == panel
    assert matmul_panel([1, 128], 1536, 8, 16) == 24  # AVX2: the 4 x 3-vector tile
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((columns, 96)).astype(np.float32)  # Gemm transB: [N, K]
    bias = rng.standard_normal(columns).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    text = verified_and_lowered(node, [rows, 96], [rows, columns], [weight, bias], tmp_path)
    # panels of ``panel`` columns, each 96 deep, folded at compile time
    assert f"(T.int64({columns // panel}), T.int64(96), T.int64({panel}))" in text
    assert "pack_matmul_weight" not in text
