"""Untuned CPU schedules (tvm_schedule, tvm_tile_schedule); skipped without TVM.

The tiled-reduction rule must fire on legalized conv2d kernels of every shape family
(padded, strided, dilated, grouped, depthwise, 1x1) and on matmuls, and what it builds
must match onnxruntime (compile_model's check) and the unscheduled pipeline exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvm_kernels import xy_model

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic  # noqa: E402

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.conv_packed import conv_kernel_layout_pass  # noqa: E402
from onnxpress.backends.tvm.schedule import cpu_pipeline, schedule_rules  # noqa: E402
from onnxpress.backends.tvm.strided_schedule import deinterleaved_rule  # noqa: E402
from onnxpress.backends.tvm.tile_schedule import (  # noqa: E402
    one_reduction,
    plan_tile,
    row_tile,
    tiled_reduction_rule,
    vector_lanes,
    vector_registers,
    vector_width,
)

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})

# name -> (in channels, size, out channels, kernel, stride, pad, dilation, groups, bias)
CONVS = {
    "regular": (8, 10, 16, 3, 1, 1, 1, 1, True),
    "strided": (8, 11, 16, 3, 2, 1, 1, 1, False),
    "dilated-5x5": (4, 12, 8, 5, 1, 2, 2, 1, True),
    "grouped": (16, 9, 32, 3, 1, 1, 1, 2, True),
    "depthwise": (16, 10, 16, 3, 1, 1, 1, 16, True),
    "depthwise-strided": (16, 9, 16, 3, 2, 1, 1, 16, False),
    "depthwise-strided-even": (16, 10, 16, 3, 2, 1, 1, 16, True),  # padding de-interleaved
    "pointwise-odd": (6, 7, 10, 1, 1, 0, 1, 1, True),
    "pointwise-flat": (8, 8, 32, 1, 1, 0, 1, 1, True),  # 64 pixels: one flat GEMM axis
    "packed-channels": (16, 7, 64, 3, 1, 1, 1, 1, True),  # weights in blocks of channels
}


def conv_model(spec: tuple[int, ...], seed: int = 0) -> onnx.ModelProto:
    cin, size, cout, kernel, stride, pad, dilation, groups, bias = spec
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((cout, cin // groups, kernel, kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        inputs.append("b")
    conv = helper.make_node(
        "Conv",
        inputs,
        ["c"],
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[pad] * 4,
        dilations=[dilation, dilation],
        group=groups,
    )
    relu = helper.make_node("Relu", ["c"], ["y"])
    out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    graph = helper.make_graph(
        [conv, relu],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, out, out])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def relax_conv(cin: int, size: int, cout: int, groups: int = 1, stride: int = 1) -> Any:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, cin, size, size), "float32"))
    w = relax.Var("w", relax.TensorType((cout, cin // groups, 3, 3), "float32"))
    with builder.function("main", [x, w]):
        with builder.dataflow():
            conv = relax.op.nn.conv2d(x, w, strides=stride, padding=1, groups=groups)
            out = builder.emit_output(builder.emit(relax.op.nn.relu(builder.emit(conv))))
        builder.emit_func_output(out)
    return builder.get()


def scheduled_kernels(mod: Any, target: Any, rule: Any) -> dict[str, str | None]:
    """Kernel name -> the rule's scheduled TIR (None where the rule refused)."""
    with target:
        mod = conv_kernel_layout_pass(vector_lanes(target))(mod)
        mod = tvm.transform.Sequential(cpu_generic.legalize_passes(target))(mod)
    out: dict[str, str | None] = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            sch = rule.apply(func, target, False)
            out[gvar.name_hint] = None if sch is None else sch.mod["main"].script()
    return out


def test_vector_width_follows_cpu_features() -> None:
    assert vector_lanes(AVX512) == 16
    assert vector_lanes(AVX2) == 8
    assert vector_lanes(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})) == 4
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert vector_lanes(arm) == 4
    assert [vector_registers(t) for t in (AVX512, AVX2, arm)] == [32, 16, 32]
    assert [vector_width(e, 16) for e in (64, 28, 30, 7, 10, 3, 17)] == [16, 4, 15, 7, 10, 0, 0]
    assert [row_tile(e, 14) for e in (56, 28, 7, 13, 17)] == [14, 14, 7, 13, 14]


def test_conv_weights_become_ihwo_unless_depthwise() -> None:
    regular = conv_kernel_layout_pass(16)(relax_conv(8, 8, 32))["main"].script()
    assert "R.permute_dims(w, axes=[1, 2, 3, 0])" in regular
    assert 'kernel_layout="IHWO"' in regular
    depthwise = conv_kernel_layout_pass(16)(relax_conv(16, 8, 16, groups=16))["main"].script()
    assert "permute_dims" not in depthwise and 'kernel_layout="OIHW"' in depthwise


@pytest.mark.parametrize(
    "groups, stride, lanes",
    [(1, 1, 16), (1, 2, 16), (2, 1, 16), (32, 1, 16), (32, 2, 8)],  # depthwise: 16 or 8 columns
)
def test_rule_tiles_conv_kernels(groups: int, stride: int, lanes: int) -> None:
    kernels = scheduled_kernels(
        relax_conv(32, 16, 32, groups, stride), AVX512, tiled_reduction_rule(16, 32)
    )
    conv = next(text for name, text in kernels.items() if "conv2d" in name)
    assert conv is not None
    assert f"T.vectorized(T.int64({lanes}))" in conv  # output channels or output columns
    assert "_global" in conv and "T.unroll(" in conv  # the accumulator tile (on the stack)
    assert "T.max(" in conv  # relu inlined into the write-back
    if groups == 1 and stride == 1:  # 2.4M multiply-adds: worth two threads
        assert "T.parallel(" in conv


def lowered_for_cpu(func: Any, target: Any) -> str:
    """``func`` (a scheduled PrimFunc) through TVM's TIR lowering for ``target``: the
    script just before code generation, where buffers have become stack arrays or
    workspace allocations."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    mod = tvm.tirx.transform.BindTarget(target.with_host(target))(mod)
    pipeline, finalize_host, _ = tvm.tirx.get_default_tir_pipeline(target)
    return str(finalize_host()(pipeline(mod)).script())


@pytest.mark.parametrize("groups", [1, 32])
def test_tile_accumulators_live_on_the_stack(groups: int) -> None:
    """The register tile's accumulators are a small "global" buffer, which TVM's CPU
    lowering puts on the stack (LLVM keeps it in registers); a "local" one came from the
    workspace pool, one allocation and free per tile of every parallel loop (7% of
    mobilenet_v2 int8's samples in perf; a 32 -> 16 channel 1x1 conv at 112x112 0.12 ->
    0.07 ms). AVX2's tiles (at most 12 vectors, 384 bytes) fit the 1 KB that TVM puts on
    the stack; AVX-512's largest do not and still come from the pool."""
    kernels = scheduled_kernels(relax_conv(32, 16, 32, groups), AVX2, tiled_reduction_rule(8, 16))
    text = next(t for name, t in kernels.items() if "conv2d" in name and t is not None)
    lowered = lowered_for_cpu(tvm.script.from_source(text), AVX2).splitlines()
    tiles = [line for line in lowered if "_global = " in line]  # the accumulators' buffer
    assert tiles and all("T.alloc_buffer(" in line for line in tiles)  # a stack array
    assert not any("TVMBackendAllocWorkspace" in line for line in tiles)


@pytest.mark.parametrize(
    "cout, size, target, lanes, registers, stack, rows",
    [
        (64, 14, AVX512, 16, 32, 2, 7),  # 2 x 16 channels x 7 columns: 14 accumulators
        (64, 56, AVX512, 16, 32, 4, 4),  # 4 x 16 x 4 columns (56 = 14 x 4, no ragged tail)
        (16, 9, AVX2, 8, 16, 1, 9),  # 2 x 3 would keep 6 FMA chains: one vector x 9 columns
        (64, 56, AVX2, 8, 16, 2, 4),  # AVX2 stacks too: 2 x 8 channels x 4 columns
        (16, 7, AVX512, 16, 32, 1, 7),  # one vector of channels: nothing to stack
    ],
)
def test_tile_stacks_channel_vectors_beside_the_rows(
    cout: int, size: int, target: Any, lanes: int, registers: int, stack: int, rows: int
) -> None:
    """Several vectors of output channels share each broadcast input value, so a step loads
    ``stack + rows`` values for ``stack * rows`` FMAs; ragged row tiles are not stacked."""
    with target:
        mod = conv_kernel_layout_pass(lanes)(relax_conv(16, size, cout))
        mod = tvm.transform.Sequential(cpu_generic.legalize_passes(target))(mod)
    func = next(f for g, f in mod.functions.items() if "conv2d" in g.name_hint)
    found = one_reduction(func)
    assert found is not None
    sch, _, block = found
    plan = plan_tile(sch, block, lanes, registers)
    assert plan is not None and plan.vector == 1 and plan.width == lanes
    assert (plan.stack, plan.rows[0][1]) == (stack, rows)
    assert plan.stack * math.prod(tile for _, tile in plan.rows) <= registers * 3 // 4


def test_matrix_vector_product_keeps_several_chains() -> None:
    """Batch 1 classifier (1 x 512 @ 512 x 1000): no rows to tile, so 5 vectors of 8
    columns side by side keep 5 FMA chains in flight, on all cores."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 512), "float32"))
    w = relax.Var("w", relax.TensorType((512, 1000), "float32"))
    with builder.function("main", [x, w]):
        with builder.dataflow():
            out = builder.emit_output(builder.emit(relax.op.matmul(x, w)))
        builder.emit_func_output(out)
    with AVX512:
        mod = tvm.transform.Sequential(cpu_generic.legalize_passes(AVX512))(builder.get())
    found = one_reduction(next(f for g, f in mod.functions.items() if "matmul" in g.name_hint))
    assert found is not None
    plan = plan_tile(found[0], found[2], 16, 32)
    assert plan is not None and (plan.width, plan.stack, plan.rows) == (8, 5, ())
    text = scheduled_kernels(builder.get(), AVX512, tiled_reduction_rule(16, 32))["matmul"]
    assert text is not None and "T.parallel(T.int64(25))" in text


def test_global_average_pool_sums_in_vector_lanes() -> None:
    """mean over H, W (squeeze-excitation, global pooling): the 56 x 56 run is summed in 16
    partial lanes per channel (rfactor), channels in parallel; within float rounding of
    numpy's sum."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 96, 56, 56), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(builder.emit(relax.op.mean(x, axis=[2, 3], keepdims=True)))
        builder.emit_func_output(out)
    mod = builder.get()
    lowered = cpu_pipeline(AVX512)(mod)
    text = next(f.script() for g, f in lowered.functions.items() if "mean" in g.name_hint)
    assert "_rf" in text and "T.vectorized(T.int64(16))" in text and "T.parallel(" in text
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if tvm.target.codegen.target_has_features("avx2", host):
        data = np.random.default_rng(3).standard_normal((1, 96, 56, 56)).astype(np.float32)
        got = _run(mod, AVX2, cpu_pipeline(AVX2), [data])
        np.testing.assert_allclose(got, data.mean(axis=(2, 3), keepdims=True), atol=1e-6)


def test_rule_tiles_matmul_and_refuses_softmax() -> None:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((12, 24), "float32"))
    w = relax.Var("w", relax.TensorType((24, 32), "float32"))
    with builder.function("main", [x, w]):
        with builder.dataflow():
            y = builder.emit(relax.op.nn.softmax(builder.emit(relax.op.matmul(x, w))))
            out = builder.emit_output(y)
        builder.emit_func_output(out)
    kernels = scheduled_kernels(builder.get(), AVX2, tiled_reduction_rule(8, 16))
    assert kernels["softmax"] is None
    assert "T.vectorized(T.int64(8))" in str(kernels["matmul"])


def test_elementwise_chain_is_inlined_and_vectorized() -> None:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 28, 28), "float32"))
    scale = relax.const(np.full((1, 16, 1, 1), 0.5, np.float32))
    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(relax.op.add(builder.emit(relax.op.multiply(x, scale)), scale))
            out = builder.emit_output(builder.emit(relax.op.nn.relu(y)))
        builder.emit_func_output(out)
    with AVX512:
        mod = tvm.transform.Sequential(cpu_generic.legalize_passes(AVX512))(builder.get())
        mod = tvm.s_tir.dlight.ApplyDefaultSchedule(*schedule_rules(AVX512))(mod)
    (kernel,) = [f.script() for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert 'T.sblock("T_multiply")' not in kernel and 'T.sblock("T_add")' not in kernel
    assert "T.vectorized(T.int64(4))" in kernel  # 28 = 7 x 4 lanes, not one 14-lane vector


def _run(mod: Any, target: Any, pipeline: Any, args: list[np.ndarray]) -> np.ndarray:
    executable = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return np.asarray(vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy())


@pytest.mark.parametrize("groups, stride", [(1, 1), (4, 2), (16, 1)])
def test_avx2_schedule_is_exact(groups: int, stride: int) -> None:
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if not tvm.target.codegen.target_has_features("avx2", host):
        pytest.skip("this CPU cannot run AVX2 code")
    mod = relax_conv(16, 9, 16, groups, stride)
    rng = np.random.default_rng(1)
    args = [
        rng.standard_normal([int(d) for d in p.ty.shape]).astype(np.float32)
        for p in mod["main"].params
    ]
    expected = _run(mod, AVX2, relax.get_default_pipeline(AVX2), args)
    got = _run(mod, AVX2, cpu_pipeline(AVX2), args)
    np.testing.assert_array_equal(got, expected)  # same reduction order per output
    rules = [type(rule).__name__ for rule in schedule_rules(AVX2)]
    # first match wins: the specialised rules ahead of the general tile (the int8 GEMM's
    # fused epilogue first: no other rule may touch its tensorized blocks)
    assert rules[:2] == ["FusedEpilogue", "WinogradTransforms"]
    assert rules.index("DepthwiseRows") < rules.index("TiledReduction")
    assert rules.index("Deinterleaved") < rules.index("TiledReduction")


def test_strided_depthwise_reads_its_padding_deinterleaved() -> None:
    """Stride 2: the padding is stored as [.., w % 2, w // 2], so that the vector of output
    columns loads consecutive floats; bit-exact against TVM's own pipeline."""
    mod = relax_conv(16, 10, 16, groups=16, stride=2)
    conv = next(
        text
        for name, text in scheduled_kernels(mod, AVX2, deinterleaved_rule(8, 16)).items()
        if "conv2d" in name
    )
    assert conv is not None and "T.int64(2), T.int64(6)" in conv  # pad: 12 columns -> 2 x 6
    assert "v_rx % T.int64(2), v_rx // T.int64(2) + v_xx" in conv  # unit-stride in x
    assert "T.vectorized(T.int64(5))" in conv  # 5 output columns, one vector
    refused = scheduled_kernels(
        relax_conv(16, 9, 16, groups=16, stride=2), AVX2, deinterleaved_rule(8, 16)
    )
    assert all(text is None for text in refused.values())  # 11 padded columns: odd
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if tvm.target.codegen.target_has_features("avx2", host):
        rng = np.random.default_rng(2)
        args = [rng.standard_normal((1, 16, 10, 10)), rng.standard_normal((16, 1, 3, 3))]
        args = [a.astype(np.float32) for a in args]
        expected = _run(mod, AVX2, relax.get_default_pipeline(AVX2), args)
        np.testing.assert_array_equal(_run(mod, AVX2, cpu_pipeline(AVX2), args), expected)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_compiled_convs_match_onnxruntime(name: str, tmp_path: Path) -> None:
    result = compile_model(conv_model(CONVS[name]), "x86", tmp_path / name)
    assert result.manifest["schedules"] == "onnxpress-default"
    assert result.manifest["verification"]["errors"]["y"] <= 1e-5


def _conv_then_crop(spatial: int, groups: int) -> onnx.ModelProto:
    """Conv (bias, same padding) whose last output column a Slice drops (wav2vec2's
    positional conv and its SamePad), big enough to run in parallel."""
    rng = np.random.default_rng(4)
    channels, size, kernel = (64, 64, 16) if spatial == 1 else (32, 24, 4)
    window = [kernel] * spatial
    inits = [
        numpy_helper.from_array(
            rng.standard_normal((channels, channels // groups, *window)).astype(np.float32), "w"
        ),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b"),
        *(
            numpy_helper.from_array(np.array([v], np.int64), n)
            for n, v in [("s", 0), ("e", -1), ("a", spatial + 1)]
        ),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["x", "w", "b"], ["c"], group=groups, pads=[kernel // 2] * 2 * spatial
        ),
        helper.make_node("Slice", ["c", "s", "e", "a"], ["y"]),
    ]
    shape = [1, channels, *([size] * spatial)]
    out = [1, channels, *([size + 1] * (spatial - 1)), size]
    return xy_model(nodes, inits, shape, out)


@pytest.mark.parametrize(("spatial", "groups"), [(1, 4), (1, 1), (2, 4), (2, 1)])
def test_a_cropped_conv_output_is_not_written_past_its_rows(
    spatial: int, groups: int, tmp_path: Path
) -> None:
    # the Slice is not inlined into the conv's write-back: TVM stored all size + 1 columns
    # through the crop's indices, into the next row (max-rel 0.2-1.0 on wav2vec2)
    result = compile_model(_conv_then_crop(spatial, groups), "x86", tmp_path / "crop")
    assert result.manifest["verification"]["errors"]["y"] <= 1e-5
