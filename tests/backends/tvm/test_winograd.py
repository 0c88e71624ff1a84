"""Winograd convolution of the blocked layout (onnxpress.backends.tvm.winograd and
winograd_schedule): the transforms against a direct convolution in numpy, which
convolutions take it, and compiled models (whole and ragged tiles, asymmetric and no
padding, batch 2) against onnxruntime on this CPU and in AVX2 code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.backends.tvm.blocked_kernels import ConvGeometry
from onnxpress.backends.tvm.winograd import TRANSFORMS, pack_winograd_weight, winograd_tile


def _direct(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Valid 3x3 correlation of x [C, H, W] with w [O, C, 3, 3] in float64."""
    _, height, width = x.shape
    out = np.zeros((w.shape[0], height - 2, width - 2))
    for ky in range(3):
        for kx in range(3):
            out += np.einsum(
                "oc,chw->ohw", w[:, :, ky, kx], x[:, ky : ky + height - 2, kx : kx + width - 2]
            )
    return out


@pytest.mark.parametrize("m", [2, 4])
def test_packed_transforms_reproduce_a_direct_convolution(m: int) -> None:
    rng = np.random.default_rng(m)
    w = rng.standard_normal((20, 5, 3, 3)).astype(np.float32)
    x = rng.standard_normal((5, m + 2, m + 2))
    packed = pack_winograd_weight(w, m, 8, 16)  # 5 input channels in a padded block of 8
    alpha = m + 2
    assert packed.shape == (alpha, alpha, 2, 8, 16) and packed.dtype == np.float32
    assert not packed[:, :, :, 5:].any() and not packed[:, :, 1, :, 4:].any()
    bt, _, at = TRANSFORMS[m]
    v = np.einsum("ei,cij,uj->euc", bt, x, bt)  # input transform of one tile
    u = packed.transpose(0, 1, 2, 4, 3).reshape(alpha, alpha, 32, 8)[:, :, :20, :5]
    product = np.einsum("euc,euoc->euo", v, u.astype(np.float64))
    y = np.einsum("re,euo,su->ors", at, product, at)
    np.testing.assert_allclose(y, _direct(x, w.astype(np.float64)), rtol=1e-5, atol=1e-5)


def test_only_3x3_stride_1_convolutions_of_enough_channels_take_winograd() -> None:
    same = ConvGeometry((1, 1), (1, 1, 1, 1), (1, 1))
    assert winograd_tile(same, (3, 3), (64, 64), (56, 56)) == 4
    assert winograd_tile(same, (3, 3), (512, 512), (7, 7)) == 2  # few tiles: smaller weights
    assert winograd_tile(same, (3, 3), (8, 64), (56, 56)) == 0  # too few input channels
    assert winograd_tile(same, (1, 1), (64, 64), (56, 56)) == 0
    strided = ConvGeometry((2, 2), (1, 1, 1, 1), (1, 1))
    assert winograd_tile(strided, (3, 3), (64, 64), (28, 28)) == 0
    dilated = ConvGeometry((1, 1), (2, 2, 2, 2), (2, 2))
    assert winograd_tile(dilated, (3, 3), (64, 64), (56, 56)) == 0


tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.core.verify import Runner  # noqa: E402

SIZE = 13  # m = 4 with a ragged last tile; the 11 x 11 valid conv and 7 x 7 stage: m = 2


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def winograd_net() -> onnx.ModelProto:
    """A stem to a blocked tensor, then 3x3 stride-1 convs: 'same' padding with a residual
    Add (ragged m = 4 tiles), asymmetric padding, no padding (11 x 11, m = 2), 40 -> 24
    channels (padded blocks in AVX2 code), and a 7 x 7 stage after a stride-2 conv."""
    rng = np.random.default_rng(3)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(
        name: str, x: str, cin: int, cout: int, k: int, pads: list[int], stride: int = 1
    ) -> str:
        inits.append(
            _const(f"{name}_w", rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k))
        )
        inits.append(_const(f"{name}_b", rng.standard_normal(cout)))
        nodes.append(
            helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name], kernel_shape=[k, k],
                             pads=pads, strides=[stride, stride])
        )  # fmt: skip
        nodes.append(helper.make_node("Relu", [name], [f"{name}_r"]))
        return f"{name}_r"

    stem = conv("stem", "x", 3, 32, 3, [1, 1, 1, 1])
    a = conv("a", stem, 32, 32, 3, [1, 1, 1, 1])
    nodes.append(helper.make_node("Add", [a, stem], ["res"]))
    b = conv("b", "res", 32, 40, 3, [2, 2, 0, 0])  # top/left only: output stays 13 x 13
    c = conv("c", b, 40, 24, 3, [0, 0, 0, 0])  # 11 x 11
    d = conv("d", c, 24, 48, 3, [1, 1, 1, 1], stride=2)  # 6 x 6, direct
    e = conv("e", d, 48, 48, 3, [1, 1, 1, 1])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, SIZE, SIZE])
    y = helper.make_tensor_value_info(e, TensorProto.FLOAT, [2, 48, 6, 6])
    graph = helper.make_graph(nodes, "winograd", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _kernels(mod: Any) -> list[str]:
    from tvm import relax

    names = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.name == "relax.call_tir":
                names.append(value.args[0].name_hint.rstrip("0123456789"))
    return names


def test_every_qualifying_convolution_runs_as_three_winograd_kernels() -> None:
    from onnxpress.backends.tvm.build import import_relax
    from onnxpress.backends.tvm.prepare import prepare
    from onnxpress.backends.tvm.schedule import layout_passes

    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    mod = import_relax(prepare(winograd_net()))
    with target:
        kernels = _kernels(tvm.transform.Sequential(layout_passes(target))(mod))
    assert kernels.count("winograd_gemm") == 4  # a, b, c, e
    assert kernels.count("winograd_input") == kernels.count("winograd_output") == 4
    assert kernels.count("conv2d_nchwc") == 2  # the 3-channel stem, the stride-2 conv


def test_the_schedule_rule_claims_every_transform_kernel() -> None:
    from onnxpress.backends.tvm.build import import_relax
    from onnxpress.backends.tvm.prepare import prepare
    from onnxpress.backends.tvm.schedule import cpu_lowering_passes
    from onnxpress.backends.tvm.winograd_schedule import has_transform, winograd_rule

    target = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2", "num-cores": 2})
    mod = import_relax(prepare(winograd_net()))
    with target:
        lowered = tvm.transform.Sequential(cpu_lowering_passes(target))(mod)
    rule = winograd_rule(8)
    claimed = 0
    for gvar, func in lowered.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        # the kernels tuning leaves to the rule: the transforms, not the GEMMs
        transform = "winograd" in gvar.name_hint and "gemm" not in gvar.name_hint
        assert has_transform(func) == transform, gvar.name_hint
        if not transform:
            continue
        scheduled = rule.apply(func, target, False)
        assert scheduled is not None, gvar.name_hint
        text = scheduled.mod.script()
        assert "T.parallel" in text and "T.vectorized" in text and "T.unroll" in text
        claimed += 1
    assert claimed >= 4


@pytest.mark.parametrize("target", ["x86", "avx2"])  # this CPU (16 lanes), AVX2 code (8)
def test_compiled_winograd_model_matches_onnxruntime(target: str, tmp_path: Path) -> None:
    model = winograd_net()
    result = compile_model(model, target, tmp_path / "out")
    assert max(result.manifest["verification"]["errors"].values()) <= 1e-4
    x = np.random.default_rng(4).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    (got,) = CompiledModel(result.library)(x)
    (expected,) = Runner(model)({"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
