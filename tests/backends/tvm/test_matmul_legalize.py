"""matmul_legalize.py, ragged products: a matmul whose output columns no vector width
divides (197) gets zero-padded columns, one with ragged rows (197) zero-padded rows; the product is sliced back and matches numpy (and onnxruntime, in the
compile-time check)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.schedule import cpu_lowering_passes, cpu_pipeline  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402


def _products(rows: int, depth: int, columns: int) -> object:
    """y = a @ b for two activations a [2, rows, depth], b [2, depth, columns]."""
    builder = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((2, rows, depth), "float32"))
    b = relax.Var("b", relax.TensorType((2, depth, columns), "float32"))
    with builder.function("main", [a, b]):
        with builder.dataflow():
            out = builder.emit_output(builder.emit(relax.op.matmul(a, b)))
        builder.emit_func_output(out)
    return builder.get()


@pytest.mark.parametrize(
    ("rows", "depth", "columns", "kernels"),
    [
        (197, 64, 197, {"pad_columns", "pad_rows", "slice_product"}),
        (197, 197, 64, {"pad_rows", "slice_product"}),
        (37, 16, 13, {"pad_columns", "pad_rows", "slice_product"}),
        (16, 8, 64, set()),  # nothing ragged: TVM's legalization
    ],
)
def test_ragged_products_are_padded_and_match_numpy(
    rows: int, depth: int, columns: int, kernels: set[str]
) -> None:
    target = tvm_target(parse_target("avx2"))
    mod = _products(rows, depth, columns)
    with target:
        lowered = tvm.transform.Sequential(cpu_lowering_passes(target))(mod)
    names = [gv.name_hint for gv in lowered.functions]  # the slice fuses with the matmul
    found = {k for k in ("pad_columns", "pad_rows", "slice_product") if any(k in n for n in names)}
    assert found == kernels
    executable = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    rng = np.random.default_rng(rows + columns)
    a = rng.normal(size=(2, rows, depth)).astype(np.float32)
    b = rng.normal(size=(2, depth, columns)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    expected = a.astype(np.float64) @ b
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize(("rows", "columns"), [(50, 197), (197, 64)])
def test_constant_weights_with_ragged_sizes_match_onnxruntime(
    rows: int, columns: int, tmp_path: Path
) -> None:
    """x [1, rows, 64] @ w [64, columns] (a constant): ragged columns padded (folded at
    compile time), ragged rows padded in front of the packed-panel kernel."""
    w = np.random.default_rng(2).normal(size=(64, columns)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "ragged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, columns])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = compile_model(model, "x86", tmp_path / "out")  # checked against onnxruntime
    x = np.random.default_rng(3).normal(size=(1, rows, 64)).astype(np.float32)
    expected = x.astype(np.float64) @ w
    np.testing.assert_allclose(CompiledModel(result.library)(x)[0], expected, atol=1e-4)
    assert result.manifest["verification"]["errors"]["y"] <= 1e-4
