"""Channel-grouped convs in the blocked layout (onnxpress.backends.tvm.grouped_kernels):
which groups line up with channel blocks, the packed weights against a plain grouped conv
in numpy, and compiled models with grouped convs (ResNeXt's and RegNet's group widths,
strided, and one that does not line up) against onnxruntime, on this CPU and in AVX2 code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.backends.tvm.grouped_kernels import group_window, pack_group_weight

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.core.verify import Runner  # noqa: E402


def test_groups_line_up_with_blocks_or_not() -> None:
    assert group_window(8, 8, 8) == 8  # RegNet: one group per block of 8
    assert group_window(32, 32, 8) == 32  # ResNeXt's last stage: four blocks per group
    assert group_window(4, 4, 8) == 8  # ResNeXt's first stage: two groups per block
    assert group_window(4, 4, 16) == 16  # ... four per block of 16 (AVX-512)
    assert group_window(3, 3, 8) == 0  # a group straddles blocks
    assert group_window(4, 8, 8) == 0  # two groups per block, but 4 in -> 8 out


def _grouped_conv(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """[C, H, W] x grouped OIHW weights, valid 3x3: the definition, in numpy."""
    out, in_group, kh, kw = w.shape
    h, wd = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((out, h, wd))
    for o in range(out):
        g = o // (out // groups)
        for i in range(kh):
            for j in range(kw):
                y[o] += np.einsum(
                    "c,chw->hw",
                    w[o, :, i, j],
                    x[g * in_group : (g + 1) * in_group, i : i + h, j : j + wd],
                )
    return y


@pytest.mark.parametrize("in_group", [4, 8, 16])
def test_packed_weights_sum_each_output_over_its_group_only(in_group: int) -> None:
    rng = np.random.default_rng(11)
    channels, block = 32, 8
    groups = channels // in_group
    w = rng.standard_normal((channels, in_group, 3, 3)).astype(np.float32)
    x = rng.standard_normal((channels, 6, 6)).astype(np.float32)
    packed = pack_group_weight(w, groups, block)
    window = group_window(in_group, in_group, block)
    assert packed.shape == (channels // block, window, 3, 3, block)
    got = np.zeros((channels, 4, 4))
    for ob in range(channels // block):
        first = (
            ob * block // in_group * window // block * block if in_group >= block else ob * block
        )
        part = x[first : first + window]
        for i in range(3):
            for j in range(3):
                got[ob * block : (ob + 1) * block] += np.einsum(
                    "co,chw->ohw", packed[ob, :, i, j, :], part[:, i : i + 4, j : j + 4]
                )
    np.testing.assert_allclose(got, _grouped_conv(x, w, groups), rtol=1e-4, atol=1e-4)
    if in_group < block:  # two groups per block: the other group's weights are zero
        assert not packed[0, in_group:, :, :, :in_group].any()


def _model(convs: list[tuple[int, int, int]]) -> onnx.ModelProto:
    """A 1x1 conv to 48 channels, then grouped 3x3 convs (out channels, groups, stride)."""
    rng = np.random.default_rng(12)
    value = helper.make_tensor_value_info
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (48, 16, 1, 1)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"])]
    name, channels, size = "r", 48, 14
    for index, (out, groups, stride) in enumerate(convs):
        weight = rng.normal(0, 0.3, (out, channels // groups, 3, 3)).astype(np.float32)
        bias = rng.normal(0, 0.1, out).astype(np.float32)
        inits += [
            numpy_helper.from_array(weight, f"g{index}"),
            numpy_helper.from_array(bias, f"b{index}"),
        ]
        nodes.append(
            helper.make_node(
                "Conv", [name, f"g{index}", f"b{index}"], [f"y{index}"],
                group=groups, pads=[1, 1, 1, 1], strides=[stride, stride],
            )
        )  # fmt: skip
        name, channels, size = f"y{index}", out, (size - 1) // stride + 1
    graph = helper.make_graph(
        nodes, "grouped", [value("x", TensorProto.FLOAT, [1, 16, 14, 14])],
        [value(name, TensorProto.FLOAT, [1, channels, size, size])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", ["x86", "avx2"])
def test_compiled_grouped_convs_match_onnxruntime(target: str, tmp_path: Path) -> None:
    # 4-channel groups, 16 strided, 8, and 3 (which stay NCHW)
    model = _model([(48, 12, 1), (48, 3, 2), (48, 6, 1), (48, 16, 1)])
    result = compile_model(model, target, tmp_path / "out")
    x = np.random.default_rng(13).standard_normal((1, 16, 14, 14)).astype(np.float32)
    (got,) = CompiledModel(result.library)(x)
    (expected,) = Runner(model)({"x": x})
    assert got.shape == (1, 48, 7, 7)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mcpu", ["haswell", "skylake-avx512"])  # blocks of 8, of 16
def test_grouped_convs_that_line_up_run_blocked(mcpu: str) -> None:
    from onnxpress.backends.tvm.build import import_relax
    from onnxpress.backends.tvm.prepare import prepare
    from onnxpress.backends.tvm.schedule import layout_passes

    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    model = _model([(48, 12, 1), (48, 3, 2), (48, 6, 1), (48, 16, 1)])
    with target:
        mod = tvm.transform.Sequential(layout_passes(target))(import_relax(prepare(model, None)))
    names = [gv.name_hint for gv in mod.functions]
    assert sum("group_conv2d_nchwc" in n for n in names) == 3  # not the 3-channel groups


def test_groups_in_a_padded_last_block_read_zero_weights_for_the_padding() -> None:
    """24 channels in 8-channel groups, blocks of 16 (AVX-512): the second block holds one
    group and 8 padded channels. The kernel, compiled for AVX2 with 16-wide blocks, ignores
    whatever the padded input channels hold and writes zeros to the padded outputs."""
    from tvm import te

    from onnxpress.backends.tvm.blocked_kernels import ConvGeometry
    from onnxpress.backends.tvm.grouped_kernels import group_conv2d_nchwc, grouped_kernel

    rng = np.random.default_rng(14)
    w = rng.standard_normal((24, 8, 3, 3)).astype(np.float32)
    geometry = ConvGeometry((1, 1), (0, 0, 0, 0), (1, 1))
    found = grouped_kernel(w, 3, 24, 16, geometry)
    assert found is not None and found[2] == "group_conv2d_nchwc"
    packed = found[0]
    assert packed.shape == (2, 16, 3, 3, 16) and not packed[1, :, :, :, 8:].any()
    assert grouped_kernel(w[:18], 3, 24, 16, geometry) is None  # 8 inputs -> 6 outputs a group
    x = rng.standard_normal((1, 2, 6, 6, 16)).astype(np.float32)  # channels 24-31: noise
    data = te.placeholder(x.shape, name="x")
    weight = te.placeholder(packed.shape, name="w")
    out = group_conv2d_nchwc(data, weight, geometry, 8)
    func = te.create_prim_func([data, weight, out])
    lib = tvm.compile(func, target=tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    got = tvm.runtime.tensor(np.zeros((1, 2, 4, 4, 16), np.float32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), got)
    nchw = x.transpose(0, 1, 4, 2, 3).reshape(32, 6, 6)[:24]
    result = got.numpy()[0].transpose(0, 3, 1, 2).reshape(32, 4, 4)
    np.testing.assert_allclose(result[:24], _grouped_conv(nchw, w, 3), rtol=1e-4, atol=1e-4)
    assert not result[24:].any()
