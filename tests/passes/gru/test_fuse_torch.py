"""fuse-gru on what ``torch.onnx.export`` writes: GRUCell loops, a decoder step with dynamic
batch whose cell splits its gates with ``chunk`` (fused by the default pipeline), and
bidirectional loops of two GRUCells joined by Concat or Add.

Numerics: the manager verifies every pass on onnxruntime, and each test compares the
outputs again on its own feeds; structure: the exact ops left.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper
from rnn_exports import bidirectional_loop, chunked_decoder_step, gru_cell_loop

import onnxpress


def fuse(model: onnx.ModelProto, passes: str | None = "fuse-gru") -> tuple[onnx.ModelProto, Any]:
    """Run under the manager (numeric verification on); the model and the report."""
    out, report = onnxpress.optimize(model, passes=passes)
    assert all(p.verification.value <= 1e-5 for p in report.passes)
    return out, report


def fuse_gru_result(report: Any) -> Any:
    (entry,) = [p for p in report.passes if p.name == "fuse-gru"]
    return entry.result


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize(
    ("batch_first", "dynamo", "dynamic"),
    [(True, False, True), (False, False, True), (True, True, True), (True, False, False)],
)
def test_torch_gru_cell_loop(
    batch_first: bool, dynamo: bool, dynamic: bool, kit: SimpleNamespace
) -> None:
    """TorchScript and dynamo exports; with a static batch TorchScript folds step 0's
    recurrent projection (its state is zeros), and that step still joins the loop."""
    model = gru_cell_loop(3, batch_first, dynamo, dynamic)
    out, report = fuse(model)
    expected = ["GRU", "Squeeze", "Gather"] + (["Transpose"] * 2 if batch_first else [])
    assert sorted(kit.ops(out)) == sorted(expected)
    (record,) = fuse_gru_result(report).details
    assert record["gate_order"] == "r,z,n" and record["linear_before_reset"] == 1
    assert record["cell_count"] == 3 and record["stacked_output"] == "y"
    assert [o.name for o in out.graph.output] == ["y", "h"]
    kit.same_outputs(model, out)


def test_chunked_decoder_step_with_dynamic_batch_fuses_in_the_default_pipeline(
    kit: SimpleNamespace,
) -> None:
    """chunk(3, 1) reads dim 1 through Shape -> Gather: fold-constants folds that static dim
    of the [batch, 3H] shape, and fuse-gru removes the Shapes left without readers."""
    model = chunked_decoder_step()
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert Counter(kit.ops(model))["Shape"] == 2
    out, report = fuse(model, passes=None)
    fold = next(p for p in report.passes if p.name == "fold-constants").result
    assert fold.counts["shape_dims_folded"] == 2
    result = fuse_gru_result(report)
    assert result.counts["gru_fused"] == 1 and not result.refusals
    _, alone = fuse(model, passes="fold-constants,fuse-gru")
    assert fuse_gru_result(alone).counts["dead_nodes_removed"] == 2  # the two Shapes
    assert kit.ops(out) == ["Gather", "Unsqueeze", "Unsqueeze", "GRU", "Squeeze", "Gemm"]
    (gru,) = [n for n in out.graph.node if n.op_type == "GRU"]
    assert attributes(gru) == {"hidden_size": 8, "linear_before_reset": 1}
    assert [o.name for o in out.graph.output] == ["logits", "h_new"]
    kit.same_outputs(model, out)
    rng = np.random.default_rng(1)
    for batch in (1, 5):  # the batch stays symbolic
        feeds = {
            "token": rng.integers(0, 11, batch),
            "h": rng.uniform(-1, 1, (batch, 8)).astype(np.float32),
        }
        expected, actual = kit.run_ort(model, feeds), kit.run_ort(out, feeds)
        for name, value in expected.items():
            np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-5)


def test_shape_reader_that_stays_live_keeps_its_node(kit: SimpleNamespace) -> None:
    """A Shape of a tensor inside the cell that is still read keeps that tensor's producer;
    the cell fuses all the same."""
    model = chunked_decoder_step()
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm" and "ih" in n.name)
    model.graph.node.append(helper.make_node("Shape", [gemm.output[0]], ["gates_shape"]))
    model.graph.output.append(
        helper.make_tensor_value_info("gates_shape", onnx.TensorProto.INT64, [2])
    )
    out, report = fuse(model, passes="fold-constants,fuse-gru,cleanup")
    assert fuse_gru_result(report).counts["gru_fused"] == 1
    assert Counter(kit.ops(out))["Gemm"] == 2 and "Shape" in kit.ops(out)
    kit.same_outputs(model, out)


@pytest.mark.parametrize(
    ("join", "batch_first", "after"),
    [
        ("concat", True, ["Transpose", "GRU", "Transpose", "Reshape"]),
        ("add", False, ["GRU", "ReduceSum"]),
    ],
)
def test_torch_bidirectional_gru_cell_loops(
    join: str, batch_first: bool, after: list[str], kit: SimpleNamespace
) -> None:
    """Two GRUCells, one over t = 0..T-1 and one over T-1..0, stacked and joined."""
    model = bidirectional_loop("gru", 4, batch_first, join)
    out, report = fuse(model)
    assert kit.ops(out) == after
    (gru,) = [n for n in out.graph.node if n.op_type == "GRU"]
    assert attributes(gru)["direction"] == b"bidirectional"
    assert fuse_gru_result(report).counts == {
        "dead_nodes_removed": 0,
        "bidirectional": 1,
        "gru_fused": 2,
        "cells_fused": 8,
        "nodes_removed": len(model.graph.node) - len(after),
    }
    kit.same_outputs(model, out)


def test_stacked_bidirectional_layers(kit: SimpleNamespace) -> None:
    """Layer 2 steps through layer 1's joined output: two bidirectional GRUs, nothing else
    but the layout changes between them."""
    model = bidirectional_loop("gru", 4, True, "concat", layers=2)
    out, report = fuse(model)
    assert kit.ops(out) == ["Transpose", "GRU", "Transpose", "Reshape"] * 2
    assert fuse_gru_result(report).counts["bidirectional"] == 2
    kit.same_outputs(model, out)
