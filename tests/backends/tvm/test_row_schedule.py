"""row_schedule.py: the row-by-row softmax, log-softmax and layer norm over the last axis.
They match numpy for rows of any length (multiples of the lanes, a scalar tail, shorter
than a vector), run one parallel loop over rows with vector loops inside, and models with
them (and with a softmax over another axis, which keeps TOPI's kernel) match
onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.build import tir_pipeline  # noqa: E402
from onnxpress.backends.tvm.row_schedule import (  # noqa: E402
    layer_norm_rows,
    log_softmax_rows,
    softmax_rows,
    variance_rows,
)
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402
from onnxpress.core.verify import Runner  # noqa: E402

ROWS = [(96, 128), (24, 197), (5, 1001), (100, 9), (3, 5)]


def _run(func: object, *arrays: np.ndarray) -> np.ndarray:
    lib = tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),  # type: ignore[attr-defined]
        target=tvm_target(parse_target("avx2")),
        tir_pipeline=tir_pipeline(2),
    )
    got = tvm.runtime.tensor(np.zeros_like(arrays[0]))
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), got)
    return got.numpy()


def _rows(rows: int, length: int) -> np.ndarray:
    x = (np.random.default_rng(length).normal(size=(rows, length)) * 6).astype(np.float32)
    x[0, -1] = 40.0  # the row's maximum in the scalar tail
    return x


@pytest.mark.parametrize(("rows", "length"), ROWS)
def test_softmax_rows_match_numpy(rows: int, length: int) -> None:
    x = _rows(rows, length)
    wide = x.astype(np.float64)
    expected = np.exp(wide - wide.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(_run(softmax_rows(rows, length), x), expected, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize(("rows", "length"), ROWS)
def test_log_softmax_rows_match_numpy(rows: int, length: int) -> None:
    x = _rows(rows, length)
    wide = x.astype(np.float64)
    shifted = wide - wide.max(-1, keepdims=True)
    expected = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    got = _run(log_softmax_rows(rows, length), x)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)
    assert log_softmax_rows(rows, length).script().count("T.log(") == 1  # once per row


@pytest.mark.parametrize(("rows", "length"), ROWS)
def test_layer_norm_rows_match_numpy(rows: int, length: int) -> None:
    x = _rows(rows, length) + np.float32(3.0)  # an offset the mean removes
    rng = np.random.default_rng(rows)
    gamma, beta = (rng.normal(size=length).astype(np.float32) for _ in range(2))
    wide = x.astype(np.float64)
    centered = wide - wide.mean(-1, keepdims=True)
    normed = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-5)
    expected = normed * gamma + beta
    got = _run(layer_norm_rows(rows, length, 1e-5), x, gamma, beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rows", "length"), ROWS)
def test_variance_rows_match_numpy(rows: int, length: int) -> None:
    x = _rows(rows, length) + np.float32(3.0)
    lib = tvm.compile(
        tvm.IRModule({"main": variance_rows(rows, length).with_attr("global_symbol", "main")}),
        target=tvm_target(parse_target("avx2")),
        tir_pipeline=tir_pipeline(2),
    )
    got = tvm.runtime.tensor(np.full((rows, 1), 7.0, np.float32))
    lib["main"](tvm.runtime.tensor(x), got)
    expected = x.astype(np.float64).var(-1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_compiled_instance_norm_matches_onnxruntime(tmp_path: Path) -> None:
    """InstanceNormalization over [N, C, L] (wav2vec2's GroupNorm of one channel a group):
    its variance through variance_rows."""
    rng = np.random.default_rng(4)
    scale, bias = (
        helper.make_tensor(n, TensorProto.FLOAT, [12], rng.normal(size=12).tolist())
        for n in ("g", "b")
    )
    graph = helper.make_graph(
        [helper.make_node("InstanceNormalization", ["x", "g", "b"], ["y"], epsilon=1e-5)],
        "instance_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 12, 523])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12, 523])],
        [scale, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = compile_model(model, "x86", tmp_path / "out")
    assert max(result.manifest["verification"]["errors"].values()) <= 1e-4
    x = (rng.normal(size=(2, 12, 523)) * 3 + 1).astype(np.float32)
    (got,) = CompiledModel(result.library)(x)
    (ref,) = Runner(model)({"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_one_parallel_loop_over_rows_with_vector_loops_inside() -> None:
    text = softmax_rows(1536, 197).script()
    assert text.count("T.parallel(") == 1
    assert text.count("T.vectorized(8)") == 4  # the two reductions, exp and the division
    assert "range(192, 197)" in text  # the tail after the vector part
    small = softmax_rows(2, 16).script()
    assert "T.parallel(" not in small  # below the threshold one thread does it
    norm = layer_norm_rows(128, 384, 1e-5).script()
    assert norm.count("T.parallel(") == 1
    assert norm.count("T.vectorized(8)") == 3  # the two partial sums and the output


def _model(axis: int) -> object:
    """Softmax(x, axis), LayerNormalization(x) over the last axis (the second kept in
    TOPI's form where it normalizes two axes) and LogSoftmax(x, axis), x [2, 12, 13, 40]."""
    rng = np.random.default_rng(2)
    scale, bias = (
        helper.make_tensor(n, TensorProto.FLOAT, [40], rng.normal(size=40).tolist())
        for n in ("g", "b")
    )
    graph = helper.make_graph(
        [
            helper.make_node("Softmax", ["x"], ["y"], axis=axis),
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["z"], axis=-1),
            helper.make_node("LogSoftmax", ["x"], ["w"], axis=axis),
        ],
        "rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 12, 13, 40])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12, 13, 40]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 12, 13, 40]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 12, 13, 40]),
        ],
        [scale, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("axis", [-1, 1])
def test_compiled_rows_match_onnxruntime(axis: int, tmp_path: Path) -> None:
    model = _model(axis)
    result = compile_model(model, "x86", tmp_path / "out")
    assert max(result.manifest["verification"]["errors"].values()) <= 1e-4
    x = (np.random.default_rng(1).normal(size=(2, 12, 13, 40)) * 5).astype(np.float32)
    refs = Runner(model)({"x": x})
    for ref, got in zip(refs, CompiledModel(result.library)(x), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_fast_math_emits_the_row_kernels_for_last_axis_ops_only() -> None:
    from tvm import relax

    from onnxpress.backends.tvm.fast_math import fast_math_pass

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 6, 40), "float32"))
    gamma = relax.const(np.ones(40, np.float32))
    both = relax.const(np.ones((6, 40), np.float32))
    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(relax.op.nn.layer_norm(x, gamma, gamma, axes=[-1]))
            z = builder.emit(relax.op.nn.layer_norm(y, both, both, axes=[1, 2]))
            s = builder.emit(relax.op.nn.softmax(z, axis=-1))
            t = builder.emit(relax.op.nn.log_softmax(s, axis=-1))
            u = builder.emit(relax.op.nn.log_softmax(t, axis=1))
            v = builder.emit(relax.op.variance(u, [2], keepdims=True))
            w = builder.emit(relax.op.variance(u, [-1]))
            out = builder.emit_output(builder.emit(relax.op.variance(u, [1, 2])))
        builder.emit_func_output((v, w, out))
    text = fast_math_pass()(builder.get())["main"].script()
    assert text.count("R.call_tir(layer_norm_rows") == 1
    assert text.count("R.nn.layer_norm") == 1  # over two axes: Relax's own
    assert text.count("R.call_tir(softmax_rows") == 1
    assert text.count("R.call_tir(log_softmax_rows") == 1
    assert text.count("R.nn.log_softmax") == 1  # over another axis: Relax's own
    assert text.count("R.call_tir(variance_rows") == 2  # keepdims or not
    assert text.count("R.variance") == 1  # over two axes: Relax's own
