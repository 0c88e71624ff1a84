"""height_one.py: the ops between Conv1d layers (bias, activations, 1-D pools, a mean over
the width, channel concat, residual adds, per-channel gates) run on the 4-D tensors of the
height-1 conv2d, so a Conv1d net stays in the blocked layout from its first conv to its
last; the rewrite is bit-identical, ops it cannot move stay 3-D, and compiled models
match onnxruntime on this CPU and in AVX2 code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from tvm_kernels import compiled_xy, relax_calls, xy_model

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.build import import_relax  # noqa: E402
from onnxpress.backends.tvm.conv_as_conv2d import conv_as_conv2d_pass  # noqa: E402
from onnxpress.backends.tvm.height_one import sink_squeeze_pass  # noqa: E402
from onnxpress.backends.tvm.prepare import prepare  # noqa: E402
from onnxpress.backends.tvm.schedule import layout_passes  # noqa: E402

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})


def conv1d_block_net(split: bool = False) -> onnx.ModelProto:
    """x [1, 16, 50] -> conv + bias, Relu, MaxPool1d -> two conv branches, concat, residual
    add, a gate by the mean over the width (Sigmoid) -> AvgPool1d -> conv -> y [1, 8, 10].
    With ``split``, a GLU (Split along the channels, which stays 3-D) follows the pool."""
    rng = np.random.default_rng(0)
    inits = []

    def conv(name: str, source: str, out: int, cin: int, kernel: int, pad: int) -> onnx.NodeProto:
        w = rng.normal(size=(out, cin, kernel)).astype(np.float32) * 0.3
        b = rng.normal(size=out).astype(np.float32) * 0.1
        inits.extend(
            [numpy_helper.from_array(w, "w" + name), numpy_helper.from_array(b, "b" + name)]
        )
        inputs = [source, "w" + name, "b" + name]
        return helper.make_node("Conv", inputs, [name], kernel_shape=[kernel], pads=[pad, pad])

    nodes = [
        conv("c0", "x", 32, 16, 3, 1),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("MaxPool", ["r0"], ["p0"], kernel_shape=[3], strides=[2], pads=[1, 1]),
    ]
    if split:
        nodes += [
            helper.make_node("Split", ["p0"], ["ga", "gb"], axis=1),
            helper.make_node("Sigmoid", ["gb"], ["gs"]),
            helper.make_node("Mul", ["ga", "gs"], ["glu"]),
            conv("cg", "glu", 32, 16, 1, 0),
        ]
    source = "cg" if split else "p0"
    nodes += [
        conv("ca", source, 16, 32, 1, 0),
        conv("cb", source, 16, 32, 3, 1),
        helper.make_node("Concat", ["ca", "cb"], ["cat"], axis=1),
        helper.make_node("Add", ["cat", source], ["res"]),
        helper.make_node("ReduceMean", ["res"], ["m"], axes=[2], keepdims=1),
        helper.make_node("Sigmoid", ["m"], ["gate"]),
        helper.make_node("Mul", ["res", "gate"], ["se"]),
        helper.make_node("AveragePool", ["se"], ["p1"], kernel_shape=[2], strides=[2]),
        conv("y", "p1", 8, 32, 3, 0),
    ]
    return xy_model(nodes, inits, [1, 16, 50], [1, 8, 10])


def test_a_conv1d_net_stays_blocked_between_its_first_and_last_conv() -> None:
    mod = import_relax(prepare(conv1d_block_net()))
    with AVX512:
        ops = relax_calls(tvm.transform.Sequential(layout_passes(AVX512))(mod))
    blocked = [op for op in ops if op.endswith("_nchwc")]
    assert blocked == ["conv2d_nchwc", "max_pool_nchwc"] + ["conv2d_nchwc"] * 3
    # one conversion back, after the last conv; no 3-D op between the convs
    assert ops.count("from_blocked") == 1 and ops.count("relax.squeeze") == 1
    assert ops.count("relax.expand_dims") == 1  # the input's, before the first conv
    assert "relax.nn.max_pool1d" not in ops and "relax.nn.avg_pool1d" not in ops


def test_an_op_it_cannot_move_keeps_the_squeeze_and_the_rest_moves() -> None:
    mod = import_relax(prepare(conv1d_block_net(split=True)))
    with AVX512:
        ops = relax_calls(tvm.transform.Sequential(layout_passes(AVX512))(mod))
    assert "relax.split" in ops  # 3-D: one conversion to NCW before it
    assert ops.count("from_blocked") == 2 and ops.count("relax.squeeze") == 2
    assert [op for op in ops if op.endswith("_nchwc")].count("conv2d_nchwc") == 5


def test_sinking_is_bit_identical() -> None:
    mod = conv_as_conv2d_pass()(import_relax(prepare(conv1d_block_net())))
    sunk = sink_squeeze_pass()(mod)
    text = sunk["main"].script()
    assert "R.nn.max_pool2d" in text and "R.nn.avg_pool2d" in text
    x = np.random.default_rng(1).standard_normal((1, 16, 50)).astype(np.float32)
    results = []
    for module in (mod, sunk):
        built = tvm.compile(module, target="llvm")
        out = relax.VirtualMachine(built, tvm.cpu())["main"](tvm.runtime.tensor(x))
        results.append((out if hasattr(out, "numpy") else out[0]).numpy())
    np.testing.assert_array_equal(results[1], results[0])


def test_other_operands_get_a_height_axis() -> None:
    """A [W] constant, a [C, W] constant and a 3-D graph input beside a squeezed tensor."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 1, 6), "float32"))
    other = relax.Var("o", relax.TensorType((1, 4, 6), "float32"))
    rng = np.random.default_rng(2)
    row, plane = rng.normal(size=6), rng.normal(size=(4, 6))
    with builder.function("main", [x, other]):
        with builder.dataflow():
            y = builder.emit(relax.op.squeeze(x, [2]))
            y = builder.emit(relax.op.add(y, relax.const(row.astype(np.float32))))
            y = builder.emit(relax.op.multiply(y, relax.const(plane.astype(np.float32))))
            y = builder.emit(relax.op.subtract(other, y))
            out = builder.emit_output(relax.op.expand_dims(y, [2]))
        builder.emit_func_output(out)
    mod = builder.get()
    sunk = relax.transform.CanonicalizeBindings()(sink_squeeze_pass()(mod))
    assert "R.squeeze" not in relax.transform.DeadCodeElimination()(sunk)["main"].script()
    feeds = [rng.normal(size=s).astype(np.float32) for s in ((1, 4, 1, 6), (1, 4, 6))]
    results = []
    for module in (mod, sunk):
        vm = relax.VirtualMachine(tvm.compile(module, target="llvm"), tvm.cpu())
        results.append(vm["main"](*(tvm.runtime.tensor(f) for f in feeds)).numpy())
    np.testing.assert_array_equal(results[1], results[0])
    expected = (
        feeds[1][:, :, None, :]
        - (feeds[0] + row.astype(np.float32)) * plane.astype(np.float32)[:, None, :]
    )
    np.testing.assert_allclose(results[0], expected, rtol=1e-6)


@pytest.mark.parametrize("target", ["x86", "avx2"])  # this CPU, AVX2 code (8 lanes)
@pytest.mark.parametrize("split", [False, True])
def test_compiled_conv1d_block_net_matches_onnxruntime(
    target: str, split: bool, tmp_path: Path
) -> None:
    x = np.random.default_rng(3).standard_normal((1, 16, 50)).astype(np.float32)
    got, expected = compiled_xy(conv1d_block_net(split), target, tmp_path / "out", x)
    assert got.shape == expected.shape == (1, 8, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
