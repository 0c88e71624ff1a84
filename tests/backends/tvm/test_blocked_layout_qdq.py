"""The blocked layout through float fake-quant: a QDQ model whose activations no integer
kernel takes (16-bit, as onnxruntime's quantizer writes A16W8 models for NPUs) keeps its
convolutions and the quantize / dequantize pairs between them in NCHWc. Before, each pair
sent the tensor back to NCHW and the next conv read it strided: resnet18 A16W8 ran at 1.6x
its float time (docs/BENCHMARKS.md, run 28)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvm_kernels import relax_calls

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.build import import_relax  # noqa: E402
from onnxpress.backends.tvm.int8 import lower_qdq_to_integer  # noqa: E402
from onnxpress.backends.tvm.prepare import prepare  # noqa: E402
from onnxpress.backends.tvm.schedule import layout_passes  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402

SHAPE = (1, 8, 16, 16)


def a16w8_net() -> onnx.ModelProto:
    """x -> Q/DQ (uint16) -> Conv 8->32 -> Relu -> Q/DQ -> MaxPool 3x3/2 -> Q/DQ -> Conv
    32->32 -> Q/DQ -> y; int8 per-channel weights, opset 21."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def qdq(x: str, scale: float, name: str) -> str:
        inits.extend(
            [
                numpy_helper.from_array(np.float32(scale), f"{name}_s"),
                numpy_helper.from_array(np.uint16(32768), f"{name}_z"),
            ]
        )
        nodes.append(
            helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_z"], [f"{name}_q"])
        )
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_f"]))  # fmt: skip
        return f"{name}_f"

    def conv(x: str, cin: int, cout: int, name: str) -> str:
        w = rng.integers(-127, 128, (cout, cin, 3, 3)).astype(np.int8)
        inits.extend(
            [
                numpy_helper.from_array(w, f"{name}_w"),
                numpy_helper.from_array(np.full(cout, 0.01 / cin, np.float32), f"{name}_ws"),
                numpy_helper.from_array(np.zeros(cout, np.int8), f"{name}_wz"),
            ]
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{name}_w", f"{name}_ws", f"{name}_wz"],
                [f"{name}_wf"],
                axis=0,
            )
        )
        nodes.append(helper.make_node("Conv", [x, f"{name}_wf"], [name], pads=[1] * 4))
        return name

    h = qdq("x", 1e-4, "in")
    h = conv(h, 8, 32, "c1")
    nodes.append(helper.make_node("Relu", [h], ["r1"]))
    h = qdq("r1", 2e-4, "a1")
    nodes.append(helper.make_node("MaxPool", [h], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))  # fmt: skip
    h = qdq("p", 2e-4, "a2")
    h = conv(h, 32, 32, "c2")
    h = qdq(h, 4e-4, "out")
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(
        nodes,
        "a16w8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_sixteen_bit_fake_quant_runs_blocked() -> None:
    target = tvm_target(parse_target("x86"))
    mod, lowering = lower_qdq_to_integer(import_relax(prepare(a16w8_net())), target)
    assert sum(lowering.lowered.values()) == 0  # no integer kernel for 16-bit: the pool too
    with target:
        calls = relax_calls(tvm.transform.Sequential(layout_passes(target))(mod))
    # the first conv direct, the second (32 channels, blocked input) as Winograd
    assert calls.count("conv2d_nchwc") == 1 and "winograd_gemm" in calls
    assert "max_pool_nchwc" in calls
    # the one conversion back to NCHW is the output's, between its last pair
    assert calls.count("from_blocked") == 1
    assert calls[-3:] == ["relax.quantize", "from_blocked", "relax.dequantize"]
    assert calls.count("relax.quantize") == calls.count("relax.dequantize") == 4


def test_compiled_sixteen_bit_model_matches_onnxruntime(tmp_path: Path) -> None:
    result = compile_model(a16w8_net(), "x86", tmp_path / "lib")
    check = result.manifest["verification"]
    assert check["metric"] == "max-abs/step"
    assert check["errors"]["y"] <= check["limits"]["y"]
