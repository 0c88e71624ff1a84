"""The FastMath pass: float32 exp / tanh / erf / sigmoid / softmax become TOPI's polynomial
forms (vectorizable), other dtypes are left alone, and compiled models that use them still
match onnxruntime within the compile-time limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.fast_math import fast_math_pass  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.core.verify import Runner  # noqa: E402


def _relax_module(dtype: str) -> object:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), dtype))
    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(relax.op.sigmoid(x))
            y = builder.emit(relax.op.tanh(builder.emit(relax.op.exp(y))))
            y = builder.emit(relax.op.nn.softmax(builder.emit(relax.op.erf(y)), axis=-1))
            out = builder.emit_output(y)
        builder.emit_func_output(out)
    return builder.get()


def test_float32_transcendentals_become_fast_forms_and_float16_stays() -> None:
    text = fast_math_pass()(_relax_module("float32"))["main"].script()
    for op in ("R.sigmoid", "R.exp", "R.tanh", "R.erf", "R.nn.softmax"):
        assert op not in text
    for kernel in ("fast_sigmoid", "fast_exp", "fast_tanh", "fast_erf", "softmax_rows"):
        assert f"R.call_tir({kernel}" in text
    half = fast_math_pass()(_relax_module("float16"))["main"].script()
    assert "R.sigmoid" in half and "call_tir" not in half


def _activations_model() -> onnx.ModelProto:
    """y = Softmax(Erf(Tanh(x)) + Sigmoid(x) * x) and z = Exp(x / 4), x [2, 64]."""
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Mul", ["s", "x"], ["silu"]),
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Erf", ["t"], ["e"]),
        helper.make_node("Add", ["e", "silu"], ["a"]),
        helper.make_node("Softmax", ["a"], ["y"], axis=-1),
        helper.make_node("Div", ["x", "four"], ["q"]),
        helper.make_node("Exp", ["q"], ["z"]),
    ]
    four = helper.make_tensor("four", TensorProto.FLOAT, [], [4.0])
    graph = helper.make_graph(
        nodes,
        "activations",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 64]),
        ],
        [four],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", ["x86", "avx2"])  # this CPU, and AVX2 code without AVX-512
def test_compiled_fast_math_matches_onnxruntime(target: str, tmp_path: Path) -> None:
    model = _activations_model()
    result = compile_model(model, target, tmp_path / "out")
    assert max(result.manifest["verification"]["errors"].values()) <= 1e-4
    x = np.linspace(-30, 30, 128, dtype=np.float32).reshape(2, 64)  # saturating ends too
    got = CompiledModel(result.library)(x)
    for ref, new in zip(Runner(model)({"x": x}), got, strict=True):
        np.testing.assert_allclose(new, ref, rtol=2e-6, atol=1e-7 * float(np.abs(ref).max()))


@pytest.mark.parametrize(
    ("divisor", "multiplied"),
    [
        (np.float32(np.sqrt(2.0)), True),  # GELU's x / sqrt(2)
        (np.array([2.0, -4.0, 0.5, 3.0], np.float32), True),
        (np.array([2.0, 0.0, 1.0, 1.0], np.float32), False),  # a zero: x / 0 stays
        (np.float32(1e37), True),  # its reciprocal is still normal
        (np.float32(3e38), False),  # its reciprocal would be subnormal
    ],
)
def test_division_by_a_constant_becomes_a_multiply(divisor: np.ndarray, multiplied: bool) -> None:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 4), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(builder.emit(relax.op.divide(x, relax.const(divisor))))
        builder.emit_func_output(out)
    mod = fast_math_pass()(builder.get())
    text = mod["main"].script()
    assert ("R.multiply" in text) == multiplied and ("R.divide" in text) != multiplied
    executable = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    data = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(data)).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = data / divisor
    np.testing.assert_allclose(got, expected, rtol=3e-7)  # within two roundings


def _pow_model(exponent: float) -> onnx.ModelProto:
    """y = Pow(x, exponent) * 0.5 on [4, 64] (the scalar exponent a constant)."""
    graph = helper.make_graph(
        [
            helper.make_node("Pow", ["x", "e"], ["p"]),
            helper.make_node("Mul", ["p", "half"], ["y"]),
        ],
        "pow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [
            helper.make_tensor("e", TensorProto.FLOAT, [], [exponent]),
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("exponent", "products"), [(2.0, True), (3.0, True), (2.5, False)])
def test_small_integer_powers_become_products(exponent: float, products: bool) -> None:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 4), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            power = relax.op.power(x, relax.const(np.float32(exponent)))
            out = builder.emit_output(builder.emit(power))
        builder.emit_func_output(out)
    text = fast_math_pass()(builder.get())["main"].script()
    assert ("R.power" not in text) == products
    assert text.count("R.multiply") == (int(exponent) - 1 if products else 0)


@pytest.mark.parametrize("exponent", [2.0, 3.0])
def test_compiled_small_powers_equal_onnxruntime_bit_for_bit(
    exponent: float, tmp_path: Path
) -> None:
    """onnxruntime's CPU Pow computes x * x and x * x * x for these exponents: so does the
    library, to the bit (powf would differ in the last place for about a quarter of them)."""
    model = _pow_model(exponent)
    result = compile_model(model, "x86", tmp_path / "lib")
    x = (np.random.default_rng(0).standard_normal((4, 64)) * 7).astype(np.float32)
    expected = Runner(model)({"x": x})[0]
    np.testing.assert_array_equal(CompiledModel(result.library)(x)[0], expected)
    assert result.manifest["verification"]["errors"]["y"] == 0.0
