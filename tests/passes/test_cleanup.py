"""cleanup: equal constants merge into one (the Identity-shared weights of a torch export
that constant folding copies), a graph-output constant keeps its own, unequal constants of
one shape stay apart, and the result matches the original on onnxruntime."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from onnx import helper

import onnxpress

node = helper.make_node


def _shared_bias_model(kit: SimpleNamespace) -> object:
    # torch.onnx's dedupe: three Convs read one bias through Identity copies; a fourth has an
    # equal-shaped but different bias, and a constant equal to the bias is a graph output.
    rng = np.random.default_rng(0)
    bias = rng.standard_normal(4).astype(np.float32)
    weights = {f"w{i}": rng.standard_normal((4, 4, 1, 1)).astype(np.float32) for i in range(4)}
    nodes = [
        node("Identity", ["bias"], ["bias_copy1"], name="id1"),
        node("Identity", ["bias"], ["bias_copy2"], name="id2"),
        node("Conv", ["x", "w0", "bias"], ["c0"], name="conv0"),
        node("Conv", ["c0", "w1", "bias_copy1"], ["c1"], name="conv1"),
        node("Conv", ["c1", "w2", "bias_copy2"], ["c2"], name="conv2"),
        node("Conv", ["c2", "w3", "other"], ["y"], name="conv3"),
        node("Identity", ["bias"], ["bias_out"], name="id_out"),
    ]
    return kit.model(
        nodes,
        inputs={"x": [1, 4, 3, 3]},
        outputs={"y": [1, 4, 3, 3], "bias_out": [4]},
        initializers={"bias": bias, "other": bias + 1.0, **weights},
    )


def test_folded_identity_copies_merge_back_into_one_constant(kit: SimpleNamespace) -> None:
    model = _shared_bias_model(kit)
    folded, _ = onnxpress.optimize(model, passes="fold-constants,cleanup{dedupe=false}")
    copies, report = onnxpress.optimize(model, passes="fold-constants,cleanup")
    result = report.passes[1].result
    assert result.counts["constants_merged"] == 2
    biases = {n.name: n.input[2] for n in copies.graph.node if n.op_type == "Conv"}
    assert biases["conv0"] == biases["conv1"] == biases["conv2"]
    assert biases["conv3"] != biases["conv0"]  # equal shape, other values: its own
    names = {i.name for i in copies.graph.initializer}
    assert "bias_out" in names  # the graph output keeps its own constant
    params = sum(int(np.prod(i.dims)) for i in copies.graph.initializer)
    assert params == sum(int(np.prod(i.dims)) for i in folded.graph.initializer) - 2 * 4
    kit.same_outputs(model, copies)


def test_constants_of_one_size_but_another_dtype_or_shape_stay_apart(
    kit: SimpleNamespace,
) -> None:
    model = kit.model(
        [
            node("Add", ["x", "a"], ["xa"], name="add_a"),
            node("Add", ["xa", "b"], ["xb"], name="add_b"),
            node("Reshape", ["xb", "shape"], ["xr"], name="reshape"),
            node("Add", ["xr", "c"], ["y"], name="add_c"),
        ],
        inputs={"x": [2, 2]},
        outputs={"y": [4, 1]},
        initializers={
            "a": np.zeros((2, 2), np.float32),
            "b": np.zeros((1, 2, 2), np.float32)[0],
            "c": np.zeros((4, 1), np.float32),
            "shape": np.array([4, 1], np.int64),
        },
    )
    merged, report = onnxpress.optimize(model, passes="cleanup")
    assert report.passes[0].result.counts["constants_merged"] == 1  # a and b: same layout
    assert sorted(i.name for i in merged.graph.initializer) == ["a", "c", "shape"]
    kit.same_outputs(model, merged)
