"""The blocked (NCHWc) layout of the CPU pipeline (onnxpress.backends.tvm.blocked_layout and
blocked_kernels): constant packing, which ops run blocked and where the one conversion back
to NCHW goes, padded channels that never leak (a divide by a convolution's output stays
NCHW), and compiled models that match onnxruntime on this CPU and in AVX2 code."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvm_kernels import relax_calls

from onnxpress.backends.tvm.blocked_kernels import (
    channel_block,
    pack_channels,
    pack_conv_weight,
)
from onnxpress.backends.tvm.grouped_kernels import pack_depthwise_weight

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.blocked_layout import blocked_layout_pass  # noqa: E402
from onnxpress.backends.tvm.build import import_relax  # noqa: E402
from onnxpress.backends.tvm.prepare import prepare  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.schedule import cpu_pipeline, layout_passes  # noqa: E402
from onnxpress.core.verify import Runner  # noqa: E402

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})


def test_channel_blocks_pad_to_whole_vectors() -> None:
    assert channel_block(24, 16) == 16  # two blocks of 16, the second three quarters used
    assert channel_block(96, 16) == 16
    assert channel_block(8, 16) == 8  # at most half the lanes: a narrower block
    assert channel_block(3, 16) == 4
    assert channel_block(24, 8) == 8
    assert channel_block(3, 4) == 4  # NEON: never below four lanes


def test_packed_constants_hold_each_channel_once_and_zero_padding() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 5, 3, 3)).astype(np.float32)
    packed = pack_conv_weight(weight, 8, 16)  # 5 input channels read as a padded block of 8
    assert packed.shape == (2, 8, 3, 3, 16)
    for o in range(24):
        np.testing.assert_array_equal(packed[o // 16, :5, :, :, o % 16], weight[o])
    assert not packed[:, 5:].any() and not packed[1, :, :, :, 8:].any()
    depthwise = rng.standard_normal((24, 1, 3, 3)).astype(np.float32)
    dw = pack_depthwise_weight(depthwise, 16)
    assert dw.shape == (2, 3, 3, 16)
    np.testing.assert_array_equal(dw[1, :, :, 3], depthwise[19, 0])
    assert not dw[1, :, :, 8:].any()
    bias = np.arange(24, dtype=np.float32).reshape(1, 24, 1, 1)
    blocked = pack_channels(bias, 16, fill=1.0)
    assert blocked.shape == (1, 2, 1, 1, 16)
    assert blocked[0, 1, 0, 0, 7] == 23 and blocked[0, 1, 0, 0, 8] == 1.0


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def convnet() -> onnx.ModelProto:
    """A small convnet over every op the blocked layout handles: a 3-channel stem (stride 2,
    Clip), a depthwise stride-2 conv of 24 channels (padded blocks on AVX-512), squeeze-and-
    excitation (GlobalAveragePool, Sigmoid, Mul), a residual Add, Div by a constant,
    MaxPool (ceil mode), BatchNormalization, a channel Concat, AveragePool, a Div by a conv
    output (must stay NCHW: its padded channels are 0), a 2x2 stride-2 ConvTranspose, then
    Flatten and Gemm."""
    rng = np.random.default_rng(1)

    def conv(
        name: str, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1
    ) -> onnx.NodeProto:
        w = rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)
        b = rng.standard_normal(cout) + (8.0 if name == "den" else 0.0)  # den: away from 0
        inits.extend([_const(f"{name}_w", w), _const(f"{name}_b", b)])
        return helper.make_node(
            "Conv", [x, f"{name}_w", f"{name}_b"], [name], kernel_shape=[k, k],
            strides=[stride, stride], pads=[k // 2] * 4, group=group,
        )  # fmt: skip

    inits: list[onnx.TensorProto] = [
        _const("lo", np.array(0.0)),
        _const("hi", np.array(6.0)),
        _const("six", np.array(6.0)),
        _const("bn_s", rng.uniform(0.5, 2.0, 16)),
        _const("bn_b", rng.standard_normal(16)),
        _const("bn_m", rng.standard_normal(16)),
        _const("bn_v", rng.uniform(0.5, 2.0, 16)),
        _const("up_w", rng.standard_normal((32, 16, 2, 2)) / 11),
        _const("fc_w", rng.standard_normal((10, 16 * 6 * 6)) / 24),
        _const("fc_b", rng.standard_normal(10)),
    ]
    nodes = [
        conv("stem", "x", 3, 24, 3, stride=2),
        helper.make_node("Clip", ["stem", "lo", "hi"], ["stem_c"]),
        conv("dw", "stem_c", 24, 24, 3, stride=2, group=24),
        helper.make_node("Relu", ["dw"], ["dw_r"]),
        helper.make_node("GlobalAveragePool", ["dw_r"], ["pool"]),
        conv("se1", "pool", 24, 8, 1),
        helper.make_node("Relu", ["se1"], ["se1_r"]),
        conv("se2", "se1_r", 8, 24, 1),
        helper.make_node("Sigmoid", ["se2"], ["gate"]),
        helper.make_node("Mul", ["dw_r", "gate"], ["scaled"]),
        conv("proj", "scaled", 24, 24, 1),
        helper.make_node("Add", ["proj", "dw_r"], ["res"]),
        helper.make_node("Div", ["res", "six"], ["res6"]),
        helper.make_node(  # ceil mode: the last window hangs over the edge
            "MaxPool", ["res6"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1
        ),
        conv("a0", "mp", 24, 16, 3),
        helper.make_node("BatchNormalization", ["a0", "bn_s", "bn_b", "bn_m", "bn_v"], ["a"]),
        conv("b", "mp", 24, 16, 1),
        helper.make_node("Concat", ["a", "b"], ["cat0"], axis=1),
        helper.make_node("AveragePool", ["cat0"], ["cat"], kernel_shape=[3, 3], pads=[1] * 4),
        conv("den", "cat", 32, 32, 1),
        helper.make_node("Div", ["cat", "den"], ["ratio"]),
        conv("tail", "ratio", 32, 32, 3),
        helper.make_node(
            "ConvTranspose", ["tail", "up_w"], ["up"], kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Flatten", ["up"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "blocked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_convolutions_and_the_ops_between_them_run_blocked() -> None:
    mod = import_relax(prepare(convnet()))
    with AVX512:
        calls = relax_calls(tvm.transform.Sequential(layout_passes(AVX512))(mod))
    assert "relax.nn.conv2d" not in calls and "relax.nn.batch_norm" not in calls
    # Clip(0, 6) imports as Relax maximum/minimum (not opaque TE kernels) and runs blocked
    assert calls[:4] == ["conv2d_nchwc", "relax.add", "relax.maximum", "relax.minimum"]
    assert "relax.nn.conv2d_transpose" not in calls and "upsample_nchwc" in calls
    assert calls.count("conv2d_nchwc") == 7 and calls.count("depthwise_nchwc") == 1
    # the 3x3 stride-1 conv of 24 -> 16 channels on a blocked input: Winograd (winograd.py)
    assert [c for c in calls if c.startswith("winograd")] == [
        "winograd_input", "winograd_gemm", "winograd_output"
    ]  # fmt: skip
    for op in (
        "relax.mean",
        "relax.sigmoid",
        "max_pool_nchwc",
        "relax.concat",
        "relax.nn.avg_pool2d",
    ):
        assert op in calls
    # back to NCHW for both operands of the divide by a conv output, and for Flatten
    assert calls.count("from_blocked") == 3
    first = calls.index("from_blocked")
    assert calls[first : first + 3] == ["from_blocked", "from_blocked", "relax.divide"]
    # the divides by constants ran blocked (Div by six, the decomposed batch norm's divide
    # by its standard deviation): two divides before the first conversion, none between
    assert calls[: calls.index("from_blocked")].count("relax.divide") == 2
    assert "to_blocked" not in calls


def test_convolutions_sum_over_the_real_input_channels_only() -> None:
    mod = import_relax(prepare(convnet()))
    with AVX512:
        lowered = tvm.transform.Sequential(layout_passes(AVX512))(mod)
    reductions = []
    for block in lowered["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.name == "relax.call_tir":
                if value.args[0].name_hint.startswith("conv2d_nchwc"):
                    data, weight = value.args[1].fields[:2]
                    blocks_in = [int(d) for d in data.ty.shape]
                    reductions.append((blocks_in[1:2] + blocks_in[4:], int(weight.ty.shape[1])))
    # 24-channel inputs, two blocks of 16: 24 steps, not 32 (the padded 8 are skipped)
    assert reductions.count(([2, 16], 24)) == 3  # se1, proj and b read the 24 channels
    assert ([2, 16], 32) in reductions  # den and tail: 32 channels, whole blocks


@pytest.mark.parametrize("target", ["x86", "avx2"])  # this CPU (16 lanes), AVX2 code (8)
def test_compiled_blocked_model_matches_onnxruntime(target: str, tmp_path: Path) -> None:
    model = convnet()
    result = compile_model(model, target, tmp_path / "out")
    assert max(result.manifest["verification"]["errors"].values()) <= 1e-4
    x = np.random.default_rng(2).standard_normal((1, 3, 24, 24)).astype(np.float32)
    (got,) = CompiledModel(result.library)(x)
    (expected,) = Runner(model)({"x": x})
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _conv_kernel(channels: int, size: int, block: int) -> Any:
    from tvm import te

    from onnxpress.backends.tvm.blocked_kernels import ConvGeometry, conv2d_nchwc

    data = te.placeholder((1, channels // block, size, size, block), name="x")
    weight = te.placeholder((channels // block, channels, 3, 3, block), name="w")
    out = conv2d_nchwc(data, weight, ConvGeometry((1, 1), (1, 1, 1, 1), (1, 1)), block)
    return te.create_prim_func([data, weight, out])


def test_tile_stacks_channel_blocks_beside_the_rows() -> None:
    from tvm import s_tir

    from onnxpress.backends.tvm.tile_schedule import plan_tile

    sch = s_tir.Schedule(_conv_kernel(128, 28, 16))
    wide = plan_tile(sch, sch.get_sblock("conv2d_nchwc"), 16, 32)  # AVX-512: 32 registers
    assert wide is not None and wide.vector == 4 and wide.width == 16
    assert wide.stack_axis == 1 and wide.stack == 4  # four blocks of output channels
    assert wide.rows == ((3, 4),)  # beside four output columns: 16 accumulators
    sch = s_tir.Schedule(_conv_kernel(128, 28, 8))
    narrow = plan_tile(sch, sch.get_sblock("conv2d_nchwc"), 8, 16)  # AVX2: 16 registers
    assert narrow is not None and narrow.stack_axis == 1 and narrow.stack > 1
    rows = math.prod(tile for _, tile in narrow.rows)
    assert narrow.stack * rows <= 12  # accumulators leave registers for loads


def test_blocked_conv_reads_input_channels_without_divisions() -> None:
    """The reduction runs over (input block, lane): the data read indexes both directly, so
    the inner loop of the tile computes no ``c // block``, ``c % block`` per step."""
    script = _conv_kernel(32, 8, 8).script()
    reads = [line for line in script.splitlines() if "T.reads(" in line and "x[" in line]
    assert reads and not any("//" in line or "%" in line for line in reads)
    assert "T.axis.remap" in script and '"SSSSSRRRR"' in script  # 5 spatial, 4 reductions


def test_a_match_cast_of_a_blocked_tensor_reads_it_back_in_nchw() -> None:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 8, 8), "float32"))
    weight = np.random.default_rng(5).standard_normal((16, 16, 3, 3)).astype(np.float32)
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = builder.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=1))
            relu = builder.emit(relax.op.nn.relu(conv))
            cast = builder.match_cast(relu, relax.TensorType((1, 16, 8, 8), "float32"))
            out = builder.emit_output(relax.op.add(cast, cast))
        builder.emit_func_output(out)
    mod = builder.get()
    rewritten = blocked_layout_pass(16)(mod)  # alone: the pipeline canonicalizes the cast away
    assert not relax.analysis.free_vars(rewritten["main"])  # every variable defined
    assert relax_calls(rewritten) == ["conv2d_nchwc", "relax.nn.relu", "from_blocked", "relax.add"]
    data = np.random.default_rng(6).standard_normal((1, 16, 8, 8)).astype(np.float32)
    padded = np.pad(data, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((1, 16, 8, 8), np.float32)
    for ky in range(3):
        for kx in range(3):
            window = padded[:, :, ky : ky + 8, kx : kx + 8]
            expected += np.einsum("nchw,oc->nohw", window, weight[:, :, ky, kx])
    expected = 2 * np.maximum(expected, 0)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})  # AVX2 code runs here
    executable = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_ragged_row_tile_stays_out_of_the_parallel_loop_and_matches_numpy() -> None:
    """13 output columns in tiles of 10: the tile loop of that axis is not fused into the
    parallel index but unrolled below it, so neither copy of the reduction tests a column
    against the parallel index; the kernel still computes every output."""
    from tvm import s_tir

    from onnxpress.backends.tvm.tile_schedule import plan_tile, schedule_tile

    sch = s_tir.Schedule(_conv_kernel(32, 13, 8))
    block = sch.get_sblock("conv2d_nchwc")
    plan = plan_tile(sch, block, 8, 16)  # AVX2: 16 registers
    assert plan is not None and any(13 % tile for _, tile in plan.rows)
    schedule_tile(sch, block, plan)
    loops = [line.strip() for line in sch.mod["main"].script().splitlines() if " in T." in line]
    assert loops[0].startswith("for") and "T.parallel" in loops[0]
    assert "x_0" not in loops[0] and any(line.startswith("for x_0 in T.unroll(") for line in loops)
    lib = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 4, 13, 13, 8)).astype(np.float32)
    w = rng.standard_normal((4, 32, 3, 3, 8)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 4, 13, 13, 8), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    nchw = x.transpose(0, 1, 4, 2, 3).reshape(1, 32, 13, 13)
    padded = np.pad(nchw, ((0, 0), (0, 0), (1, 1), (1, 1)))
    weight = w.transpose(0, 4, 1, 2, 3).reshape(32, 32, 3, 3)  # [oc, ic, kh, kw]
    expected = np.zeros((32, 13, 13))
    for i in range(3):
        for j in range(3):
            expected += np.einsum(
                "oc,chw->ohw", weight[:, :, i, j], padded[0, :, i : i + 13, j : j + 13]
            )
    got = out.numpy()[0].transpose(0, 3, 1, 2).reshape(32, 13, 13)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _window_kernel(kh: int, kw: int) -> Any:
    from tvm import te

    from onnxpress.backends.tvm.blocked_kernels import ConvGeometry, conv2d_nchwc

    data = te.placeholder((1, 2, 17, 17, 8), name="x")
    weight = te.placeholder((2, 16, kh, kw, 8), name="w")
    padding = (kh // 2, kw // 2, kh // 2, kw // 2)
    out = conv2d_nchwc(data, weight, ConvGeometry((1, 1), padding, (1, 1)), 8)
    return te.create_prim_func([data, weight, out])


def _windows() -> onnx.ModelProto:
    """inception_v3's 17 x 17 convs: 1x1, 5x5, 7x1 and 1x7, padded to keep the size."""
    rng = np.random.default_rng(9)
    nodes, inits, name = [], [], "x"
    for index, (kh, kw) in enumerate([(1, 1), (5, 5), (7, 1), (1, 7)]):
        weight = rng.normal(0, 0.1, (24, 24, kh, kw)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{index}"))
        pads = [kh // 2, kw // 2, kh // 2, kw // 2]
        nodes.append(helper.make_node("Conv", [name, f"w{index}"], [f"c{index}"], pads=pads))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        name = f"r{index}"
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "windows",
        [value("x", TensorProto.FLOAT, [1, 24, 17, 17])],
        [value(name, TensorProto.FLOAT, [1, 24, 17, 17])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_tall_window_reads_a_padded_copy_of_a_blocked_input() -> None:
    """A 5x5 or 7x1 window tests the output rows, an outer loop, at every step: the blocked
    input is padded into a copy first. A 1x7 or 3x3 window reads it in place."""
    copies = {
        (kh, kw): "PadInput" in _window_kernel(kh, kw).script()
        for kh, kw in [(5, 5), (7, 1), (1, 7), (3, 3)]
    }
    assert copies == {(5, 5): True, (7, 1): True, (1, 7): False, (3, 3): False}


@pytest.mark.parametrize("target", ["x86", "avx2"])
def test_compiled_tall_and_wide_windows_match_onnxruntime(target: str, tmp_path: Path) -> None:
    model = _windows()
    result = compile_model(model, target, tmp_path / "out")
    x = np.random.default_rng(10).standard_normal((1, 24, 17, 17)).astype(np.float32)
    (got,) = CompiledModel(result.library)(x)
    (expected,) = Runner(model)({"x": x})
    assert np.abs(expected).max() > 0.1  # the ReLUs leave values to compare
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
