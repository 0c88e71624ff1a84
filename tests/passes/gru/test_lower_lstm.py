"""lower-lstm: LSTM ops -> unrolled primitive cells; every direction, initial states,
peepholes and the batch-first layout, checked on onnxruntime (the manager's numeric
verification) or onnx's reference; refusals with reasons."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import pytest
from gru_helpers import BATCH, HID, IN, gru_model
from onnx.reference import ReferenceEvaluator

import onnxpress


def lower(model: onnx.ModelProto, verify: str = "numeric") -> tuple[onnx.ModelProto, Any]:
    result, report = onnxpress.optimize(model, "lower-lstm", verify=verify)
    if verify == "numeric":
        assert report.passes[0].verification.value <= 1e-5
    return result, report.passes[0].result


@pytest.mark.parametrize(
    ("direction", "states", "peepholes"),
    [("forward", False, False), ("reverse", True, True), ("bidirectional", True, True)],
)
def test_lowers_every_direction(direction: str, states: bool, peepholes: bool) -> None:
    model = gru_model(
        op="LSTM",
        direction=direction,
        initial_h=states,
        peepholes=peepholes,
        outputs=("Y", "Y_h", "Y_c"),
    )
    result, record = lower(model)
    ops = Counter(n.op_type for n in result.graph.node)
    dirs = 2 if direction == "bidirectional" else 1
    assert "LSTM" not in ops
    assert record.counts == {"lstm_lowered": 1, "steps_unrolled": 4 * dirs}
    assert ops["Sigmoid"] == 3 * 4 * dirs and ops["Tanh"] == 2 * 4 * dirs
    assert ops["MatMul"] == dirs * (1 + 4)
    assert [o.name for o in result.graph.output] == ["Y", "Y_h", "Y_c"]


def test_batch_first_layout() -> None:
    # onnxruntime has no layout=1 LSTM: compare with onnx's reference implementation.
    model = gru_model(
        op="LSTM", layout=1, initial_h=True, direction="bidirectional", outputs=("Y", "Y_c")
    )
    result, record = lower(model, verify="structure")
    assert record.counts["lstm_lowered"] == 1
    rng = np.random.default_rng(1)
    feed = {
        "X": rng.standard_normal((BATCH, 4, IN)).astype(np.float32),
        "h0": rng.standard_normal((BATCH, 2, HID)).astype(np.float32),
        "c0": rng.standard_normal((BATCH, 2, HID)).astype(np.float32),
    }
    expected = ReferenceEvaluator(model).run(None, feed)
    got = ReferenceEvaluator(result).run(None, feed)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_refusals_say_why() -> None:
    cases = {
        "clip is not lowered": gru_model(op="LSTM", clip=0.5),
        "input_forget=1": gru_model(op="LSTM", input_forget=1),
        "activations": gru_model(op="LSTM", activations=["Sigmoid", "Tanh", "Relu"]),
        "input X has no static shape": gru_model(op="LSTM", steps="T"),
    }
    for reason, model in cases.items():
        result, record = lower(model)
        assert [n.op_type for n in result.graph.node] == ["LSTM"]
        assert len(record.refusals) == 1 and reason in record.refusals[0].reason, reason
