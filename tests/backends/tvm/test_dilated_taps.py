"""dilated_taps.py: a dilated conv whose taps mostly read padding (DeepLab's ASPP on a small
map) becomes one 1x1 conv per tap over the output region that tap reaches; taps that
reach nothing are dropped (dilation past the map: only the centre is left), the tap sum
matches Relax's dilated conv, dense, strided, grouped and undilated convs are left alone,
and compiled models match onnxruntime on this CPU and in AVX2 code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tvm_kernels import compiled_xy, relax_calls, relu_chain, run_relax

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.build import import_relax  # noqa: E402
from onnxpress.backends.tvm.dilated_taps import (  # noqa: E402
    dilated_tap_regions_pass,
    tap_ranges,
)
from onnxpress.backends.tvm.prepare import prepare  # noqa: E402

# (out channels, kernel, attributes) on x [1, 8, 12, 12], stride 1, "same" padding
LAYERS = [
    (16, (3, 3), {"dilations": [8, 8], "pads": [8, 8, 8, 8]}),  # 31% useful: 9 regions
    (16, (3, 3), {"dilations": [12, 12], "pads": [12, 12, 12, 12]}),  # the centre only
    (16, (3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),  # 79% useful: left alone
    (8, (3, 3), {"dilations": [9, 1], "pads": [9, 1, 9, 1]}),  # 47%: rows and columns differ
]


def aspp_net() -> object:
    return relu_chain("Conv", LAYERS, [1, 8, 12, 12], [1, 8, 12, 12])


def test_tap_ranges_per_axis() -> None:
    assert tap_ranges(12, 12, 3, 8, 8) == [(8, 12), (0, 12), (0, 4)]
    assert tap_ranges(12, 12, 3, 12, 12) == [(0, 0), (0, 12), (0, 0)]
    assert tap_ranges(32, 32, 3, 24, 24) == [(24, 32), (0, 32), (0, 8)]


def test_sparse_dilated_convs_become_tap_regions() -> None:
    mod = import_relax(prepare(aspp_net()))
    assert relax_calls(mod).count("relax.nn.conv2d") == 4
    ops = relax_calls(dilated_tap_regions_pass()(mod))
    # 9 taps for the first, 1 for the second, the dense one, 3 x 3 for the last
    assert ops.count("relax.nn.conv2d") == 9 + 1 + 1 + 9
    assert ops.count("relax.add") == 8 + 8 + 4  # the taps' sums, then the four biases
    assert ops.count("relax.nn.pad") == 8 + 8  # every tap but a full centre is a region


def test_the_tap_sum_matches_relax_s_dilated_conv() -> None:
    mod = import_relax(prepare(aspp_net()))
    rewritten = dilated_tap_regions_pass()(mod)
    x = np.random.default_rng(7).standard_normal((1, 8, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(run_relax(rewritten, x), run_relax(mod, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("strides", "groups", "dilation"),
    [((2, 2), 1, 8), ((1, 1), 2, 8), ((1, 1), 1, 1), ((1, 1), 1, 3)],
    ids=["strided", "grouped", "undilated", "dense"],
)
def test_other_convs_are_left_alone(strides: tuple[int, int], groups: int, dilation: int) -> None:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 12, 12), "float32"))
    w = relax.const(np.ones((8, 8 // groups, 3, 3), np.float32))
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = relax.op.nn.conv2d(
                x, w, strides=strides, padding=dilation, dilation=dilation, groups=groups
            )
            out = builder.emit_output(conv)
        builder.emit_func_output(out)
    ops = relax_calls(dilated_tap_regions_pass()(builder.get()))
    assert ops == ["relax.nn.conv2d"]


@pytest.mark.parametrize("target", ["x86", "avx2"])
def test_compiled_aspp_like_model_matches_onnxruntime(target: str, tmp_path: Path) -> None:
    x = np.random.default_rng(6).standard_normal((1, 8, 12, 12)).astype(np.float32)
    got, expected = compiled_xy(aspp_net(), target, tmp_path / "out", x)
    assert got.shape == expected.shape == (1, 8, 12, 12)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
