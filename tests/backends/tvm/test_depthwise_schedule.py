"""The depthwise rule (onnxpress.backends.tvm.depthwise_schedule): column tiles per register
file, the loop structure it gives blocked depthwise convs (channel blocks parallel, rows and
column tiles as loops of their own, the window and the tile unrolled), and compiled results
against onnxruntime for strides 1 and 2, ragged widths, padded channel blocks and a single
block; skipped without TVM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from tvm.s_tir import dlight as dl  # noqa: E402

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.build import import_relax  # noqa: E402
from onnxpress.backends.tvm.depthwise_schedule import column_tile  # noqa: E402
from onnxpress.backends.tvm.prepare import prepare  # noqa: E402
from onnxpress.backends.tvm.schedule import cpu_lowering_passes, schedule_rules  # noqa: E402

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})


def test_column_tiles_divide_the_width_within_the_registers() -> None:
    assert column_tile(56, 32) == 8 and column_tile(14, 32) == 7 and column_tile(7, 32) == 7
    assert column_tile(112, 16) == 4  # AVX2: 16 registers, at most 4 columns
    assert column_tile(15, 32) == 5 and column_tile(3, 32) == 3  # a whole short row
    assert column_tile(17, 32) == 0  # no divisor of 4-8: left to TiledReduction


def depthwise_model(channels: int, size: int, stride: int) -> onnx.ModelProto:
    """x -> 1x1 conv (so the depthwise conv reads a blocked tensor) -> 3x3 depthwise conv
    (padding 1, ``stride``) -> Relu."""
    rng = np.random.default_rng(channels + size + stride)
    inits = [
        numpy_helper.from_array(
            (rng.standard_normal((channels, channels, 1, 1)) / np.sqrt(channels)).astype(
                np.float32
            ),
            "pw",
        ),
        numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), "dw"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b"),
    ]
    out = (size - 1) // stride + 1
    nodes = [
        helper.make_node("Conv", ["x", "pw"], ["p"]),
        helper.make_node(
            "Conv", ["p", "dw", "b"], ["d"], group=channels, pads=[1] * 4, strides=[stride] * 2
        ),
        helper.make_node("Relu", ["d"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "depthwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, out, out])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _depthwise_kernel(model: onnx.ModelProto) -> str:
    mod = import_relax(prepare(model))
    with AVX512:
        mod = tvm.transform.Sequential(
            [*cpu_lowering_passes(AVX512), dl.ApplyDefaultSchedule(*schedule_rules(AVX512))]
        )(mod)
    (text,) = [str(f.script()) for g, f in mod.functions.items() if "depthwise" in g.name_hint]
    return text


def test_channel_blocks_run_in_parallel_and_columns_in_unrolled_tiles() -> None:
    text = _depthwise_kernel(depthwise_model(144, 56, 1))
    assert "for n_cb_fused in T.parallel(T.int64(9)):" in text  # 144 channels: 9 blocks
    assert "for x_1 in T.unroll(T.int64(8)):" in text  # 56 columns in tiles of 8
    assert "for ry in T.unroll(T.int64(3)):" in text
    # one block of channels: its rows join the parallel loop
    single = _depthwise_kernel(depthwise_model(8, 48, 1))
    assert "for n_cb_y_fused in T.parallel(T.int64(48)):" in single
    small = _depthwise_kernel(depthwise_model(8, 12, 1))  # 10K multiply-adds: one core
    assert "T.parallel" not in small and "for x_1 in T.unroll(T.int64(6)):" in small


@pytest.mark.parametrize(
    "channels, size, stride, target",
    [
        (24, 15, 1, "x86"),
        (32, 56, 2, "x86"),
        (8, 12, 1, "x86"),
        (96, 7, 1, "x86"),
        (16, 17, 1, "x86"),
        (40, 28, 1, "avx2"),  # 8 lanes, 16 registers: tiles of 4 columns
    ],
)
def test_compiled_depthwise_convs_match_onnxruntime(
    channels: int, size: int, stride: int, target: str, tmp_path: Path
) -> None:
    model = depthwise_model(channels, size, stride)
    result: Any = compile_model(model, target, tmp_path / "dw")
    assert result.manifest["verification"]["errors"]["y"] <= 1e-5
