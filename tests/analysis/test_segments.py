"""``SegmentCapture``: wave after wave, tensors equal the whole model's, each wave runs only
the nodes after the previous one, the store keeps only border tensors, and models it cannot
cut (unnamed nodes) run from the inputs."""

from __future__ import annotations

import gc
from pathlib import Path

import helpers
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxpress.analysis.segments import SegmentCapture, WeightArrays

SIZE = 8


def residual_chain(blocks: int, named: bool = True) -> onnx.ModelProto:
    return helpers.residual_chain(blocks, SIZE, named=named)


def everything(model: onnx.ModelProto, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    names = [t for n in model.graph.node for t in n.output]
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in names)
    session = ort.InferenceSession(exposed.SerializeToString())
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, batch), strict=True))


def batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((4, SIZE)).astype(np.float32)} for _ in range(3)]


def test_waves_match_the_whole_model_and_run_only_what_is_new() -> None:
    model = residual_chain(4)
    capture = SegmentCapture(batches)
    full = [everything(model, b) | b for b in batches()]
    for wanted in (["r0"], ["m2", "r1"], ["x", "r3"]):
        got = list(capture.run(model, wanted))
        assert len(got) == 3
        for values, reference in zip(got, full, strict=True):
            for name in wanted:
                np.testing.assert_allclose(values[name], reference[name], rtol=1e-6)
    # after asking for r3 every node ran exactly once, in three segments
    assert capture.streaming
    assert capture.covered == {f"{op}{i}" for op in ("mm", "relu", "add") for i in range(4)}
    # the border after the last wave: r3 (the graph output) only
    assert set(capture.stored[0]) == {"r3"}


def test_a_store_over_the_spill_size_goes_to_disk_and_reads_back_the_same() -> None:
    """With room in memory for one batch's border, the other batches' borders are .npz files
    in a temporary folder; every wave still equals the whole model, replaced files are
    removed, and the folder goes with the capture."""
    model = residual_chain(4)
    capture = SegmentCapture(batches, spill_bytes=2 * 4 * SIZE * 4)  # two [4, 8] tensors
    full = [everything(model, b) | b for b in batches()]
    for wanted in (["r0"], ["m2", "r1"], ["x", "r3"]):
        for values, reference in zip(capture.run(model, wanted), full, strict=True):
            for name in wanted:
                np.testing.assert_allclose(values[name], reference[name], rtol=1e-6)
        assert isinstance(capture.stored[0], dict)  # the first batch stays in memory
        folder = capture._folder
        assert folder is not None
        files = sorted(p.name for p in Path(folder.name).iterdir())
        on_disk = [b for b in capture.stored if not isinstance(b, dict)]
        assert on_disk and len(files) == len(on_disk)  # replaced files are gone
        assert all(f.endswith(".npz") for f in files)
    assert capture.streaming and set(capture.stored[2]) == {"r3"}
    np.testing.assert_array_equal(capture.stored[2]["r3"], full[2]["r3"])
    path = Path(folder.name)
    del capture, folder
    gc.collect()
    assert not path.exists()


def test_unnamed_nodes_and_a_full_store_run_from_the_inputs() -> None:
    model = residual_chain(3, named=False)
    capture = SegmentCapture(batches)
    reference = [everything(model, b) for b in batches()]
    # unnamed nodes give empty node names: onnxruntime's outputs are still right
    for wanted in (["r0"], ["r2"]):
        for values, full in zip(capture.run(model, wanted), reference, strict=True):
            np.testing.assert_allclose(values[wanted[0]], full[wanted[0]], rtol=1e-6)
    assert not capture.streaming and capture.stored == []
    tiny = SegmentCapture(batches, limit_bytes=16)
    list(tiny.run(residual_chain(3), ["r0"]))
    assert not tiny.streaming and tiny.stored == []


def test_rest_runs_from_the_border_and_takes_replaced_weights() -> None:
    model = residual_chain(4)
    capture = SegmentCapture(batches)
    list(capture.run(model, ["r1"]))  # border after block 1
    run, fed = capture.rest(model, ["W3", "W0"])
    assert fed == {"W3"}  # W0 is behind the border: nothing after it reads it
    first = batches()[0]
    np.testing.assert_allclose(run({})[0], everything(model, first)["r3"], rtol=1e-6)
    altered = onnx.ModelProto()
    altered.CopyFrom(model)
    zero = np.zeros((SIZE, SIZE), np.float32)
    for index, tensor in enumerate(altered.graph.initializer):
        if tensor.name == "W3":
            altered.graph.initializer[index].CopyFrom(numpy_helper.from_array(zero, "W3"))
    np.testing.assert_allclose(run({"W3": zero})[0], everything(altered, first)["r3"], rtol=1e-6)


def test_large_weights_are_fed_and_a_store_over_the_limit_midway_keeps_values_right() -> None:
    rng = np.random.default_rng(2)
    wide = 300  # 300x300 float32: over FEED_BYTES, fed to the session as an input
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["a"], name="a"),
        helper.make_node("Relu", ["a"], ["b"], name="b"),
        helper.make_node("MatMul", ["b", "B"], ["y"], name="y"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((wide, wide)).astype(np.float32), n)
        for n in ("A", "B")
    ]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", wide])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", wide])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def data() -> list[dict[str, np.ndarray]]:
        return [{"x": np.full((2, wide), i + 1.0, np.float32)} for i in range(3)]

    # room for one batch's border ("a" and "b" are read later) but not for three
    capture = SegmentCapture(data, limit_bytes=2 * 2 * wide * 4 + 1)
    reference = [everything(model, b) for b in data()]
    first = list(capture.run(model, ["a"]))
    assert not capture.streaming  # the store went over the limit at the second batch
    second = list(capture.run(model, ["y"]))
    for got_a, got_y, full in zip(first, second, reference, strict=True):
        for name, got in (("a", got_a["a"]), ("y", got_y["y"])):  # fed weights: other kernels
            scale = float(np.abs(full[name]).max())
            np.testing.assert_allclose(got, full[name], rtol=1e-5, atol=1e-5 * scale)


def test_captures_share_the_arrays_of_identical_weights_only() -> None:
    arrays = WeightArrays()
    model = residual_chain(1)
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.eye(SIZE, dtype=np.float32), "W0")
    )
    same = arrays.get(model.graph.initializer[0])
    assert (
        arrays.get(onnx.TensorProto.FromString(model.graph.initializer[0].SerializeToString()))
        is same
    )
    assert arrays.get(changed.graph.initializer[0]) is not same
    np.testing.assert_array_equal(arrays.get(changed.graph.initializer[0]), np.eye(SIZE))
