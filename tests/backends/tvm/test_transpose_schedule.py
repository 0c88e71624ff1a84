"""TiledTranspose (transpose_schedule.py): elementwise kernels that read a tensor transposed
are tiled so a tile's reads are reused from cache; others are left to LoopParallel. The
schedule keeps results bit-identical to onnxruntime."""

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
