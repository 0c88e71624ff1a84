"""Elementwise inlining keeps a value that is read twice as a block once inlining it would
blow up the expression (onnxpress.backends.tvm.inline)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from tvm import relax, s_tir  # noqa: E402
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic  # noqa: E402

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.inline import (  # noqa: E402
    INLINE_EXPR_LIMIT,
    expression_size,
    inline_elementwise,
)
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
SHAPE = (1, 8, 16, 16)


def _logistic_relax(steps: int) -> tvm.IRModule:
    """x <- r x (1 - x), ``steps`` times: every step reads x twice."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    one, rate = relax.const(np.float32(1.0)), relax.const(np.float32(0.5))
    with builder.function("main", [x]):
        with builder.dataflow():
            value: relax.Expr = x
            for _ in range(steps):
                rest = builder.emit(relax.op.subtract(one, value))
                value = builder.emit(relax.op.multiply(rate, relax.op.multiply(value, rest)))
            out = builder.emit_output(value)
        builder.emit_func_output(out)
    mod = builder.get()
    with AVX2:
        mod = relax.transform.FuseOps()(
            relax.transform.AnnotateTIROpPattern()(
                tvm.transform.Sequential(cpu_generic.legalize_passes(AVX2))(mod)
            )
        )
        return relax.transform.FuseTIR()(mod)


def _fused_kernel(steps: int) -> tvm.tirx.PrimFunc:
    mod = _logistic_relax(steps)
    (kernel,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return kernel


def test_expression_size_counts_nodes_and_loads() -> None:
    sch = s_tir.Schedule(_fused_kernel(1))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    first = sch.get(blocks[0])  # 1 - x
    second = sch.get(blocks[1])  # x * (1 - x)
    nodes, loads = expression_size(second.body, first.writes[0].source)
    assert loads == 1 and nodes > 4
    _, reads_of_x = expression_size(second.body, first.reads[0].source)
    assert reads_of_x == 1
    capped, _ = expression_size(second.body, limit=2)
    assert capped == 3  # stops one node past the limit


def test_a_short_chain_inlines_whole_and_a_long_one_stays_bounded() -> None:
    short = s_tir.Schedule(_fused_kernel(3))
    assert inline_elementwise(short)
    assert len(short.get_child_blocks(short.get_sblock("root"))) == 1  # one loop nest
    long = s_tir.Schedule(_fused_kernel(40))
    started = time.perf_counter()
    assert inline_elementwise(long)
    blocks = long.get_child_blocks(long.get_sblock("root"))
    assert 1 < len(blocks) < 3 * 40  # inlined where it stayed small, kept where it doubled
    for block in blocks:
        assert expression_size(long.get(block).body)[0] <= 2 * INLINE_EXPR_LIMIT
    assert time.perf_counter() - started < 60  # 2^40 nodes inlined whole would never end


def _logistic_onnx(steps: int) -> onnx.ModelProto:
    nodes, value = [], "x"
    for index in range(steps):
        nodes += [
            helper.make_node("Sub", ["one", value], [f"rest{index}"]),
            helper.make_node("Mul", [value, f"rest{index}"], [f"product{index}"]),
            helper.make_node("Mul", ["rate", f"product{index}"], [f"x{index}"]),
        ]
        value = f"x{index}"
    graph = helper.make_graph(
        nodes,
        "logistic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, SHAPE)],
        [
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(0.5, np.float32), "rate"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_60_step_chain_compiles_and_matches_onnxruntime(tmp_path: Path) -> None:
    """The compile check's random inputs below -1 run to -inf (matching infinities are no
    error); inputs in (0, 1) converge, and the library matches onnxruntime there."""
    model = _logistic_onnx(60)
    result = compile_model(model, "x86", tmp_path / "chain")
    assert result.manifest["verification"]["errors"]["x59"] <= 1e-4
    feed = np.random.default_rng(0).uniform(0.1, 0.9, SHAPE).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": feed})[0]
    (got,) = CompiledModel(result.library)(feed)
    assert np.isfinite(expected).all() and expected.max() > 1e-30
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-30)
