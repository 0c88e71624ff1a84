"""fuse-gru: GRU cells in primitive ops (torch GRUCell loops, Keras/TF-style cells) -> GRU ops.

Each test builds its graph in a few lines, runs the pass under the manager (which checks
the result on onnxruntime against the original), and asserts the exact structure after it
and what the report says: every fused and refused candidate, refusals with their reasons.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxpress.passes.gru.fuse import FuseGru, FuseGruOptions
from rnn_cells import (
    HID,
    IN,
    Net,
    handwritten_cell,
    keras_cell,
    loop,
    make,
    step_inputs,
    tf_cell,
    update,
)

import onnxpress

MODELS = Path(__file__).resolve().parents[3] / "models"


def single(cell: Any, **kwargs: Any) -> onnx.ModelProto:
    """One cell (a decoder step): inputs x [batch, IN] and h [batch, HID], output h'."""
    net = Net()
    out = cell(net, "x", "h", **kwargs)
    net.nodes.append(helper.make_node("Identity", [out], ["h_new"], name="out"))
    return make(net, {"x": ["batch", IN], "h": ["batch", HID]}, ["h_new"])


def fuse(model: onnx.ModelProto, passes: str = "fuse-gru") -> tuple[onnx.ModelProto, Any]:
    """Run under the manager (numeric verification on) and return the model and pass result."""
    out, report = onnxpress.optimize(model, passes=passes)
    assert report.passes[0].verification.value <= 1e-5
    return out, report.passes[0].result


def tanh_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Tanh"]


def gru_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "GRU"]


@pytest.mark.parametrize(
    ("reset_after", "form", "batch_first"),
    [
        (True, "keras", True),
        (False, "keras", False),
        (True, "residual", False),
        (False, "expanded", True),
        (True, "mirrored", True),
    ],
)
def test_keras_loop_becomes_one_gru(
    reset_after: bool, form: str, batch_first: bool, kit: SimpleNamespace
) -> None:
    model = loop(keras_cell, 3, batch_first, reset_after=reset_after, form=form)
    out, result = fuse(model)
    layout = ["Transpose"] if batch_first else []
    # X (Transpose if batch-first), the GRU, Y -> [T, batch, H] -> stacked y, Y_h -> h_last.
    assert kit.ops(out)[: len(layout) + 1] == [*layout, "GRU"]
    # Y -> Squeeze -> steps [T, batch, H] (-> Transpose = stacked y); h_last = Gather(steps, -1)
    after = [*layout, "GRU", "Squeeze", "Gather", "Identity", *layout]
    assert sorted(kit.ops(out)) == sorted(after)
    (gru,) = gru_nodes(out)
    attrs = {a.name: helper.get_attribute_value(a) for a in gru.attribute}
    assert attrs == {"hidden_size": HID, "linear_before_reset": int(reset_after)}
    assert result.counts["cells_fused"] == 3 and not result.refusals
    (record,) = result.details
    assert record["seq_length"] == 3 and record["gate_order"] == "z,r,n"
    assert record["layout"] == ("batch-first" if batch_first else "time-first")
    assert record["update"].startswith("z*n" if form == "mirrored" else "(1-z)")
    assert record["self_check_max_abs_error"] < 1e-5
    kit.same_outputs(model, out)


def test_tf_cell_concat_projection_and_split_sigmoid(kit: SimpleNamespace) -> None:
    model = loop(tf_cell, 2, batch_first=False)
    out, result = fuse(model)
    assert sorted(kit.ops(out)) == ["GRU", "Gather", "Identity", "Squeeze"]
    (record,) = result.details
    assert record["linear_before_reset"] == 0 and record["cells"] == tanh_names(model)
    kit.same_outputs(model, out)


def test_stacked_layers_feed_y_to_the_next_gru(kit: SimpleNamespace) -> None:
    """Layer 2 reads layer 1's states: its X becomes layer 1's Y, with no per-step nodes."""

    def two_layers(net: Net, x: str, h: str) -> str:
        net.state = net.state or h
        net.state = keras_cell(net, x, net.state, tag="a")
        return keras_cell(net, net.state, h, tag="b", inputs=HID)

    model = loop(two_layers, 3, batch_first=False)
    out, result = fuse(model)
    assert kit.ops(out) == ["GRU", "Squeeze", "GRU", "Squeeze", "Gather", "Identity"]
    assert [d["layout"] for d in result.details] == ["time-first", "time-first"]
    kit.same_outputs(model, out)


def test_handwritten_loop_from_a_graph_state(kit: SimpleNamespace) -> None:
    """Separate per-gate Gemms; the loop starts from the graph input h0, time-first,
    static batch."""
    net = Net()
    h = "h0"
    for x_t in step_inputs(net, 3, 0, "gather"):
        h = handwritten_cell(net, x_t, h)
    net.nodes.append(helper.make_node("Identity", [h], ["h_last"], name="out"))
    # A static batch: the manager's random inputs give a symbolic dim different sizes on
    # axis 0 and axis 1, and the probes then run the cell in chunks of 2 rows.
    model = make(net, {"x": [3, 2, IN], "h0": [2, HID]}, ["h_last"])
    out, result = fuse(model)
    assert kit.ops(out) == ["Unsqueeze", "GRU", "Squeeze", "Identity"]
    (record,) = result.details
    assert record["initial_state"] == "h0" and record["layout"] == "time-first"
    assert record["gate_order"] == "separate projections" and record["linear_before_reset"] == 1
    kit.same_outputs(model, out)


def test_single_cell_gets_its_state_from_the_graph(kit: SimpleNamespace) -> None:
    model = single(keras_cell)
    out, result = fuse(model)
    assert kit.ops(out) == ["Unsqueeze", "Unsqueeze", "GRU", "Squeeze", "Identity"]
    assert [i.name for i in out.graph.output] == ["h_new"]
    assert result.details[0]["initial_state"] == "h" and result.details[0]["seq_length"] == 1
    kit.same_outputs(model, out)


def test_refusals_name_every_candidate_with_a_reason() -> None:
    """Per-step weights, a minimal gated unit, an ungated candidate, a forced wrong form."""
    net = Net()
    h = "h"
    for t in range(2):  # two steps with their own weights: not a loop
        h = keras_cell(net, "x", h, tag=str(t))
    z = net.op("Sigmoid", net.op("MatMul", h, net.weight("wf", HID, HID)))
    n = net.op("Tanh", net.op("MatMul", net.op("Mul", z, h), net.weight("wn", HID, HID)))
    mgu = update(net, "keras", z, n, h)
    n2 = net.op("Tanh", net.op("MatMul", mgu, net.weight("wn2", HID, HID)))
    no_reset = update(
        net, "keras", net.op("Sigmoid", net.op("MatMul", mgu, net.weight("wz", HID, HID))), n2, mgu
    )
    net.nodes.append(helper.make_node("Identity", [no_reset], ["out"], name="out"))
    model = make(net, {"x": ["batch", IN], "h": ["batch", HID]}, ["out"])
    out, result = fuse(model)
    assert not gru_nodes(out) and not result.changed
    reasons = {r.node: r.reason for r in result.refusals}
    step0, step1, minimal, ungated = tanh_names(model)
    assert set(reasons) == {step0, step1, minimal, ungated}
    assert "per-step weights" in reasons[step0] and "per-step weights" in reasons[step1]
    assert "minimal gated unit" in reasons[minimal]
    assert reasons[ungated] == "the tanh's pre-activation reads 0 gates, not one reset gate"


def test_self_check_refuses_a_wrong_linear_before_reset() -> None:
    model = single(keras_cell, reset_after=True)
    out, report = onnxpress.optimize(model, passes=[FuseGru(FuseGruOptions(linear_before_reset=0))])
    (refusal,) = report.passes[0].result.refusals
    assert refusal.reason.startswith("self-check failed: the GRU (linear_before_reset=0)")
    assert not gru_nodes(out)


def test_lstm_cell_and_exported_gate_are_refused() -> None:
    net = Net()
    gates = [
        net.op(
            "Add",
            net.op("MatMul", "x", net.weight(f"w{g}", IN, HID)),
            net.op("MatMul", "h", net.weight(f"u{g}", HID, HID)),
        )
        for g in "ifgo"
    ]
    i, f, o = (net.op("Sigmoid", gates[k]) for k in (0, 1, 3))
    c = net.op("Add", net.op("Mul", f, "c"), net.op("Mul", i, net.op("Tanh", gates[2])))
    lstm_h = net.op("Mul", o, net.op("Tanh", c))
    gru_h = keras_cell(net, "x", lstm_h)
    net.nodes.append(helper.make_node("Identity", [gru_h], ["out"], name="out"))
    z_gate = [n.output[0] for n in net.nodes if n.op_type == "Sigmoid"][-2]  # the GRU's z
    model = make(
        net, {"x": ["batch", IN], "h": ["batch", HID], "c": ["batch", HID]}, ["out", z_gate]
    )
    _, result = fuse(model)
    lstm_g, lstm_c, gru_n = tanh_names(model)
    reasons = {r.node: r.reason for r in result.refusals}
    assert (
        reasons[lstm_g]
        == reasons[lstm_c]
        == ("no update (1-z)*n + z*h with a Sigmoid gate z follows the tanh")
    )
    assert reasons[gru_n] == f"'{z_gate}' inside the cell is a graph output"


@pytest.mark.skipif(
    not (MODELS / "gru_sunspots_unrolled.onnx").exists(),
    reason="models/gru_sunspots_unrolled.onnx is not built yet",
)
def test_sunspots_unrolled_model_becomes_the_gru_model(kit: SimpleNamespace) -> None:
    unrolled = onnx.load(str(MODELS / "gru_sunspots_unrolled.onnx"))
    reference = onnx.load(str(MODELS / "gru_sunspots.onnx"))
    out, result = fuse(unrolled)
    assert [n.op_type for n in gru_nodes(out)] == ["GRU"] and result.details[0]["seq_length"] == 24
    data = np.load(MODELS / "data" / "gru_sunspots_eval.npz")
    (fused,) = kit.run_ort(out, {"input": data["input"]}).values()
    (expected,) = kit.run_ort(reference, {"input": data["input"]}).values()
    np.testing.assert_allclose(fused, expected, atol=1e-5)
    std, mean = float(data["std"]), float(data["mean"])
    rmse = float(np.sqrt(np.mean((fused[:, 0] * std + mean - data["target"]) ** 2)))
    assert rmse == pytest.approx(float(data["rmse"]), rel=1e-4)
