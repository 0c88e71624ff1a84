"""layout_sink.py: transposes (and row reshapes) move below elementwise ops, requantizations and residual adds
and cancel against their inverse; the rewritten function computes the same values (run on
TVM's VM, compared with the original function), and a transpose whose other operand is a
large tensor stays where it is."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from qdq_helpers import quantize, two_pointwise_convs  # noqa: E402
from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.build import import_relax  # noqa: E402
from onnxpress.backends.tvm.int8 import lower_qdq_to_integer  # noqa: E402
from onnxpress.backends.tvm.layout_sink import sink_layout_changes  # noqa: E402
from onnxpress.backends.tvm.prepare import prepare  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402

NCHW, NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
SHAPE = (1, 6, 5, 16)  # N, H, W, C


def _module(build: Any, *inputs: tuple[tuple[int, ...], str]) -> Any:
    builder = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(s, d)) for i, (s, d) in enumerate(inputs)]
    with builder.function("main", params):
        with builder.dataflow():
            out = builder.emit_output(build(builder, *params))
        builder.emit_func_output(out)
    return builder.get()


def _permutes(mod: Any) -> int:
    """Transposes of activations (a per-channel vector's reshape-and-transpose not counted)."""
    lines = str(mod["main"].script()).splitlines()
    typed = [
        re.search(r"R.Tensor\(\(([0-9, ]+)\)", line) for line in lines if "R.permute_dims" in line
    ]
    shapes = [[int(d) for d in m.group(1).split(",")] if m else [2, 2] for m in typed]
    return sum(1 for shape in shapes if sum(d > 1 for d in shape) > 1)


def _run(mod: Any, *arrays: np.ndarray) -> np.ndarray:
    executable = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return np.asarray(vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy())


def requantizing_chain(builder: Any, acc: Any, residual: Any) -> Any:
    """int32 NHWC sums -> NCHW -> correction, scale, bias, ReLU6, a residual add, per-channel
    quantize -> int16 -> NHWC: the shape of the int8 lowering's epilogue between layers."""
    rng = np.random.default_rng(0)
    channels = SHAPE[3]
    column = (1, channels, 1, 1)
    x = builder.emit(relax.op.permute_dims(acc, NCHW))
    x = builder.emit(relax.op.subtract(x, relax.const(rng.integers(-9, 9, column).astype("int32"))))
    x = builder.emit(relax.op.astype(x, "float32"))
    x = builder.emit(relax.op.multiply(x, relax.const(rng.uniform(0.01, 0.02, column), "float32")))
    bias = builder.emit(
        relax.op.reshape(relax.const(rng.normal(0, 1, channels), "float32"), column)
    )
    x = builder.emit(relax.op.add(x, bias))
    x = builder.emit(relax.op.clip(x, 0.0, 6.0))
    skip = builder.emit(relax.op.permute_dims(residual, NCHW))
    x = builder.emit(relax.op.add(x, skip))
    scale = relax.const(rng.uniform(0.02, 0.05, channels), "float32")
    zero = relax.const(rng.integers(0, 9, channels).astype("uint8"))
    x = builder.emit(relax.op.quantize(x, scale, zero, axis=1, out_dtype="uint8"))
    x = builder.emit(relax.op.astype(x, "int16"))
    return builder.emit(relax.op.permute_dims(x, NHWC))


def test_an_epilogue_between_channels_last_layers_loses_its_transposes() -> None:
    mod = _module(requantizing_chain, (SHAPE, "int32"), (SHAPE, "float32"))
    assert _permutes(mod) == 3
    sunk = sink_layout_changes(mod)
    assert _permutes(sunk) == 0
    rng = np.random.default_rng(1)
    acc = rng.integers(-2000, 2000, SHAPE).astype("int32")
    residual = rng.normal(0, 2, SHAPE).astype("float32")
    expected = _run(mod, acc, residual)
    assert expected.dtype == np.int16 and len(np.unique(expected)) > 20
    np.testing.assert_array_equal(_run(sunk, acc, residual), expected)


def test_a_transpose_meeting_a_large_untransposed_operand_stays() -> None:
    def build(builder: Any, x: Any, other: Any) -> Any:
        t = builder.emit(relax.op.permute_dims(x, NCHW))
        y = builder.emit(relax.op.add(t, other))  # other: a full NCHW tensor
        return builder.emit(relax.op.permute_dims(y, NHWC))

    shape, nchw = (1, 32, 32, 16), (1, 16, 32, 32)  # more elements than SMALL
    mod = _module(build, (shape, "float32"), (nchw, "float32"))
    sunk = sink_layout_changes(mod)
    assert _permutes(sunk) == 2
    rng = np.random.default_rng(2)
    x, other = rng.normal(size=shape).astype("float32"), rng.normal(size=nchw).astype("float32")
    np.testing.assert_array_equal(_run(sunk, x, other), _run(mod, x, other))


def test_two_transposes_compose_into_one() -> None:
    def build(builder: Any, x: Any) -> Any:
        t = builder.emit(relax.op.permute_dims(x, [0, 1, 3, 2]))
        return builder.emit(relax.op.permute_dims(t, NCHW))

    mod = _module(build, (SHAPE, "float32"))
    sunk = sink_layout_changes(mod)
    assert _permutes(sunk) == 1
    x = np.random.default_rng(3).normal(size=SHAPE).astype("float32")
    np.testing.assert_array_equal(_run(sunk, x), _run(mod, x))


def test_the_int8_lowering_keeps_channels_last_between_integer_layers() -> None:
    """Two quantized 1x1 convs lowered for AVX2: between them no transpose is left, and their
    channels-last rows (36, a multiple of the register tile) go to the GEMM without im2col."""
    model = two_pointwise_convs()
    qdq, _ = quantize(model, "qdq{float-heads=false}", targets=["avx512-vnni"])
    prepared = prepare(qdq, None)
    mod, lowering = lower_qdq_to_integer(import_relax(prepared), tvm_target(parse_target("avx2")))
    assert lowering.lowered["conv2d"] == 2
    # the input's NCHW -> NHWC and the output's NHWC -> NCHW; none in between
    assert _permutes(mod) == 2
    assert "onnxpress_int8_im2col" not in mod.script()


def test_a_max_pool_between_integer_layers_pools_channels_last() -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (16, 8, 1, 1)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 16, 1, 1)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2]),
            helper.make_node("Conv", ["p", "w2"], ["y"], name="c2"),
        ],
        "pooled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    qdq, _ = quantize(model, "qdq{float-heads=false}", targets=["avx512-vnni"])
    mod, lowering = lower_qdq_to_integer(
        import_relax(prepare(qdq, None)), tvm_target(parse_target("avx2"))
    )
    assert lowering.lowered["max_pool2d"] == 1
    text = mod.script()
    assert 'layout="NHWC"' in text and _permutes(mod) == 2  # the model's input and output
