"""sibling_matmul.py: matmuls of one activation by constant matrices become one product
(with their biases when every one has one), sliced back; results match numpy and, through
compile_model, onnxruntime. Products of different inputs or depths stay apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.schedule import cpu_pipeline  # noqa: E402
from onnxpress.backends.tvm.sibling_matmul import sibling_matmul_pass  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402

RNG = np.random.default_rng(7)


def _weights(depth: int, *columns: int) -> list[np.ndarray]:
    return [RNG.normal(size=(depth, n)).astype(np.float32) for n in columns]


def _module(weights: list[np.ndarray], biases: list[np.ndarray | None], rows: int = 24) -> object:
    """outputs_i = x @ weights[i] (+ biases[i]) for one input x [1, rows, depth]."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, rows, weights[0].shape[0]), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            outs = []
            for w, b in zip(weights, biases, strict=True):
                y = builder.emit(relax.op.matmul(x, relax.const(w)))
                if b is not None:
                    y = builder.emit(relax.op.add(y, relax.const(b)))
                outs.append(y)
            out = builder.emit_output(relax.Tuple(outs))
        builder.emit_func_output(out)
    return builder.get()


def _ops(mod: object) -> list[str]:
    names: list[str] = []

    def visit(expr: object) -> None:
        if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
            names.append(expr.op.name)

    relax.analysis.post_order_visit(mod["main"].body, visit)  # type: ignore[index]
    return names


@pytest.mark.parametrize(
    ("columns", "biased", "matmuls", "adds"),
    [
        ((32, 32, 32), (True, True, True), 1, 1),  # attention projections: one biased product
        ((40, 16), (False, False), 1, 0),
        ((32, 24, 8), (True, False, True), 1, 2),  # a bias missing: the adds stay apart
    ],
)
def test_siblings_merge_and_match_numpy(
    columns: tuple[int, ...], biased: tuple[bool, ...], matmuls: int, adds: int
) -> None:
    weights = _weights(48, *columns)
    biases = [
        RNG.normal(size=n).astype(np.float32) if b else None
        for n, b in zip(columns, biased, strict=True)
    ]
    mod = _module(weights, biases)
    merged = sibling_matmul_pass()(mod)
    ops = _ops(merged)
    assert ops.count("relax.matmul") == matmuls
    assert ops.count("relax.add") == adds
    assert ops.count("relax.strided_slice") == len(columns)
    target = tvm_target(parse_target("avx2"))
    executable = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = RNG.normal(size=(1, 24, 48)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x))
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        expected = x.astype(np.float64) @ w + (0 if b is None else b)
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_products_of_other_inputs_stay_apart() -> None:
    """Two inputs with one matmul each, and one input used once: nothing to merge."""
    builder = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((1, 8, 16), "float32"))
    b = relax.Var("b", relax.TensorType((1, 8, 16), "float32"))
    w1, w2 = _weights(16, 8, 8)
    with builder.function("main", [a, b]):
        with builder.dataflow():
            y1 = builder.emit(relax.op.matmul(a, relax.const(w1)))
            y2 = builder.emit(relax.op.matmul(b, relax.const(w2)))
            out = builder.emit_output(relax.op.add(y1, y2))
        builder.emit_func_output(out)
    mod = builder.get()
    assert _ops(sibling_matmul_pass()(mod)).count("relax.matmul") == 2


def test_a_used_product_keeps_its_bias_apart() -> None:
    """A product read by its bias add and by something else: its add is not folded (the
    unbiased product is still needed), the matmuls still merge."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 16), "float32"))
    w1, w2 = _weights(16, 8, 8)
    b1, b2 = RNG.normal(size=(2, 8)).astype(np.float32)
    with builder.function("main", [x]):
        with builder.dataflow():
            y1 = builder.emit(relax.op.matmul(x, relax.const(w1)))
            y2 = builder.emit(relax.op.matmul(x, relax.const(w2)))
            z1 = builder.emit(relax.op.add(y1, relax.const(b1)))
            z2 = builder.emit(relax.op.add(y2, relax.const(b2)))
            out = builder.emit_output(relax.Tuple([z1, z2, relax.op.multiply(y1, y1)]))
        builder.emit_func_output(out)
    ops = _ops(sibling_matmul_pass()(builder.get()))
    assert ops.count("relax.matmul") == 1 and ops.count("relax.add") == 2


def test_attention_projections_match_onnxruntime(tmp_path: Path) -> None:
    """Query, key and value projections of one input, biased, then split into heads: the
    compiled library matches onnxruntime (checked at compile time and here)."""
    depth, heads, size = 64, 4, 16
    nodes, inits, outputs = [], [], []
    for name in ("q", "k", "v"):
        inits += [
            numpy_helper.from_array(_weights(depth, depth)[0], f"w{name}"),
            numpy_helper.from_array(RNG.normal(size=depth).astype(np.float32), f"b{name}"),
        ]
        nodes += [
            helper.make_node("MatMul", ["x", f"w{name}"], [f"m{name}"]),
            helper.make_node("Add", [f"m{name}", f"b{name}"], [f"a{name}"]),
            helper.make_node("Reshape", [f"a{name}", "heads"], [f"r{name}"]),
            helper.make_node("Transpose", [f"r{name}"], [name], perm=[0, 2, 1, 3]),
        ]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, heads, 20, size]))
    inits.append(numpy_helper.from_array(np.array([1, 20, heads, size], np.int64), "heads"))
    graph = helper.make_graph(
        nodes,
        "qkv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20, depth])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = compile_model(model, "x86", tmp_path / "out")
    x = RNG.normal(size=(1, 20, depth)).astype(np.float32)
    got = CompiledModel(result.library)(x)
    import onnxruntime as ort

    expected = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
