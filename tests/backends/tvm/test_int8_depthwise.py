"""Integer depthwise convs in exact float sums (onnxpress.backends.tvm.int8_depthwise): the
exactness bound, the kernel bit-exact against numpy's integer sums at the 8-bit extremes on
each x86 kind, the DepthwiseRows schedule applied to it, and quantized models (channel counts
that are not a multiple of the lanes, strides 1 and 2) against onnxruntime; skipped without
TVM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_helpers import quantize

tvm = pytest.importorskip("tvm")

from tvm.s_tir import dlight as dl  # noqa: E402

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.grouped_kernels import pack_depthwise_weight  # noqa: E402
from onnxpress.backends.tvm.int8_depthwise import (  # noqa: E402
    MAX_EXACT_TAPS,
    PRODUCT_BOUND,
    depthwise_float_exact,
    fits,
)
from onnxpress.backends.tvm.schedule import schedule_rules  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402
from onnxpress.backends.tvm.tile_schedule import vector_lanes  # noqa: E402

KINDS = [spec for spec in (parse_target("x86"), parse_target("avx2")) if spec.runs_here()]


def test_float_sums_are_exact_up_to_the_tap_bound() -> None:
    assert MAX_EXACT_TAPS * PRODUCT_BOUND < 2**24 <= (MAX_EXACT_TAPS + 1) * PRODUCT_BOUND
    assert fits(np.zeros((8, 1, 3, 3), np.int8)) and fits(np.zeros((8, 1, 22, 22), np.int8))
    assert not fits(np.zeros((8, 1, 23, 23), np.int8))  # 529 taps: left to Relax's int32
    assert fits(np.zeros((16, 8, 3, 3), np.int8))  # grouped: 8 channels x 9 taps per output
    assert not fits(np.zeros((16, 64, 3, 3), np.int8))  # 576 products per output


def reference(data: np.ndarray, weight: np.ndarray, stride: int, dilation: int) -> np.ndarray:
    """int64 depthwise sums of padded NHWC ``data`` and ``[C, 1, KH, KW]`` weights, NCHW."""
    _, height, width, channels = data.shape
    _, _, kh, kw = weight.shape
    oh = (height - dilation * (kh - 1) - 1) // stride + 1
    ow = (width - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((data.shape[0], channels, oh, ow), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            window = data[
                :,
                ky * dilation : ky * dilation + stride * (oh - 1) + 1 : stride,
                kx * dilation : kx * dilation + stride * (ow - 1) + 1 : stride,
            ].astype(np.int64)
            out += window.transpose(0, 3, 1, 2) * weight[None, :, 0, ky, kx, None, None]
    return out


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: s.name)
@pytest.mark.parametrize(
    "dtype, kernel, stride, dilation, width, pad",
    [
        ("uint8", 3, 1, 1, 34, 0),
        ("int8", 5, 2, 2, 39, 0),
        ("uint8", 7, 1, 1, 38, 0),
        ("uint8", 3, 2, 1, 64, 1),  # mobilenet's stride-2 layers: padding read in place
        ("int8", 3, 1, 1, 32, 1),
    ],
)  # output widths 32, 16, 32, 32, 32: column tiles on AVX-512 and AVX2
def test_kernel_is_bit_exact_at_the_extremes(
    spec: Any, dtype: str, kernel: int, stride: int, dilation: int, width: int, pad: int
) -> None:
    target = tvm_target(spec)
    lanes = vector_lanes(target)
    rng = np.random.default_rng(kernel)
    info = np.iinfo(np.dtype(dtype))
    channels = 2 * lanes
    data = rng.integers(info.min, info.max + 1, (1, 30, width, channels)).astype(dtype)
    data[:, :12, :12] = info.max  # whole windows at the extremes: the largest sums
    data[:, 12:24, :12] = info.min
    weight = rng.integers(-128, 128, (channels, 1, kernel, kernel)).astype(np.int8)
    weight[:lanes] = -128
    weight[lanes : lanes + 4] = 127
    packed = pack_depthwise_weight(weight.astype(np.float32), lanes)
    zero = info.max - 3  # a zero point far from 0: the padding must read it, not 0
    func = depthwise_float_exact(
        data.shape, dtype, packed.shape, (stride,) * 2, (dilation,) * 2, (pad,) * 4, zero
    )
    padded = np.pad(data, [(0, 0), (pad, pad), (pad, pad), (0, 0)], constant_values=zero)
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with target:
        mod = dl.ApplyDefaultSchedule(*schedule_rules(target))(mod)
    text = str(mod["main"].script())
    assert (
        "T.parallel" in text and f"for ry in T.unroll(T.int64({kernel}))" in text
    )  # DepthwiseRows
    # channels-last input: rows in parallel, channel blocks inside each column tile, so a
    # pixel's channels are read together (a parallel loop of channel blocks read each
    # pixel's cache lines once per block: 96 channels at 112x112, stride 2, 0.22 -> 0.10 ms)
    assert "for n_y_fused in T.parallel" in text
    lib = tvm.compile(mod, target=target)
    expected = reference(padded, weight, stride, dilation)
    n, c, oh, ow = expected.shape
    out = tvm.runtime.tensor(np.zeros((n, oh, ow, c), np.int32))  # channels last
    lib["main"](tvm.runtime.tensor(data), tvm.runtime.tensor(packed), out)
    got = out.numpy().transpose(0, 3, 1, 2)
    assert np.abs(expected).max() > 2**17  # sums far beyond int16 and float16
    np.testing.assert_array_equal(got, expected)


def conv_chain(
    name: str, weights: dict[str, tuple[int, ...]], nodes: list[Any], x: int, y: list[int]
) -> onnx.ModelProto:
    """A float model of ``nodes`` reading x [1, 3, x, x], writing y, with random weights of
    the given shapes (and Clip bounds 0 and 6)."""
    rng = np.random.default_rng(len(name))
    inits = [
        numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), key)
        for key, shape in weights.items()
    ]
    inits += [
        numpy_helper.from_array(np.array(v, np.float32), k) for k, v in (("lo", 0), ("hi", 6))
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, x, x])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def depthwise_qdq_source() -> onnx.ModelProto:
    """x -> 1x1 conv (20 ch) -> Relu -> depthwise 3x3 stride 2 -> Relu -> 1x1 conv (32) ->
    depthwise 3x3 stride 1 -> Clip(0, 6): 20 channels are no multiple of the lanes."""
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1"], ["c1"]),
        node("Relu", ["c1"], ["r1"]),
        node("Conv", ["r1", "d1", "b1"], ["c2"], group=20, pads=[1] * 4, strides=[2, 2]),
        node("Relu", ["c2"], ["r2"]),
        node("Conv", ["r2", "w2"], ["c3"]),
        node("Conv", ["c3", "d2"], ["c4"], group=32, pads=[1] * 4),
        node("Clip", ["c4", "lo", "hi"], ["y"]),
    ]
    shapes = {"w1": (20, 3, 1, 1), "d1": (20, 1, 3, 3), "b1": (20,), "w2": (32, 20, 1, 1)}
    shapes["d2"] = (32, 1, 3, 3)
    return conv_chain("depthwise_int8", shapes, nodes, 23, [1, 32, 12, 12])


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: s.name)
def test_quantized_depthwise_convs_match_onnxruntime(spec: Any, tmp_path: Path) -> None:
    qdq, _ = quantize(depthwise_qdq_source())
    result: Any = compile_model(qdq, spec, tmp_path / spec.name, int8="auto")
    layers = result.manifest["int8"]["layers"]
    depthwise = [layer["kernel"] for layer in layers if layer["weight"][1] == 1]
    assert depthwise == ["float-exact-depthwise"] * 2
    assert result.manifest["int8"]["lowered"]["conv2d (grouped)"] == 2
    assert result.manifest["verification"]["errors"]["y"] <= 1.0  # steps of onnxruntime


def grouped_qdq_source() -> onnx.ModelProto:
    """x -> 1x1 conv (32 ch) -> Relu -> grouped 3x3 conv (4 groups of 8, stride 2) -> Relu:
    RegNet's and ResNeXt's kind of conv."""
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1"], ["c1"]),
        node("Relu", ["c1"], ["r1"]),
        node("Conv", ["r1", "g", "b"], ["c2"], group=4, pads=[1] * 4, strides=[2, 2]),
        node("Relu", ["c2"], ["y"]),
    ]
    shapes = {"w1": (32, 3, 1, 1), "g": (32, 8, 3, 3), "b": (32,)}
    return conv_chain("grouped_int8", shapes, nodes, 20, [1, 32, 10, 10])


def test_quantized_grouped_conv_runs_as_exact_float_sums(tmp_path: Path) -> None:
    qdq, _ = quantize(grouped_qdq_source())
    result: Any = compile_model(qdq, "x86", tmp_path / "grouped", int8="auto")
    kernels = {
        tuple(layer["weight"]): layer["kernel"] for layer in result.manifest["int8"]["layers"]
    }
    assert kernels[(32, 8, 3, 3)] == "float-exact-grouped"
    assert result.manifest["verification"]["errors"]["y"] <= 1.0
