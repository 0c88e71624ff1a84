"""int8_unary.py: quantize(f(dequantize(q))) as a 256-entry table (SiLU's sigmoid, tanh...),
its values against a direct computation, the rewrite in a compiled model, and the
library's output against onnxruntime; requantizations by the reciprocal scale."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_helpers import conv_model, quantize

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.build import import_relax  # noqa: E402
from onnxpress.backends.tvm.int8 import lower_qdq_to_integer  # noqa: E402
from onnxpress.backends.tvm.int8_patterns import Dequantized  # noqa: E402
from onnxpress.backends.tvm.int8_unary import FUNCTIONS, table  # noqa: E402
from onnxpress.backends.tvm.prepare import prepare  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402


def _source(dtype: str, scale: float, zero: int) -> Dequantized:
    return Dequantized(None, dtype, np.array(scale, np.float32), np.array(zero), 0, None)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_table_is_the_quantized_function_of_every_code(dtype: str) -> None:
    zero = 131 if dtype == "uint8" else -3
    values = table(FUNCTIONS["relax.tanh"], _source(dtype, 0.03, zero), 0.006, 128, "uint8")
    assert values.shape == (256,) and values.dtype == np.uint8
    codes = range(0, 256) if dtype == "uint8" else range(-128, 128)
    for position, code in enumerate(codes):
        x = float(np.float32(code - zero) * np.float32(0.03))
        want = min(max(round(float(np.float32(math.tanh(x))) / 0.006) + 128, 0), 255)
        assert abs(int(values[position]) - want) <= 1  # a float32 tie may round either way
    assert values[0] == 0 and values[-1] == 255  # saturates at both ends


def sigmoid_model() -> onnx.ModelProto:
    node = helper.make_node
    inits = {
        "s": np.array(0.05, np.float32),
        "z": np.array(120, np.uint8),
        "s2": np.array(1 / 255, np.float32),
        "z2": np.array(0, np.uint8),
    }
    graph = helper.make_graph(
        [
            node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            node("DequantizeLinear", ["q", "s", "z"], ["d"]),
            node("Sigmoid", ["d"], ["g"]),
            node("QuantizeLinear", ["g", "s2", "z2"], ["gq"]),
            node("DequantizeLinear", ["gq", "s2", "z2"], ["gd"]),
            node("Mul", ["d", "gd"], ["y"]),
        ],
        "silu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 16, 16])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_quantized_sigmoid_compiles_to_a_table_and_matches_onnxruntime(tmp_path: Path) -> None:
    model = sigmoid_model()
    result = compile_model(model, parse_target("x86"), tmp_path / "lib")
    assert result.manifest["int8"]["lowered"] == {"sigmoid (table)": 1}
    assert result.manifest["verification"]["errors"]["y"] <= 1.0
    x = np.random.default_rng(3).uniform(-6, 6, (2, 8, 16, 16)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = CompiledModel(result.library)(x)[0]
    step = 0.05 / 255  # one step of the sigmoid's quantization through the Mul by d <= 6
    assert np.abs(got - expected).max() <= 6 * step * 1.01
    off = compile_model(model, parse_target("x86"), tmp_path / "off", int8="off")
    assert off.manifest["int8"] is None


def test_requantizing_epilogues_multiply_by_the_reciprocal_scale(tmp_path: Path) -> None:
    """Every quantize left in the lowered model of a quantized conv chain scales by 1 after
    a product by 1 / s (no divide in the GEMMs' epilogues: reciprocal_scale), and the
    library stays within one step of onnxruntime."""
    qdq, _ = quantize(conv_model())
    spec = parse_target("x86")
    lowered, _ = lower_qdq_to_integer(import_relax(prepare(qdq, None)), tvm_target(spec))
    scales = re.findall(r"R\.quantize\(\w+, ([^,]+),", lowered.script())
    assert scales and set(scales) == {"R.const(1.0"}
    result = compile_model(qdq, spec, tmp_path / "lib")
    assert result.manifest["verification"]["errors"]["y"] <= 1.0
