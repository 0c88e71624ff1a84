"""attention_schedule.py: the fused attention kernel matches numpy (with and without a
broadcast mask), the FusedAttention pass rewrites matmul -> scale -> mask -> softmax ->
matmul into one kernel call and leaves other shapes alone, and a compiled ONNX attention
block matches onnxruntime."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.attention_schedule import (  # noqa: E402
    Attention,
    attention_kernel,
    fused_attention_pass,
)
from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.build import tir_pipeline  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402
from onnxpress.core.verify import Runner  # noqa: E402


def _reference(q: np.ndarray, kt: np.ndarray, v: np.ndarray, scale: float, mask: object) -> object:
    scores = (q.astype(np.float64) @ kt) * scale + (0.0 if mask is None else mask)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize(
    ("rows", "keys", "mask_shape", "lanes"),
    [
        (8, 32, None, 8),
        (8, 32, (2, 1, 1, 32), 8),
        (8, 32, (8, 32), 8),
        (7, 13, (2, 1, 7, 13), 8),  # rows and keys padded to the tiles
        (1, 5, (1, 5), 8),
        (8, 32, (2, 1, 1, 32), 16),  # AVX-512's width (two AVX2 registers here)
        (7, 13, (2, 1, 7, 13), 16),
    ],
)
def test_kernel_matches_numpy(
    rows: int, keys: int, mask_shape: tuple[int, ...] | None, lanes: int
) -> None:
    sizes = Attention(2, 3, rows, keys, 16, 16, 0.25, mask_shape)
    kernel = attention_kernel(sizes, lanes=lanes)
    assert _vector_widths(kernel.script()) == ({8: 2, 16: 8} if lanes == 16 else {8: 10})
    lib = tvm.compile(
        tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
        target=tvm_target(parse_target("avx2")),
        tir_pipeline=tir_pipeline(2),
    )
    rng = np.random.default_rng(3)
    q, v = (rng.normal(size=(2, 3, n, 16)).astype(np.float32) * 2 for n in (rows, keys))
    kt = rng.normal(size=(2, 3, 16, keys)).astype(np.float32) * 2
    mask = None
    if mask_shape is not None:
        mask = np.where(rng.random(mask_shape) < 0.2, -1e4, 0.0).astype(np.float32)
    extra = sizes.padded_keys - keys  # pad_operands' zeros on the keys axes

    def padded(x: np.ndarray, axis: int) -> np.ndarray:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra if x.shape[axis] == keys else 0)
        return np.pad(x, widths)

    arrays = [q, padded(kt, 3), padded(v, 2), *([padded(mask, -1)] if mask is not None else [])]
    got = tvm.runtime.tensor(np.full((2, 3, rows, 16), 7.0, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), got)
    np.testing.assert_allclose(got.numpy(), _reference(q, kt, v, 0.25, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rows", "keys"), [(8, 32), (7, 13)])
def test_token_major_kernel_matches_numpy(rows: int, keys: int) -> None:
    """q and v read from [batch, tokens, columns] tensors at a column offset (the merged
    projections), the output written as [batch, rows, heads, depth]."""
    heads, depth = 3, 16
    sizes = Attention(2, heads, rows, keys, depth, depth, 0.25, None, (112, 8), (96, 48))
    assert sizes.token_major and sizes.out_shape == (2, rows, heads, depth)
    lib = tvm.compile(
        tvm.IRModule({"main": attention_kernel(sizes).with_attr("global_symbol", "main")}),
        target=tvm_target(parse_target("avx2")),
        tir_pipeline=tir_pipeline(2),
    )
    rng = np.random.default_rng(4)
    wide_q = rng.normal(size=(2, rows, 112)).astype(np.float32)
    wide_v = rng.normal(size=(2, sizes.padded_keys, 96)).astype(np.float32)
    wide_v[:, keys:] = 0.0  # pad_operands' zero rows
    kt = rng.normal(size=(2, heads, depth, sizes.padded_keys)).astype(np.float32)
    kt[..., keys:] = 0.0
    q = wide_q[:, :, 8 : 8 + heads * depth].reshape(2, rows, heads, depth).transpose(0, 2, 1, 3)
    v = wide_v[:, :keys, 48:].reshape(2, keys, heads, depth).transpose(0, 2, 1, 3)
    got = tvm.runtime.tensor(np.zeros(sizes.out_shape, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (wide_q, kt, wide_v)), got)
    expected = _reference(q, kt[..., :keys], v, 0.25, None).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def _module(queries: int, axis: int, value_depth: int = 16, cast: str | None = None) -> object:
    """The attention pattern; ``cast``: the probabilities cast to that dtype (and back to
    float32 if it is another) before the last matmul."""
    builder = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((1, 2, queries, 16), "float32"))
    kt = relax.Var("kt", relax.TensorType((1, 2, 16, 32), "float32"))
    v = relax.Var("v", relax.TensorType((1, 2, 32, value_depth), "float32"))
    mask = relax.Var("mask", relax.TensorType((1, 1, 1, 32), "float32"))
    with builder.function("main", [q, kt, v, mask]):
        with builder.dataflow():
            s = builder.emit(relax.op.matmul(q, kt))
            s = builder.emit(relax.op.divide(s, relax.const(4.0, "float32")))
            s = builder.emit(relax.op.add(mask, s))  # the mask first
            p = builder.emit(relax.op.nn.softmax(s, axis=axis))
            if cast is not None:
                p = builder.emit(relax.op.astype(p, cast))
                if cast != "float32":
                    p = builder.emit(relax.op.astype(p, "float32"))
            out = builder.emit_output(builder.emit(relax.op.matmul(p, v)))
        builder.emit_func_output(out)
    return builder.get()


def test_the_pass_fuses_the_pattern_and_leaves_others_alone() -> None:
    def rewritten(queries: int, axis: int, value_depth: int = 16, cast: str | None = None) -> str:
        mod = fused_attention_pass()(_module(queries, axis, value_depth, cast))
        return relax.transform.DeadCodeElimination()(mod)["main"].script()

    # GPT-2 casts the probabilities to the value dtype: float32 to float32 is no step; a
    # round trip through float16 rounds them, and stays
    assert "fused_attention" in rewritten(8, -1, cast="float32")
    assert "fused_attention" not in rewritten(8, -1, cast="float16")

    for queries in (8, 6):  # 6 rows: padded to the 4-row blocks
        fused = rewritten(queries, -1)
        assert "R.call_tir(fused_attention" in fused
        assert "softmax" not in fused and "R.matmul" not in fused
    for axis, depth in ((2, 16), (-1, 12)):  # another axis; values not whole 16-lane tiles
        other = rewritten(8, axis, depth)
        assert "fused_attention" not in other and "R.nn.softmax" in other


@pytest.mark.parametrize(("target_lanes", "width"), [(4, 8), (8, 8), (16, 16)])
def test_the_kernel_takes_the_target_s_vector_width(target_lanes: int, width: int) -> None:
    """16 lanes where the target has AVX-512, else 8 (AVX2; two NEON registers)."""
    mod = fused_attention_pass(target_lanes)(_module(8, -1))
    kernels = [f for gv, f in mod.functions.items() if gv.name_hint == "fused_attention"]
    assert len(kernels) == 1
    # both register tiles, their initial values and write-backs, the output and the exp at
    # the width; the softmax's partial max and sum at 8 lanes (row_schedule.py) always
    widths = _vector_widths(kernels[0].script())
    assert widths == ({8: 2, 16: 8} if width == 16 else {8: 10})


def _vector_widths(script: str) -> dict[int, int]:
    """How many vectorized loops of each extent a kernel's TVMScript has."""
    return dict(Counter(int(w) for w in re.findall(r"T\.vectorized\((\d+)\)", script)))


def _attention_model(fused_projection: bool = False, position_bias: bool = False) -> object:
    """x [1, 16, 32] -> Q, K, V projections -> 2 heads of 16 -> attention with a padding
    mask -> [1, 16, 32]: the layout BERT-style exports have; ``fused_projection``: one
    [32, 96] projection split in three (GPT-2's c_attn); ``position_bias``: a [1, 2, 16, 16]
    bias added to the scores before the mask (T5's)."""
    rng = np.random.default_rng(5)
    weights = {n: rng.normal(0, 0.3, (32, 32)).astype(np.float32) for n in ("wq", "wk", "wv")}
    inits = [numpy_helper.from_array(w, n) for n, w in weights.items()]
    if fused_projection:
        inits = [numpy_helper.from_array(np.concatenate(list(weights.values()), 1), "wqkv")]
    inits += [
        numpy_helper.from_array(np.array([1, 16, 2, 16], np.int64), "heads"),
        numpy_helper.from_array(np.array([1, 16, 32], np.int64), "merged"),
        numpy_helper.from_array(np.array(4.0, np.float32), "root"),
        numpy_helper.from_array(np.where(np.arange(16) < 13, 0, -1e4).astype(np.float32)
                                .reshape(1, 1, 1, 16), "mask"),
    ]  # fmt: skip
    if position_bias:
        bias = rng.normal(0, 2.0, (1, 2, 16, 16)).astype(np.float32)
        inits.append(numpy_helper.from_array(bias, "bias"))
    nodes = []
    if fused_projection:
        nodes += [
            helper.make_node("MatMul", ["x", "wqkv"], ["qkv"]),
            helper.make_node("Split", ["qkv"], ["q2", "k2", "v2"], axis=-1, num_outputs=3),
        ]
    for name in ("q", "k", "v"):
        if not fused_projection:
            nodes.append(helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}2"]))
        nodes.append(helper.make_node("Reshape", [f"{name}2", "heads"], [f"{name}3"]))
    nodes += [
        helper.make_node("Transpose", ["q3"], ["q4"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k3"], ["kt4"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v3"], ["v4"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q4", "kt4"], ["s"]),
        helper.make_node("Div", ["s", "root"], ["scaled"]),
        *([helper.make_node("Add", ["scaled", "bias"], ["biased"])] if position_bias else []),
        helper.make_node("Add", ["biased" if position_bias else "scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v4"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o3"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o3", "merged"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    ("fused_projection", "position_bias"), [(False, False), (True, False), (False, True)]
)
def test_compiled_attention_block_matches_onnxruntime(
    fused_projection: bool, position_bias: bool, tmp_path: Path
) -> None:
    from onnxpress.backends.tvm.build import import_relax
    from onnxpress.backends.tvm.prepare import prepare
    from onnxpress.backends.tvm.schedule import cpu_lowering_passes

    model = _attention_model(fused_projection, position_bias)
    target = tvm_target(parse_target("x86"))
    with target:
        lowered = tvm.transform.Sequential(cpu_lowering_passes(target))(
            import_relax(prepare(model, None))
        )
    names = [gv.name_hint for gv in lowered.functions]
    assert "fused_attention" in names and not any("softmax" in n for n in names)
    # one product for Q, K and V (sibling_matmul.py, or the model's own); the kernel reads
    # Q and V from it and writes token-major, so K's split into heads is the only copy left
    assert sum("matmul" in n for n in names) == 1, names
    assert sum("transpose" in n for n in names) == 1, names
    result = compile_model(model, "x86", tmp_path / "out")
    assert result.manifest["verification"]["errors"]["y"] <= 1e-4
    x = np.random.default_rng(6).normal(size=(1, 16, 32)).astype(np.float32)
    (ref,) = Runner(model)({"x": x})
    (got,) = CompiledModel(result.library)(x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
