"""TiledTranspose (transpose_schedule.py): elementwise kernels that read a tensor transposed
(also from a blocked NCHWc layout back to NCHW) are tiled so a tile's reads are reused from
cache; others are left to LoopParallel. The schedule keeps results bit-identical to
onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target  # noqa: E402
from onnxpress.backends.tvm.transpose_schedule import axis_strides, tile_transposed  # noqa: E402


def _schedule(compute: Any) -> tuple[Any, Any]:
    from tvm import s_tir, te

    source = te.placeholder((1, 64, 56, 56), "float32", name="x")
    out = compute(source)
    sch = s_tir.Schedule(te.create_prim_func([source, out]))
    return sch, sch.get_sblock(out.op.name)


def test_a_transposed_read_is_tiled_along_its_contiguous_axis() -> None:
    from tvm import te

    sch, block = _schedule(
        lambda x: te.compute((1, 56, 56, 64), lambda n, h, w, c: x[n, c, h, w] * 2.0, name="t")
    )
    assert axis_strides(sch, block) == [[200704, 56, 1, 3136]]  # lanes (c) 3136 floats apart
    assert tile_transposed(sch, block, lanes=16)
    loops = sch.get_loops(block)
    extents = [int(sch.get(loop).extent) for loop in loops]
    assert extents == [56 * 4 * 4, 14, 16]  # (n, h, w // 14, c // 16), w % 14, c % 16
    kinds = [int(sch.get(loop).kind) for loop in loops]
    assert kinds == [1, 0, 2]  # parallel tiles, serial rows of the tile, vector lanes


def test_reads_along_the_lanes_are_left_alone() -> None:
    from tvm import te

    sch, block = _schedule(
        lambda x: te.compute(x.shape, lambda n, c, h, w: x[n, c, h, w] + 1.0, name="plain")
    )
    assert axis_strides(sch, block) == [[200704, 3136, 56, 1]]
    assert not tile_transposed(sch, block, lanes=16)


def test_a_blocked_read_is_tiled_by_its_channel_block() -> None:
    """from_blocked: out[n, c, h, w] = x[n, c // 16, h, w, c % 16]. The channel step is 1
    inside a block of 16 and not constant across blocks; the tile is the block."""
    from tvm import s_tir, te

    source = te.placeholder((1, 6, 14, 20, 16), "float32", name="x")
    out = te.compute(
        (1, 96, 14, 20), lambda n, c, h, w: source[n, c // 16, h, w, c % 16], name="nchw"
    )
    sch = s_tir.Schedule(te.create_prim_func([source, out]))
    block = sch.get_sblock("nchw")
    assert axis_strides(sch, block) == [[26880, None, 320, 16]]
    assert axis_strides(sch, block, {1: 16}) == [[26880, 1, 320, 16]]
    assert tile_transposed(sch, block, lanes=16)
    loops = sch.get_loops(block)
    extents = [int(sch.get(loop).extent) for loop in loops]
    assert extents == [14 * 6 * 5, 16, 4]  # (n, h, c // 16, w // 4), c % 16, w % 4
    assert [int(sch.get(loop).kind) for loop in loops][1:] == [0, 2]  # rows, vector lanes


def test_a_misaligned_block_is_not_taken_for_a_tile() -> None:
    """A channel axis read from blocks of 12 has no aligned tile of 16, 8 or 4 inside them."""
    from tvm import s_tir, te

    source = te.placeholder((1, 4, 14, 20, 12), "float32", name="x")
    out = te.compute(
        (1, 48, 14, 20), lambda n, c, h, w: source[n, c // 12, h, w, c % 12], name="nchw"
    )
    sch = s_tir.Schedule(te.create_prim_func([source, out]))
    block = sch.get_sblock("nchw")
    assert axis_strides(sch, block, {1: 16})[0][1] is None
    assert axis_strides(sch, block, {1: 8})[0][1] is None
    assert not tile_transposed(sch, block, lanes=16)


def conv_output_model(activation: str) -> onnx.ModelProto:
    """A 1x1 conv whose NCHW output (with an activation) comes from the blocked layout."""
    rng = np.random.default_rng(1)
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [40, 8, 1, 1], rng.normal(size=320).astype(np.float32).tolist()
    )
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"])]
    if activation == "Silu":
        nodes += [
            helper.make_node("Sigmoid", ["c"], ["s"]),
            helper.make_node("Mul", ["c", "s"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node(activation, ["c"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 18, 22])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40, 18, 22])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", ["x86", "avx2"])
@pytest.mark.parametrize("activation", ["Relu", "Silu"])
def test_blocked_outputs_match_onnxruntime(tmp_path: Path, target: str, activation: str) -> None:
    """40 channels: blocks of 16 (8 on AVX2) with a padded last block."""
    model = conv_output_model(activation)
    x = np.random.default_rng(0).normal(size=(1, 8, 18, 22)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    result = compile_model(model, parse_target(target), tmp_path / "lib")
    assert "from_blocked" in (tmp_path / "lib" / "model.so").read_bytes().decode("latin-1")
    np.testing.assert_allclose(CompiledModel(result.library)(x)[0], expected, rtol=1e-5, atol=1e-5)


def transposing_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
            helper.make_node("Relu", ["t"], ["m"]),
            helper.make_node("Transpose", ["m"], ["back"], perm=[0, 3, 1, 2]),
            helper.make_node("Add", ["back", "x"], ["y"]),
        ],
        "transposes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 48, 14, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48, 14, 20])],
        [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tiled_kernels_match_onnxruntime(tmp_path: Path) -> None:
    model = transposing_model()
    x = np.random.default_rng(0).normal(size=(2, 48, 14, 20)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    result = compile_model(model, parse_target("x86"), tmp_path / "lib")
    np.testing.assert_array_equal(CompiledModel(result.library)(x)[0], expected)
