"""softmax_schedule.py: the row-by-row softmax over the last axis. It matches numpy for rows
of any length (multiples of the lanes, a scalar tail, shorter than a vector), runs one
parallel loop over rows with vector loops inside, and a model whose softmax is not over the
last axis keeps TOPI's kernel and still matches onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.build import tir_pipeline  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.softmax_schedule import softmax_rows  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402
from onnxpress.core.verify import Runner  # noqa: E402


@pytest.mark.parametrize(("rows", "length"), [(96, 128), (24, 197), (5, 1001), (100, 9), (3, 5)])
def test_rows_match_numpy(rows: int, length: int) -> None:
    func = softmax_rows(rows, length).with_attr("global_symbol", "main")
    lib = tvm.compile(
        tvm.IRModule({"main": func}),
        target=tvm_target(parse_target("avx2")),
        tir_pipeline=tir_pipeline(2),
    )
    rng = np.random.default_rng(length)
    x = (rng.normal(size=(rows, length)) * 6).astype(np.float32)
    x[0, -1] = 40.0  # the row's maximum in the scalar tail
    got = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), got)
    wide = x.astype(np.float64)
    expected = np.exp(wide - wide.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-6, atol=1e-9)


def test_one_parallel_loop_over_rows_with_vector_loops_inside() -> None:
    text = softmax_rows(1536, 197).script()
    assert text.count("T.parallel(") == 1
    assert text.count("T.vectorized(8)") == 4  # the two reductions, exp and the division
    assert "range(192, 197)" in text  # the tail after the vector part
    small = softmax_rows(2, 16).script()
    assert "T.parallel(" not in small  # below the threshold one thread does it


def _softmax_model(axis: int) -> object:
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=axis)],
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 12, 13, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12, 13, 40])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("axis", [-1, 1])
def test_compiled_softmax_matches_onnxruntime(axis: int, tmp_path: Path) -> None:
    model = _softmax_model(axis)
    result = compile_model(model, "x86", tmp_path / "out")
    assert max(result.manifest["verification"]["errors"].values()) <= 1e-4
    x = (np.random.default_rng(1).normal(size=(2, 12, 13, 40)) * 5).astype(np.float32)
    (ref,) = Runner(model)({"x": x})
    (got,) = CompiledModel(result.library)(x)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-9)
