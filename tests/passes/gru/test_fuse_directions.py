"""fuse-gru over time in both directions: reverse chains become direction="reverse", and a
forward and a reverse chain over the same input become one direction="bidirectional" GRU
whose Y is rewritten into the layout of the source's Concat or Add join.

Numerics: the manager verifies on onnxruntime, and each test compares again; structure:
the exact ops left and the GRU's attributes and weight shapes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import onnx
import pytest
from onnx import helper
from rnn_cells import HID, IN, Net, bidirectional, cell_loop, keras_cell, loop, make

import onnxpress


def fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Any]:
    out, report = onnxpress.optimize(model, passes="fuse-gru")
    assert report.passes[0].verification.value <= 1e-5
    return out, report.passes[0].result


def gru(model: onnx.ModelProto) -> tuple[onnx.NodeProto, dict[str, Any]]:
    (node,) = [n for n in model.graph.node if n.op_type == "GRU"]
    return node, {a.name: helper.get_attribute_value(a) for a in node.attribute}


def weight_shape(model: onnx.ModelProto, node: onnx.NodeProto, k: int) -> list[int]:
    (init,) = [i for i in model.graph.initializer if i.name == node.input[k]]
    return list(init.dims)


@pytest.mark.parametrize(
    ("how", "batch_first"), [("gather", True), ("split", False), ("slice", True)]
)
def test_reverse_loop_becomes_a_reverse_gru(
    how: str, batch_first: bool, kit: SimpleNamespace
) -> None:
    """Steps T-1..0, states stacked back in time order: Y keeps time order, h_T = Y_h."""
    model = loop(keras_cell, 3, batch_first, how, reverse=True)
    out, result = fuse(model)
    layout = ["Transpose"] if batch_first else []
    expected = [*layout, "GRU", "Squeeze", "Gather", "Identity", *layout]
    assert sorted(kit.ops(out)) == sorted(expected)
    _, attrs = gru(out)
    assert attrs["direction"] == b"reverse"
    (record,) = result.details
    assert record["direction"] == "reverse" and record["stacked_output"] == "y"
    kit.same_outputs(model, out)


@pytest.mark.parametrize(
    ("join", "batch_first", "after"),
    [
        ("concat", True, ["Transpose", "GRU", "Transpose", "Reshape"]),
        ("concat", False, ["GRU", "Transpose", "Reshape"]),
        ("add", True, ["Transpose", "GRU", "ReduceSum", "Transpose"]),
        ("add", False, ["GRU", "ReduceSum"]),
    ],
)
def test_keras_bidirectional_loop_becomes_one_gru(
    join: str, batch_first: bool, after: list[str], kit: SimpleNamespace
) -> None:
    model = bidirectional(keras_cell, 3, batch_first, join)
    out, result = fuse(model)
    assert kit.ops(out) == after
    node, attrs = gru(out)
    assert attrs == {"hidden_size": HID, "linear_before_reset": 1, "direction": b"bidirectional"}
    assert weight_shape(out, node, 1) == [2, 3 * HID, IN]
    assert weight_shape(out, node, 2) == [2, 3 * HID, HID]
    assert result.counts["bidirectional"] == 1 and result.counts["gru_fused"] == 2
    assert {r["direction"] for r in result.details} == {"forward", "reverse"}
    assert all(r["bidirectional"]["join"] == join for r in result.details)
    kit.same_outputs(model, out)


def test_bidirectional_from_given_states_concatenates_them(kit: SimpleNamespace) -> None:
    model = bidirectional(keras_cell, 3, False, "concat", states=True)
    out, _ = fuse(model)
    node, attrs = gru(out)
    assert attrs["direction"] == b"bidirectional"
    (concat,) = [n for n in out.graph.node if n.output[0] == node.input[5]]
    assert concat.op_type == "Concat"
    kit.same_outputs(model, out)


def test_two_forward_loops_over_one_input_are_not_paired(kit: SimpleNamespace) -> None:
    net = Net()
    first, _ = cell_loop(net, keras_cell, 3, 0, "gather", tag="a")
    second, _ = cell_loop(net, keras_cell, 3, 0, "gather", tag="b")
    net.nodes.append(helper.make_node("Concat", [first, second], ["y"], axis=-1, name="join"))
    model = make(net, {"x": [3, "batch", IN]}, ["y"])
    out, result = fuse(model)
    assert [n.op_type for n in out.graph.node].count("GRU") == 2
    assert result.counts["bidirectional"] == 0
    kit.same_outputs(model, out)
