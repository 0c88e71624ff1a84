"""fuse-lstm: LSTM cells in primitive ops (Keras-style kernels in any gate order, peepholes,
torch LSTMCell loops) -> LSTM ops, forward, reverse and bidirectional; refusals with reasons.

Numerics: the manager verifies each run on onnxruntime and each test compares outputs
again; structure: the exact ops left, the LSTM's attributes and its weight shapes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper
from rnn_cells import HID, IN, Net, keras_lstm_cell, lstm_loop, make, tf_lstm_cell
from rnn_exports import bidirectional_loop, lstm_cell_loop

import onnxpress
from onnxpress.core.verify import Runner


def fuse(model: onnx.ModelProto, passes: str = "fuse-lstm") -> tuple[onnx.ModelProto, Any]:
    out, report = onnxpress.optimize(model, passes=passes)
    assert all(p.verification.value <= 1e-5 for p in report.passes)
    (entry,) = [p for p in report.passes if p.name == "fuse-lstm"]
    return out, entry.result


def lstm(model: onnx.ModelProto) -> tuple[onnx.NodeProto, dict[str, Any]]:
    (node,) = [n for n in model.graph.node if n.op_type == "LSTM"]
    return node, {a.name: helper.get_attribute_value(a) for a in node.attribute}


def dims(model: onnx.ModelProto, name: str) -> list[int]:
    (init,) = [i for i in model.graph.initializer if i.name == name]
    return list(init.dims)


def keras_model(steps: int, batch_first: bool, **kwargs: Any) -> onnx.ModelProto:
    net = Net()
    axis = 1 if batch_first else 0
    _, h, c = lstm_loop(net, steps, axis, **kwargs)
    net.nodes[-1].output[0] = "y"  # the stacking Concat
    for name, tensor in (("h_last", h), ("c_last", c)):
        net.nodes.append(helper.make_node("Identity", [tensor], [name], name=name))
    x_shape = ["batch", steps, IN] if batch_first else [steps, "batch", IN]
    return make(net, {"x": x_shape}, ["y", "h_last", "c_last"])


@pytest.mark.parametrize(
    ("order", "batch_first", "how"),
    [("ifgo", True, "gather"), ("iofg", False, "split"), ("gifo", True, "slice")],
)
def test_keras_lstm_loop_in_any_gate_order(
    order: str, batch_first: bool, how: str, kit: SimpleNamespace
) -> None:
    model = keras_model(3, batch_first, order=order, how=how)
    out, result = fuse(model)
    layout = ["Transpose"] if batch_first else []
    # X (Transpose), LSTM, Y -> steps (-> Transpose = y), h_last = Gather, c_last = Squeeze(Y_c)
    after = [*layout, "LSTM", "Squeeze", *layout, "Gather", "Squeeze", "Identity", "Identity"]
    assert sorted(kit.ops(out)) == sorted(after)
    node, attrs = lstm(out)
    assert attrs == {"hidden_size": HID}
    assert dims(out, node.input[1]) == [1, 4 * HID, IN] and len(node.input) == 4
    (record,) = result.details
    assert record["gate_order"] == ",".join(order) and record["cell_count"] == 3
    assert record["peepholes"] is False and record["self_check_max_abs_error"] < 1e-5
    kit.same_outputs(model, out)


def test_peepholes_become_p(kit: SimpleNamespace) -> None:
    model = keras_model(3, False, peepholes=True)
    out, result = fuse(model)
    node, _ = lstm(out)
    assert dims(out, node.input[7]) == [1, 3 * HID] and result.details[0]["peepholes"]
    kit.same_outputs(model, out)


def test_projection_and_per_step_weights_are_refused() -> None:
    model = keras_model(2, False, projection=3)
    _, result = fuse(model)
    assert not result.details
    reasons = [r.reason for r in result.refusals]
    assert any("(LSTMP): the ONNX LSTM op has no projection" in r for r in reasons)
    net = Net()
    state = ("h", "c")
    for t in range(2):
        state = keras_lstm_cell(net, "x", state, tag=str(t))
    net.nodes.append(helper.make_node("Identity", [state[0]], ["out"], name="out"))
    model = make(net, {"x": ["batch", IN], "h": ["batch", HID], "c": ["batch", HID]}, ["out"])
    _, result = fuse(model)
    assert len(result.refusals) == 2
    assert all("not a shared-weight loop" in r.reason for r in result.refusals)


@pytest.mark.parametrize(
    ("batch_first", "reverse", "dynamic"),
    [(True, False, True), (False, True, True), (True, False, False)],
)
def test_torch_lstm_cell_loop(
    batch_first: bool, reverse: bool, dynamic: bool, kit: SimpleNamespace
) -> None:
    """With a static batch TorchScript folds step 0's h @ R (h is zeros): that step joins the
    loop after a self-check from zero states."""
    model = lstm_cell_loop(4, batch_first, reverse, dynamic)
    out, result = fuse(model, passes=None)  # the default pipeline
    _, attrs = lstm(out)
    assert attrs.get("direction", b"forward") == (b"reverse" if reverse else b"forward")
    (record,) = result.details
    assert record["gate_order"] == "i,f,g,o" and record["stacked_output"] == "y"
    assert record["cell_count"] == 4 and not result.refusals
    assert [o.name for o in out.graph.output] == ["y", "h", "c"]
    kit.same_outputs(model, out)


@pytest.mark.parametrize(
    ("join", "batch_first", "after"),
    [
        ("concat", True, ["Transpose", "LSTM", "Transpose", "Reshape"]),
        ("add", False, ["LSTM", "ReduceSum"]),
    ],
)
def test_torch_bidirectional_lstm_cell_loops(
    join: str, batch_first: bool, after: list[str], kit: SimpleNamespace
) -> None:
    model = bidirectional_loop("lstm", 4, batch_first, join)
    out, result = fuse(model)
    assert kit.ops(out) == after
    node, attrs = lstm(out)
    assert attrs == {"hidden_size": HID, "direction": b"bidirectional"}
    assert dims(out, node.input[2]) == [2, 4 * HID, HID]
    assert result.counts["bidirectional"] == 1 and result.counts["cells_fused"] == 8
    kit.same_outputs(model, out)


def test_fused_bidirectional_lstm_takes_weight_only_int8(tmp_path: Any) -> None:
    """fuse-lstm then qdq: W and R become int8 (DequantizeLinear per gate row), the outputs
    stay close to the float model's."""
    model = bidirectional_loop("lstm", 4, True, "concat")
    rng = np.random.default_rng(0)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=rng.standard_normal((8, 4, IN)).astype(np.float32))
    out, report = onnxpress.optimize(model, passes="fuse-lstm,qdq", calibration=str(calibration))
    qdq = report.passes[1].result
    assert qdq.counts["weights_int8_weight_only"] == 2
    node, _ = lstm(out)
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert [producers.get(name) for name in node.input[1:3]] == ["DequantizeLinear"] * 2
    feed = {"x": rng.standard_normal((3, 4, IN)).astype(np.float32)}
    expected = Runner(model)(feed)[0]
    np.testing.assert_allclose(Runner(out)(feed)[0], expected, atol=0.02 * np.abs(expected).max())


def test_tf_lstm_cell_with_concat_kernel_and_forget_bias(kit: SimpleNamespace) -> None:
    """A step-wise TF1 cell from given states: one Concat([x, h]) projection."""
    net = Net()
    h, c = tf_lstm_cell(net, "x", ("h", "c"))
    for name, tensor in (("h_new", h), ("c_new", c)):
        net.nodes.append(helper.make_node("Identity", [tensor], [name], name=name))
    model = make(
        net, {"x": ["batch", IN], "h": ["batch", HID], "c": ["batch", HID]}, ["h_new", "c_new"]
    )
    out, result = fuse(model)
    node, _ = lstm(out)
    assert len(node.input) == 7  # X, W, R, B, (no sequence_lens), initial_h, initial_c
    (record,) = result.details
    assert record["gate_order"] == "unknown" and record["initial_state"] == "h, c"
    kit.same_outputs(model, out)
